"""The reproduction recipes match the published models they reproduce; Cramming's embedding norm."""

import math

import pytest
import torch

from budgetlm.config import ModelConfig, load_recipe
from budgetlm.hf_names import llama_config_kwargs
from budgetlm.model import IGNORE_INDEX, Transformer, compute_loss


def meta_model(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


def test_bert_24h_has_crammed_berts_parameter_count():
    cfg = load_recipe("bert-24h").model
    cfg.vocab_size = 32768  # data/pile-readymade.yaml: WordPiece, 32768
    # crammed BERT from arch/crammed-bert.yaml: fused qkv 768x2304 and output 768x768 without biases; FFNComponent's
    # dense_in 768x3072 (GELU-GLU: split into two halves of 1536) and dense_out 1536x768; two LayerNorms with weight and
    # bias per layer; embedding 32768x768 plus its LayerNorm; final LayerNorm; decoder tied, no bias, no prediction head
    # (skip_head_transform: True).
    H, V = 768, 32768
    per_layer = H * 3 * H + H * H + H * 3072 + 1536 * H + 2 * 2 * H
    cramming = V * H + 2 * H + 16 * per_layer + 2 * H
    assert cramming == 119_589_888
    ours = meta_model(cfg).num_params()
    # the only difference: our LayerNorms have no bias (16 x 2 + 2 norms of 768)
    assert cramming - ours == (16 * 2 + 2) * H
    assert abs(ours - cramming) / cramming < 0.001
    blocks = ours - V * H - 2 * H
    assert round(blocks / 1e6, 1) == 94.4


def test_gpt_124m_has_nanogpts_parameter_count():
    cfg = load_recipe("gpt-124m-1gpu").model
    cfg.vocab_size = 50257
    # nanoGPT GPT(bias=False).get_num_params(): wte 50304x768 (tied), per block ln_1, c_attn 768x2304, c_proj 768x768,
    # ln_2, c_fc 768x3072, c_proj 3072x768; ln_f; the position table wpe is excluded from its count
    per_block = 768 + 768 * 2304 + 768 * 768 + 768 + 768 * 3072 + 3072 * 768
    nanogpt = 50304 * 768 + 12 * per_block + 768
    assert meta_model(cfg).num_params() == nanogpt == 123_587_328
    train = load_recipe("gpt-124m-1gpu").train
    assert train.batch_tokens == 12 * 1024 * 40 and (train.lr, train.beta2, train.weight_decay, train.grad_clip) == (6e-4, 0.95, 0.1, 1.0)


def tiny(**kw) -> ModelConfig:
    base = dict(objective="masked", n_layer=2, n_head=4, n_embd=64, vocab_size=100, seq_len=32, mlp="geglu", norm="layernorm")
    base.update(kw)
    return ModelConfig(**base)


def test_embed_norm_is_a_clean_initialised_module_that_changes_outputs_and_trains():
    torch.manual_seed(0)
    plain = Transformer.build(tiny(norm_eps=1e-12))
    torch.manual_seed(0)
    normed = Transformer.build(tiny(embed_norm=True, norm_eps=1e-12))
    names = {n for n, _ in normed.named_parameters()} - {n for n, _ in plain.named_parameters()}
    assert names == {"embed_norm.weight"}
    assert torch.equal(normed.embed_norm.weight, torch.ones(64))
    assert normed.num_params() == plain.num_params() + 64
    normed.load_state_dict({**plain.state_dict(), "embed_norm.weight": torch.ones(64)})  # same weights otherwise
    idx = torch.randint(0, 100, (2, 32))
    assert not torch.allclose(plain(idx), normed(idx))
    # the normalised embedding has unit RMS per position before the first block
    h = normed.embed_norm(normed.tok_embeddings(idx))
    assert torch.allclose(h.pow(2).mean(-1), torch.ones(2, 32), atol=1e-3)
    targets = torch.full((2, 32), IGNORE_INDEX)
    targets[:, ::4] = idx[:, ::4]
    opt = torch.optim.AdamW(normed.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = compute_loss(normed, idx, targets)
        loss.backward()
        assert normed.embed_norm.weight.grad is not None
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and math.isfinite(losses[-1])
    assert not torch.equal(normed.embed_norm.weight, torch.ones(64))


def test_embed_norm_is_refused_by_the_hugging_face_map():
    with pytest.raises(ValueError, match="embed_norm"):
        llama_config_kwargs(ModelConfig(vocab_size=100, embed_norm=True))
