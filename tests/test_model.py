"""The Transformer: shapes, causality, meta build + init, tying, names, sparse masked loss, FLOPs."""

import math

import pytest
import torch
import torch.nn.functional as F

from budgetlm.config import ModelConfig
from budgetlm.model import IGNORE_INDEX, Transformer, compute_loss, ffn_hidden_size, lm_loss, padded_vocab_size


def tiny(**overrides) -> ModelConfig:
    base = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=100, seq_len=32)
    base.update(overrides)
    return ModelConfig(**base)


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer.build(cfg, "cpu")


def test_padded_vocab_and_ffn_sizes():
    assert padded_vocab_size(100) == 128 and padded_vocab_size(128) == 128 and padded_vocab_size(50257) == 50304
    assert ffn_hidden_size(tiny()) == 192  # 8/3 * 64 = 170.7 -> 192
    assert ffn_hidden_size(tiny(mlp="gelu")) == 256
    assert ffn_hidden_size(tiny(ffn_hidden=100)) == 100


@pytest.mark.parametrize("objective, mlp, norm", [("causal", "swiglu", "rmsnorm"), ("masked", "geglu", "layernorm"), ("causal", "gelu", "rmsnorm")])
def test_shapes_and_loss(objective, mlp, norm):
    model = build(tiny(objective=objective, mlp=mlp, norm=norm))
    idx = torch.randint(0, 100, (3, 32))
    logits = model(idx)
    assert logits.shape == (3, 32, 128) and logits.dtype == torch.float32
    targets = torch.randint(0, 100, (3, 32))
    targets[:, ::2] = IGNORE_INDEX
    loss = compute_loss(model, idx, targets)
    assert loss.dim() == 0 and torch.isfinite(loss)
    # a freshly initialised model predicts near-uniformly over the padded vocabulary
    assert abs(loss.item() - math.log(128)) < 1.0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_rejects_contexts_longer_than_seq_len():
    model = build(tiny())
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("n_kv_head, qk_norm", [(0, False), (2, True)])
def test_causal_model_does_not_look_ahead(n_kv_head, qk_norm):
    model = build(tiny(n_kv_head=n_kv_head, qk_norm=qk_norm)).eval()
    idx = torch.randint(0, 100, (2, 32))
    changed = idx.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 100
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_masked_model_looks_both_ways():
    model = build(tiny(objective="masked", mlp="geglu", norm="layernorm")).eval()
    idx = torch.randint(0, 100, (2, 32))
    changed = idx.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 100
    assert not torch.allclose(model(idx)[:, :20], model(changed)[:, :20])


def test_meta_build_is_deterministic_and_initialised():
    cfg = tiny(n_layer=4)
    a, b, c = build(cfg, seed=1), build(cfg, seed=1), build(cfg, seed=2)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.layers["0"].attention.wq.weight, c.layers["0"].attention.wq.weight)
    assert not any(p.is_meta for p in a.parameters()) and not a.rope_cos.is_meta
    # N(0, 0.02) matrices, residual projections scaled by 1/sqrt(2 n_layer), norms at one
    assert a.layers["0"].attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert a.layers["0"].feed_forward.w2.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.1)
    assert torch.equal(a.norm.weight, torch.ones(64))
    # rotary tables match an eager (non-meta) construction
    torch.manual_seed(1)
    eager = Transformer(cfg)
    torch.testing.assert_close(a.rope_cos, eager.rope_cos)
    torch.testing.assert_close(a.rope_sin, eager.rope_sin)


def test_tied_and_untied_embeddings():
    tied = build(tiny())
    assert tied.output.weight is tied.tok_embeddings.weight
    assert tied.output.weight.data_ptr() == tied.tok_embeddings.weight.data_ptr()
    untied = build(tiny(tie_embeddings=False))
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert untied.num_params() - tied.num_params() == 128 * 64


def test_parameter_names_follow_llama():
    names = set(dict(build(tiny(tie_embeddings=False, qk_norm=True)).named_parameters()))
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    for i in range(2):
        expected |= {f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")}
        expected |= {f"layers.{i}.attention.{w}.weight" for w in ("q_norm", "k_norm")}
        expected |= {f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
        expected |= {f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"}
    assert names == expected
    assert list(build(tiny()).layers.keys()) == ["0", "1"]
    assert not any(k.startswith("rope") for k in build(tiny()).state_dict())  # derived, not saved


def test_masked_sparse_loss_equals_dense_reference():
    model = build(tiny(objective="masked", mlp="geglu", norm="layernorm")).eval()
    idx = torch.randint(0, 100, (4, 32))
    targets = torch.full_like(idx, IGNORE_INDEX)
    chosen = torch.rand(idx.shape) < 0.25
    targets[chosen] = torch.randint(0, 100, (int(chosen.sum()),))
    sparse_logits = model(idx, targets=targets)  # only the masked positions are projected
    assert sparse_logits.shape == (int(chosen.sum()), 128)
    sparse = lm_loss(sparse_logits, targets)
    dense_logits = model(idx)  # every position through norm + output
    reference = F.cross_entropy(dense_logits[chosen], targets[chosen])
    torch.testing.assert_close(sparse, reference, atol=1e-5, rtol=1e-5)
    # gradients agree too
    sparse.backward()
    g_sparse = model.tok_embeddings.weight.grad.clone()
    model.zero_grad()
    F.cross_entropy(model(idx)[chosen], targets[chosen]).backward()
    torch.testing.assert_close(g_sparse, model.tok_embeddings.weight.grad, atol=1e-6, rtol=1e-4)


def test_causal_loss_is_shifted_cross_entropy():
    model = build(tiny()).eval()
    window = torch.randint(0, 100, (2, 33))
    idx, targets = window[:, :-1], window[:, 1:]
    logits = model(idx)
    torch.testing.assert_close(compute_loss(model, idx, targets), F.cross_entropy(logits.reshape(-1, 128), targets.reshape(-1)))
    torch.testing.assert_close(model(idx, targets=targets), logits)  # the causal objective projects every position


def test_flops_per_token_formula():
    for tie in (True, False):
        cfg = tiny(tie_embeddings=tie, n_kv_head=2)
        model = build(cfg)
        C, L, V = 64, 2, 128
        hidden = ffn_hidden_size(cfg)
        per_layer = C * C * 2 + C * (C // 2) * 2 + 3 * C * hidden + 2 * C  # wq, wo, wk, wv (GQA), w1-3, two norms
        N = L * per_layer + C + V * C  # blocks, final norm, output projection
        assert model.num_params(exclude_embeddings=True) == N - (V * C if tie else 0)
        assert model.flops_per_token(32) == 6 * N + 12 * L * C * 32
        assert model.flops_per_token() == model.flops_per_token(32)


def test_dropout_only_in_training():
    model = build(tiny(dropout=0.5))
    idx = torch.randint(0, 100, (2, 16))
    model.eval()
    torch.testing.assert_close(model(idx), model(idx))
    model.train()
    assert not torch.allclose(model(idx), model(idx))


def test_config_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(tiny(vocab_size=0))
    with pytest.raises(ValueError, match="n_kv_head"):
        Transformer(tiny(n_kv_head=3))
    with pytest.raises(ValueError, match="mlm_head"):
        Transformer(tiny(mlm_head=True))  # a causal model has no masked-LM head
    with pytest.raises(ValueError, match="embed_norm"):
        Transformer(tiny(objective="masked", first_attention_norm=False))  # the first block would read raw embeddings


def test_modernbert_layout_options():
    """first_attention_norm=false: block 0 reads the normalised embeddings as they are; mlm_head: norm(GELU(dense(h)))
    before the decoder, in the sparse (training) path as in the dense one."""
    cfg = tiny(objective="masked", mlp="geglu", norm="layernorm", embed_norm=True, first_attention_norm=False, mlm_head=True)
    model = build(cfg).eval()
    names = set(model.state_dict())
    assert "layers.0.attention_norm.weight" not in names and "layers.1.attention_norm.weight" in names
    assert {"mlm_head.dense.weight", "mlm_head.norm.weight"} <= names
    idx = torch.randint(0, 100, (2, 32))
    with torch.no_grad():
        x = model.embed_norm(model.tok_embeddings(idx))
        cos, sin = model.rope_cos[:32], model.rope_sin[:32]
        block = model.layers["0"]
        x = x + block.attention(x, cos, sin)  # no norm in front of the first block's attention
        x = x + block.feed_forward(block.ffn_norm(x))
        x = model.layers["1"](x, cos, sin)
        h = F.layer_norm(F.gelu(model.mlm_head.dense(model.norm(x))), (64,), model.mlm_head.norm.weight, None, cfg.norm_eps)
        torch.testing.assert_close(model(idx), model.output(h), atol=1e-5, rtol=0)
        targets = torch.full_like(idx, IGNORE_INDEX)
        targets[:, ::5] = 7
        torch.testing.assert_close(model(idx, targets=targets), model(idx)[:, ::5].reshape(-1, 128), atol=1e-5, rtol=0)


def test_initialisation_does_not_depend_on_layout():
    """Each matrix is drawn from its own (seed, name) generator: a model missing layers (a pipeline
    stage) or wrapped for activation checkpointing gets exactly the single-process values."""
    from budgetlm.distributed.parallelize import apply_ac

    whole = Transformer.build(tiny(n_layer=3, tie_embeddings=False), seed=5)
    stage = Transformer.on_meta(tiny(n_layer=3, tie_embeddings=False))
    del stage.layers["0"]
    stage.tok_embeddings = None
    apply_ac(stage, "full")
    stage.materialize("cpu", seed=5)
    got = stage.state_dict()
    assert set(got) == {k for k in whole.state_dict() if not k.startswith(("layers.0.", "tok_embeddings"))}
    for name, t in got.items():
        assert torch.equal(t, whole.state_dict()[name]), name


def test_heads_per_rank_come_from_the_weights():
    """A tensor-parallel rank holds a column slice of wq/wk/wv (fewer heads) and a row slice of wo:
    attention infers its head count from those shapes, so the sliced module computes its share."""
    model = build(tiny(n_kv_head=2)).eval()
    attn = model.layers["0"].attention
    x = torch.randn(2, 8, 64)
    cos, sin = model.rope_cos[:8], model.rope_sin[:8]
    full = attn(x, cos, sin)
    hs = attn.head_dim
    parts = []
    for r in range(2):  # two ranks: 2 of 4 query heads, 1 of 2 key/value heads each
        shard = type(attn)(model.cfg, 0)
        q, kv = slice(r * 2 * hs, (r + 1) * 2 * hs), slice(r * hs, (r + 1) * hs)
        shard.wq.weight = torch.nn.Parameter(attn.wq.weight[q])
        shard.wk.weight = torch.nn.Parameter(attn.wk.weight[kv])
        shard.wv.weight = torch.nn.Parameter(attn.wv.weight[kv])
        shard.wo.weight = torch.nn.Parameter(attn.wo.weight[:, q])
        parts.append(shard(x, cos, sin))
    torch.testing.assert_close(parts[0] + parts[1], full, atol=1e-5, rtol=1e-5)


def test_logit_softcap_bounds_the_logits_and_is_the_tanh_formula():
    raw = build(tiny(init_std=0.5)).eval()  # large weights: raw logits well beyond the cap
    capped = build(tiny(init_std=0.5, logit_softcap=3.0)).eval()
    capped.load_state_dict(raw.state_dict())
    idx = torch.randint(0, 100, (2, 32))
    r, c = raw(idx), capped(idx)
    assert r.abs().max() > 6.0  # the cap bites
    assert c.abs().max() < 3.0
    torch.testing.assert_close(c, 3.0 * torch.tanh(r / 3.0))
    # the masked objective's sparse logits are capped the same way
    m_raw, m_cap = (build(tiny(objective="masked", init_std=0.5, logit_softcap=s)).eval() for s in (0.0, 3.0))
    m_cap.load_state_dict(m_raw.state_dict())
    targets = torch.full_like(idx, IGNORE_INDEX)
    targets[:, ::3] = 7
    torch.testing.assert_close(m_cap(idx, targets=targets), 3.0 * torch.tanh(m_raw(idx, targets=targets) / 3.0))
    with pytest.raises(ValueError, match="logit_softcap"):
        Transformer(tiny(logit_softcap=-1.0))


def test_z_loss_value_and_gradient():
    torch.manual_seed(0)
    logits = (3 * torch.randn(4, 6, 50, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 50, (4, 6))
    targets[:, ::4] = IGNORE_INDEX
    keep = targets != IGNORE_INDEX

    def reference(x):
        lse = torch.logsumexp(x[keep], dim=-1)
        return F.cross_entropy(x[keep], targets[keep]) + 1e-2 * lse.square().mean()

    ours = lm_loss(logits, targets, z_loss=1e-2)
    ref = reference(logits)
    torch.testing.assert_close(ours, ref.float())
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_ours, g_ref.float().to(g_ours.dtype), atol=1e-7, rtol=1e-5)
    # the z term pulls log Z towards 0: its own gradient is 2 c log Z softmax(x) per kept row
    lse = torch.logsumexp(logits.detach(), dim=-1)
    (g_z,) = torch.autograd.grad(lm_loss(logits, targets, z_loss=1e-2) - lm_loss(logits, targets), logits)
    expected = 2 * 1e-2 * lse.unsqueeze(-1) * torch.softmax(logits.detach(), -1) * keep.unsqueeze(-1) / keep.sum()
    torch.testing.assert_close(g_z, expected.float().to(g_z.dtype), atol=1e-7, rtol=1e-4)
    # off: exactly the cross-entropy
    assert torch.equal(lm_loss(logits, targets), F.cross_entropy(logits.reshape(-1, 50).float(), targets.reshape(-1)))
    # sparse masked logits (M, V) pair with the (B, T) targets as without the z term
    sparse = logits.detach()[keep]
    torch.testing.assert_close(lm_loss(sparse, targets, z_loss=1e-2), ref.detach().float())


@pytest.mark.parametrize("objective, n_kv_head, autocast", [("causal", 0, False), ("causal", 2, True), ("masked", 0, False)])
def test_explicit_attention_equals_sdpa(objective, n_kv_head, autocast):
    """The CPU fast path for short contexts computes what SDPA computes: same loss, same gradients."""
    losses, grads = [], []
    idx, targets = torch.randint(0, 100, (3, 32)), torch.randint(0, 100, (3, 32))
    for kernel in ("sdpa", "explicit"):
        model = build(tiny(objective=objective, n_kv_head=n_kv_head, attention=kernel))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = compute_loss(model, idx, targets)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    tol = 2e-2 if autocast else 1e-5  # bf16 rounds the two orders of operations differently
    assert losses[0] == pytest.approx(losses[1], rel=tol)
    assert torch.allclose(grads[0], grads[1], rtol=tol, atol=tol * grads[0].abs().max().item())


def test_auto_attention_takes_the_explicit_path_only_for_short_cpu_training_contexts(monkeypatch):
    import budgetlm.model as model_module

    calls = []
    real = model_module.explicit_attention
    monkeypatch.setattr(model_module, "explicit_attention", lambda *a: calls.append(a[0].size(-2)) or real(*a))
    model = build(tiny(seq_len=model_module.EXPLICIT_MAX_KEYS + 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 100, (1, 16)))
        model(torch.randint(0, 100, (1, model_module.EXPLICIT_MAX_KEYS + 64)))  # too long: SDPA
        build(tiny(attention="sdpa"))(torch.randint(0, 100, (1, 16)))
    model(torch.randint(0, 100, (1, 16)))  # fp32: SDPA
    assert calls == [16, 16]  # one call per layer for the short bf16 context, none otherwise


@pytest.mark.parametrize("affine, eps", [(True, 1e-5), (False, None)])
@pytest.mark.parametrize("shape", [(3, 7, 32), (2, 4, 5, 16)], ids=["block", "qk-norm"])
def test_rms_norm_values_and_gradients_equal_torch(shape, affine, eps):
    from budgetlm.model import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], eps=eps, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.add_(0.1 * torch.randn(shape[-1]))
    x = torch.randn(shape, requires_grad=True)
    grad_out = torch.randn(shape)
    ours = norm(x)
    ref = F.rms_norm(x, (shape[-1],), norm.weight, eps)
    params = (x, norm.weight) if affine else (x,)
    for a, b in zip(torch.autograd.grad(ours, params, grad_out), torch.autograd.grad(ref, params, grad_out)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, ref)
    assert ours.grad_fn.name().startswith("_RMSNormCPU")  # eager fp32 training on a CPU takes the written-out backward
    with torch.no_grad():
        torch.testing.assert_close(norm(x), ref)
