"""Value embeddings and the smear: what they add to the model, where their parameters train, that
cached decoding sees exactly what a full forward pass sees, and what refuses them."""

import pytest
import torch

from budgetlm.config import ModelConfig, TrainConfig
from budgetlm.errors import UserError
from budgetlm.generate import KVCache
from budgetlm.memory import count_params
from budgetlm.model import Transformer, compute_loss, value_embedding_layers
from budgetlm.optim import build_optimizer

FEATURES = {"value_embeddings": "all", "smear": True}


def tiny(seed=0, live=True, **overrides) -> Transformer:
    cfg = dict(n_layer=3, n_head=4, n_kv_head=2, n_embd=32, vocab_size=100, seq_len=24, qk_norm=True, tie_embeddings=False)
    torch.manual_seed(seed)
    model = Transformer.build(ModelConfig(**{**cfg, **overrides})).eval()
    if live:  # the gates start at zero (no smear): give them values, as training would
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "gate" in name or "smear" in name:
                    p.normal_(0, 0.5)
    return model


def test_blocks_with_value_embeddings_and_parameter_counts():
    assert value_embedding_layers(ModelConfig(n_layer=4, value_embeddings="alternate")) == [1, 3]  # ending with the last
    assert value_embedding_layers(ModelConfig(n_layer=3, value_embeddings="alternate")) == [0, 2]
    assert value_embedding_layers(ModelConfig(n_layer=3, value_embeddings="all")) == [0, 1, 2]
    assert value_embedding_layers(ModelConfig(n_layer=3)) == []
    for kw in ({}, FEATURES, {"value_embeddings": "alternate"}):
        model = tiny(live=False, **kw)
        assert count_params(model.cfg).total == model.num_params()
        # tables are lookups: the non-embedding count (what the scaling rules read) does not grow with them
        assert model.num_params(exclude_embeddings=True) - tiny(live=False).num_params(exclude_embeddings=True) < 400
    pruned = tiny(live=False, value_embeddings="all", layer_heads=[4, 2, 4])
    assert pruned.value_embeddings["1"].weight.shape == (128, 8)  # as wide as that block's one key/value head


def test_the_smear_starts_off_and_the_features_change_the_model_once_trained():
    plain, smear = tiny(live=False), tiny(live=False, smear=True)
    x = torch.randint(0, 100, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(smear(x), plain(x))  # the same weights by name; scale and gate at zero
        assert not torch.allclose(tiny(smear=True)(x), plain(x), atol=1e-3)
        assert not torch.allclose(tiny(live=False, value_embeddings="all")(x), plain(x), atol=1e-3)  # gates at 1 add the tables


def test_causal_with_both_features():
    model = tiny(**FEATURES)
    x = torch.randint(0, 100, (1, 24))
    y = x.clone()
    y[0, 12] = (x[0, 12] + 1) % 100
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:14], b[:, 12:14], atol=1e-4)  # the changed token, and the smear carries it one further


def test_cached_decoding_equals_the_full_forward_pass():
    model = tiny(**FEATURES)
    seq = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        full = model(seq)
        cache = KVCache.for_model(model, batch_size=2)
        torch.testing.assert_close(model(seq[:, :8], kv_cache=cache, start_pos=0), full[:, :8], atol=1e-5, rtol=1e-5)
        for t in range(8, 12):  # one token at a time: the smear reads the previous embedding from the cache
            torch.testing.assert_close(model(seq[:, t : t + 1], kv_cache=cache, start_pos=t)[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(seq[:, 12:20], kv_cache=cache, start_pos=12), full[:, 12:20], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="model.smear needs the previous token's embedding"):
            model(seq[:, 5:6], start_pos=5)  # no cache to read it from


def test_every_new_parameter_learns_in_its_optimizer_group():
    model = tiny(live=False, **FEATURES).train()
    cfg = TrainConfig(optimizer="muon", lr=0.01, embedding_lr_ratio=3.0)
    opt = build_optimizer(model, cfg, "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    group_of = {names[id(p)]: g for g in opt.param_groups for p in g["params"]}
    assert group_of["value_embeddings.0.weight"].get("lr_ratio") == 3.0  # an embedding: the embedding's rate, no decay
    assert group_of["value_embeddings.0.weight"]["weight_decay"] == 0.0
    assert "momentum" in group_of["layers.0.attention.ve_gate.weight"]  # a hidden matrix: Muon
    assert group_of["smear.scale"]["weight_decay"] == 0.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, 100, (4, 25))
    for _ in range(3):
        compute_loss(model, x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    for name in ("value_embeddings.2.weight", "layers.1.attention.ve_gate.weight", "smear.scale", "smear.gate.weight"):
        assert not torch.equal(before[name], dict(model.named_parameters())[name]), name


def test_exports_take_causal_models_with_them_and_refuse_the_rest_by_name():
    """Hugging Face export carries them in a modeling file (tests/test_export_hf.py checks its logits); a masked
    model with them and GGUF (llama.cpp has neither) are refused with the settings that make the model exportable."""
    from budgetlm.export.gguf import check_gguf_compatible
    from budgetlm.export.hf import hf_family

    assert hf_family(ModelConfig(value_embeddings="all")) == hf_family(ModelConfig(qk_norm=True, smear=True)) == "qwen3_token_features"
    with pytest.raises(UserError, match="model.smear=True.*--set model.value_embeddings=none --set model.smear=false"):
        hf_family(ModelConfig(objective="masked", smear=True))
    with pytest.raises(UserError, match="cannot export to GGUF: model.value_embeddings='alternate'.*--format hf"):
        check_gguf_compatible(ModelConfig(value_embeddings="alternate"), tokenizer=None)  # refused before the tokenizer is read

