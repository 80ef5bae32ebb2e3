"""The chunked output projection + cross-entropy: same loss and gradients as the plain way."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import budgetlm.linear_cross_entropy as lce
from budgetlm.config import ModelConfig
from budgetlm.model import IGNORE_INDEX, Transformer, compute_loss, lm_loss


def plain(h, w, targets, z_loss=0.0):
    return lm_loss(h @ w.t(), targets, z_loss)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(lce, "CHUNK_ELEMENTS", 64 * 16)  # 16 rows of a 64-entry vocabulary per chunk


@pytest.mark.parametrize("exp2", [False, True], ids=["exp", "exp2"])
@pytest.mark.parametrize("in_loop", [False, True], ids=["products-after-the-loop", "products-per-chunk"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_loss_and_gradients_equal_the_plain_way_across_chunks(small_chunks, monkeypatch, z_loss, in_loop, exp2):
    monkeypatch.setattr(lce, "IN_LOOP_MIN_ROWS", 1 if in_loop else 1 << 30)
    monkeypatch.setattr(lce, "exp2_is_faster", lambda: exp2)
    torch.manual_seed(0)
    h = torch.randn(50, 24, requires_grad=True)  # 50 rows: three whole chunks and a partial one
    w = torch.randn(64, 24, requires_grad=True)
    targets = torch.randint(0, 64, (50,))
    targets[::7] = IGNORE_INDEX
    ours = lce.linear_cross_entropy(h, w, targets, z_loss)
    gh, gw = torch.autograd.grad(3 * ours, (h, w))  # the incoming gradient scales the stored ones
    ref = plain(h, w, targets, z_loss)
    rh, rw = torch.autograd.grad(3 * ref, (h, w))
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gh, rh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, rw, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_matches_the_plain_way_within_bf16_rounding(small_chunks):
    torch.manual_seed(0)
    h = torch.randn(40, 32, requires_grad=True)
    w = (0.1 * torch.randn(64, 32)).requires_grad_()
    targets = torch.randint(0, 64, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = lce.linear_cross_entropy(h, w, targets)
        ref = plain(h, w, targets)
    assert ours.dtype == torch.float32
    gh, gw = torch.autograd.grad(ours, (h, w))
    rh, rw = torch.autograd.grad(ref, (h, w))
    assert gh.dtype == h.dtype and gw.dtype == w.dtype  # gradients come back in the inputs' dtypes
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(gh, rh, atol=2e-2 * rh.abs().max().item(), rtol=2e-2)
    torch.testing.assert_close(gw, rw, atol=2e-2 * rw.abs().max().item(), rtol=2e-2)


@pytest.mark.parametrize("in_loop", [False, True], ids=["products-after-the-loop", "products-per-chunk"])
def test_without_grad_only_the_loss_is_computed(small_chunks, monkeypatch, in_loop):
    """Evaluation runs under no_grad with weights that require grad: one matmul (the logits), not three."""
    monkeypatch.setattr(lce, "IN_LOOP_MIN_ROWS", 1 if in_loop else 1 << 30)
    h, w = torch.randn(48, 8, requires_grad=True), torch.randn(64, 8, requires_grad=True)
    targets = torch.randint(0, 64, (48,))
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        loss = lce.linear_cross_entropy(h, w, targets)
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.t(), targets))
    assert not loss.requires_grad
    assert flops.get_total_flops() == 2 * 48 * 8 * 64


@pytest.mark.parametrize("objective, tie", [("causal", True), ("causal", False), ("masked", False)])
def test_model_loss_takes_the_chunked_path_and_equals_the_plain_one(monkeypatch, objective, tie):
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=100, seq_len=16, objective=objective, tie_embeddings=tie)
    idx = torch.randint(0, 100, (3, 16))
    targets = torch.randint(0, 100, (3, 16))
    if objective == "masked":
        targets[torch.rand(targets.shape) < 0.7] = IGNORE_INDEX
    calls = []
    real = lce.linear_cross_entropy
    monkeypatch.setattr("budgetlm.model.linear_cross_entropy", lambda *a: calls.append(1) or real(*a))
    results = []
    for chunked in (True, False):
        monkeypatch.setattr(Transformer, "_chunked_loss_ok", lambda self, c=chunked: c)
        torch.manual_seed(0)
        model = Transformer.build(cfg)
        loss = compute_loss(model, idx, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert calls == [1]
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-6, rtol=1e-4, msg=name)
