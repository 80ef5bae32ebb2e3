"""budgetlm.memory: parameter counts equal the built model's; the estimate moves the right way."""

import dataclasses

import pytest
import torch

from budgetlm.config import ModelConfig
from budgetlm.memory import block_activation_bytes_per_token, count_params, estimate_memory
from budgetlm.model import Transformer


def cfg(**overrides) -> ModelConfig:
    base = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=100, seq_len=32)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(tie_embeddings=False),
        dict(mlp="gelu"),
        dict(mlp="geglu", norm="layernorm", objective="masked"),
        dict(n_head=8, n_kv_head=2, qk_norm=True),
        dict(ffn_hidden=96, embed_norm=True, vocab_size=1000),
        dict(n_layer=3, n_embd=96, n_head=6, n_kv_head=3, tie_embeddings=False, mlp="gelu", qk_norm=True),
    ],
)
def test_param_count_matches_the_model(overrides):
    c = cfg(**overrides)
    with torch.device("meta"):
        model = Transformer(c)
    pc = count_params(c)
    assert pc.total == model.num_params()
    assert pc.total - pc.embedding == model.num_params(exclude_embeddings=True)
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("layers."))
    assert pc.block_matrices * c.n_layer == matrices


def test_memory_terms_for_adamw_fp32():
    c = cfg()
    est = estimate_memory(c, micro_batch=4, precision="fp32", device_type="cpu")
    P = count_params(c).total
    assert (est.weights, est.gradients, est.optimizer_state) == (4 * P, 4 * P, 8 * P)
    assert est.autocast_weights == 0 and est.overhead == 0 and est.params == P
    assert est.total >= est.weights + est.optimizer_state + est.activations
    assert "total" in est.table()


def test_monotonic_in_batch_and_sequence():
    c = cfg(seq_len=128)
    totals = [estimate_memory(c, micro_batch=b, precision="bf16").total for b in (1, 2, 4, 8, 16)]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)
    by_len = [estimate_memory(c, micro_batch=4, seq_len=t).activations for t in (32, 64, 128)]
    assert by_len[0] < by_len[1] < by_len[2]


def test_checkpointing_lowers_activations():
    c = cfg(n_layer=8, seq_len=128)
    none, sel, full = (estimate_memory(c, micro_batch=8, activation_checkpointing=a) for a in ("none", "selective", "full"))
    assert full.activations < sel.activations < none.activations
    assert full.recompute > 0 and none.recompute == 0
    assert full.total < sel.total < none.total


def test_optimizers_precision_and_sharding():
    c = cfg(n_layer=4, n_embd=128, vocab_size=1000)
    adam, adam8, muon = (estimate_memory(c, micro_batch=1, optimizer=o).optimizer_state for o in ("adamw", "adamw8bit", "muon"))
    assert adam8 < muon < adam
    assert adam8 == pytest.approx(adam / 4, rel=0.05)
    assert estimate_memory(c, micro_batch=4, precision="fp32").activations > estimate_memory(c, micro_batch=4, precision="bf16").activations
    assert block_activation_bytes_per_token(c, "fp16") == block_activation_bytes_per_token(c, "bf16")
    one, four = estimate_memory(c, micro_batch=4), estimate_memory(c, micro_batch=4, dp_shard=4)
    assert four.optimizer_state == one.optimizer_state // 4 and four.total < one.total
    off = estimate_memory(c, micro_batch=4, cpu_offload=True)
    assert off.optimizer_state == 0 and off.host > 0 and off.total < one.total
    assert estimate_memory(c, micro_batch=4, tp=2).activations < one.activations


def test_masked_objective_predicts_only_masked_positions():
    causal = estimate_memory(cfg(vocab_size=8000), micro_batch=64)
    masked = estimate_memory(dataclasses.replace(cfg(vocab_size=8000), objective="masked"), micro_batch=64, mlm_rate=0.15)
    assert masked.logits_loss < causal.logits_loss / 4  # the (V, C) weight-gradient terms do not shrink with the rate


def test_bad_arguments():
    with pytest.raises(ValueError, match="precision"):
        estimate_memory(cfg(), micro_batch=1, precision="int8")
    with pytest.raises(ValueError, match="optimizer"):
        estimate_memory(cfg(), micro_batch=1, optimizer="sgd")
    with pytest.raises(ValueError, match="activation_checkpointing"):
        estimate_memory(cfg(), micro_batch=1, activation_checkpointing="some")
    with pytest.raises(ValueError, match="micro_batch"):
        estimate_memory(cfg(), micro_batch=0)
