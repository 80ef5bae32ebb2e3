"""Parameter groups, optimizer construction and the progress-driven schedules."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from budgetlm.config import TrainConfig
from budgetlm.errors import UserError
from budgetlm.muon import Muon, newton_schulz
from budgetlm.optim import SCHEDULES, batch_size_at, build_optimizer, check_schedule, lr_at, lr_multiplier, param_groups, set_lr


class TinyLM(nn.Module):
    """Embedding, a block with a norm and biased linear, and an output head tied to the embedding."""

    def __init__(self, tie: bool = True):
        super().__init__()
        self.tok_embeddings = nn.Embedding(32, 8)
        self.norm = nn.RMSNorm(8)
        self.proj = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.output = nn.Linear(8, 32, bias=False)
        if tie:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, idx):
        return self.output(self.ln(self.proj(self.norm(self.tok_embeddings(idx)))))


def _ids(params):
    return {id(p) for p in params}


def test_param_groups_split_and_no_duplicates():
    m = TinyLM(tie=True)
    groups = param_groups(m, 0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert _ids(decay["params"]) == {id(m.proj.weight)}
    assert _ids(no_decay["params"]) == _ids([m.tok_embeddings.weight, m.norm.weight, m.proj.bias, m.ln.weight, m.ln.bias])
    every = decay["params"] + no_decay["params"]
    assert len(every) == len(_ids(every)) == len(list(m.parameters()))


def test_tied_embedding_follows_embedding_rule_whatever_the_name_order():
    m = TinyLM(tie=False)
    m.tok_embeddings.weight = m.output.weight  # the head registered the parameter first
    decay, no_decay = param_groups(m, 0.1)
    assert id(m.output.weight) in _ids(no_decay["params"])
    decay, no_decay = param_groups(m, 0.1, decay_embeddings=True)
    assert id(m.output.weight) in _ids(decay["params"])


def test_untied_head_is_decayed_and_frozen_params_are_left_out():
    m = TinyLM(tie=False)
    m.proj.weight.requires_grad_(False)
    decay, no_decay = param_groups(m, 0.1)
    assert _ids(decay["params"]) == {id(m.output.weight)}
    assert id(m.proj.weight) not in _ids(decay["params"] + no_decay["params"])


def test_build_optimizer_steps():
    m = TinyLM()
    cfg = TrainConfig(lr=1e-2, beta2=0.99)
    opt = build_optimizer(m, cfg, "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["betas"] == (0.9, 0.99) and opt.param_groups[0]["lr"] == 1e-2
    before = m.proj.weight.detach().clone()
    m(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    assert not torch.equal(before, m.proj.weight)
    set_lr(opt, 0.5)
    assert all(g["lr"] == 0.5 for g in opt.param_groups)
    with pytest.raises(UserError):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False), cfg, "cpu")


def _cfg(schedule, **kw):
    return TrainConfig(schedule=schedule, lr=1.0, **{"warmup": 0.1, "min_lr_ratio": 0.1, **kw})


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_endpoints(schedule):
    cfg = _cfg(schedule)
    assert lr_at(0.0, cfg) == 0.0
    assert lr_at(0.05, cfg) == pytest.approx(0.5)  # halfway through warm-up
    assert lr_at(0.1, cfg) == pytest.approx(1.0)  # peak at warm-up end
    final = 1.0 if schedule == "constant" else 0.1
    assert lr_at(1.0, cfg) == pytest.approx(final, abs=1e-12)
    assert lr_at(1.5, cfg) == pytest.approx(final, abs=1e-12)  # clamped past the deadline
    assert lr_at(-1.0, cfg) == 0.0


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_monotone_segments(schedule):
    cfg = _cfg(schedule)
    ps = np.linspace(0, 1, 2001)
    lrs = np.array([lr_multiplier(p, cfg) for p in ps])
    warm = ps <= 0.1
    assert np.all(np.diff(lrs[warm]) > 0)
    assert np.all(np.diff(lrs[~warm]) <= 1e-12)
    assert lrs.max() == pytest.approx(1.0)


def test_wsd_plateau_and_cooldown():
    cfg = _cfg("wsd", cooldown=0.2, min_lr_ratio=0.0)
    assert all(lr_multiplier(p, cfg) == 1.0 for p in (0.1, 0.3, 0.5, 0.8))
    assert lr_multiplier(0.9, cfg) == pytest.approx(0.5)
    assert lr_multiplier(1.0, cfg) == 0.0
    # A cooldown longer than what follows warm-up decays from warm-up end.
    long = _cfg("wsd", cooldown=1.0, min_lr_ratio=0.0)
    assert lr_multiplier(0.55, long) == pytest.approx(0.5)
    assert lr_multiplier(0.5, _cfg("wsd", cooldown=0.0)) == 1.0


def test_linear_and_cosine_midpoints_and_no_warmup():
    cfg = _cfg("linear", warmup=0.0, min_lr_ratio=0.0)
    assert lr_multiplier(0.0, cfg) == 1.0 and lr_multiplier(0.25, cfg) == pytest.approx(0.75)
    cos = _cfg("cosine", warmup=0.0, min_lr_ratio=0.0)
    assert lr_multiplier(0.5, cos) == pytest.approx(0.5)
    assert lr_at(0.5, dataclasses.replace(cos, lr=3e-4)) == pytest.approx(1.5e-4)


@pytest.mark.parametrize("bad", [dict(warmup=1.0), dict(warmup=-0.1), dict(cooldown=1.5), dict(min_lr_ratio=2.0), dict(schedule="step")])
def test_schedule_errors(bad):
    with pytest.raises(UserError):
        lr_at(0.5, dataclasses.replace(TrainConfig(), **bad))


def test_batch_ramp():
    cfg = TrainConfig(batch_ramp=0.5)
    # 64 sequences per step in micro-batches of 4 (units of 4).
    assert batch_size_at(0.0, cfg, 64, 4) == 8
    assert batch_size_at(0.25, cfg, 64, 4) == 36  # 8 + 56 * 0.5 = 36
    assert batch_size_at(0.26, cfg, 64, 4) == 36  # 37.12 rounds down to whole micro-batches
    assert batch_size_at(0.5, cfg, 64, 4) == 64
    assert batch_size_at(1.0, cfg, 64, 4) == 64
    sizes = [batch_size_at(p, cfg, 64, 4) for p in np.linspace(0, 1, 101)]
    assert sizes == sorted(sizes) and all(s % 4 == 0 for s in sizes)
    # Never below one unit, and the full batch when the ramp is off.
    assert batch_size_at(0.0, cfg, 16, 8) == 8
    assert batch_size_at(0.0, TrainConfig(batch_ramp=0.0), 64, 4) == 64
    with pytest.raises(ValueError):
        batch_size_at(0.0, cfg, 10, 4)


def _muon_model():
    from budgetlm.config import ModelConfig
    from budgetlm.model import Transformer

    torch.manual_seed(0)
    return Transformer.build(ModelConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=64, seq_len=16))


def _steps(model, opt, n, seed=0, same_batch=False):
    from budgetlm.model import compute_loss

    gen = torch.Generator().manual_seed(seed)
    losses = []
    x = torch.randint(0, 64, (4, 17), generator=gen)
    for _ in range(n):
        if not same_batch:
            x = torch.randint(0, 64, (4, 17), generator=gen)
        loss = compute_loss(model, x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    from budgetlm.optim import HybridOptimizer

    m = _muon_model()
    opt = build_optimizer(m, TrainConfig(optimizer="muon", lr=2e-2), "cpu")
    assert isinstance(opt, HybridOptimizer)
    adamw, muon = opt.optimizers
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    hidden = {id(p) for n, p in m.named_parameters() if n.startswith("layers.") and p.ndim == 2}
    assert _ids(p for g in muon.param_groups for p in g["params"]) == hidden
    assert id(m.tok_embeddings.weight) in _ids(p for g in adamw.param_groups for p in g["params"])
    set_lr(opt, 0.5)  # the loop's lr reaches both children
    assert all(g["lr"] == 0.5 for o in opt.optimizers for g in o.param_groups)
    set_lr(opt, 2e-2)
    losses = _steps(m, opt, 20, same_batch=True)
    assert losses[-1] < 0.5 * losses[0]  # it learns (memorises one batch)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs PyTorch >= 2.9")
@pytest.mark.parametrize("adjust_lr_fn, nesterov", [("match_rms_adamw", True), ("original", False)])
def test_batched_muon_equals_torch_muon(adjust_lr_fn, nesterov):
    """Same update as torch.optim.Muon, with tall, wide and square matrices stacked together."""
    shapes = [(24, 8), (8, 24), (16, 16), (24, 8), (16, 16), (8, 8)]
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    results = []
    for cls in (Muon, torch.optim.Muon):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opt = cls(params, lr=0.05, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        results.append(params)
    for ours, theirs, before in zip(*results, start):
        assert (ours - before).abs().max() > 0.01  # it moved
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-3)  # bf16 Newton-Schulz, batched or one by one


def test_muon_iterates_in_fp32_on_cpus_that_train_in_fp32():
    """A CPU training in fp32 is one without fast bf16 matmuls: Newton-Schulz runs in fp32 there, and its
    update is torch's bf16 one up to bf16 rounding (the iteration is the same; only the arithmetic differs)."""
    from budgetlm.optim import newton_schulz_dtype

    assert newton_schulz_dtype("fp32", "cpu") == torch.float32 and newton_schulz_dtype("auto", "cpu") == torch.float32
    assert newton_schulz_dtype("bf16", "cpu") == torch.bfloat16
    m = _muon_model()
    by_precision = {p: build_optimizer(m, TrainConfig(optimizer="muon", precision=p), "cpu").optimizers[1].ns_dtype for p in ("fp32", "bf16")}
    assert by_precision == {"fp32": torch.float32, "bf16": torch.bfloat16}

    gen = torch.Generator().manual_seed(0)
    g = torch.randn(3, 16, 40, generator=gen)
    fp32, bf16 = newton_schulz(g, dtype=torch.float32), newton_schulz(g, dtype=torch.bfloat16)
    assert fp32.dtype == torch.float32
    torch.testing.assert_close(fp32, bf16.float(), rtol=0, atol=0.05)
    singular = torch.linalg.svdvals(fp32)  # near-orthogonal rows: the quintic's singular values land in about [0.7, 1.2]
    assert singular.min() > 0.6 and singular.max() < 1.25


def test_muon_state_round_trips_through_a_checkpoint(tmp_path):
    from budgetlm import checkpoint as ckpt

    cfg = TrainConfig(optimizer="muon", lr=2e-2)
    a = _muon_model()
    opt_a = build_optimizer(a, cfg, "cpu")
    _steps(a, opt_a, 3)
    ckpt.save_checkpoint(tmp_path / "ck", model_state=a.state_dict(), optimizer_state=opt_a.state_dict(), loop_state={"step": 3})
    b = _muon_model()
    opt_b = build_optimizer(b, cfg, "cpu")
    ckpt.load_checkpoint(tmp_path / "ck", b, opt_b, restore_rng=False)
    assert _steps(a, opt_a, 3, seed=1) == _steps(b, opt_b, 3, seed=1)  # momentum buffers and Adam moments restored exactly


def test_adamw8bit_keeps_8_bit_states_and_learns():
    pytest.importorskip("torchao")
    from budgetlm.config import ModelConfig
    from budgetlm.model import Transformer

    torch.manual_seed(0)
    m = Transformer.build(ModelConfig(n_layer=1, n_embd=64, n_head=1, vocab_size=128, seq_len=16))
    opt = build_optimizer(m, TrainConfig(optimizer="adamw8bit", lr=1e-2), "cpu")
    set_lr(opt, 1e-2)  # the loop sets the rate before every step; torchao keeps it as a tensor
    losses = _steps(m, opt, 20, same_batch=True)
    assert losses[-1] < 0.5 * losses[0]
    # torchao quantises tensors of 4096 values or more: the 128 x 64 embedding's moments are 8-bit
    assert "8bit" in type(opt.state[m.tok_embeddings.weight]["exp_avg"]).__name__


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_embedding_and_head_rates_are_multiples_of_the_schedule_and_survive_a_checkpoint(optimizer, tmp_path):
    from budgetlm import checkpoint as ckpt
    from budgetlm.config import ModelConfig
    from budgetlm.model import Transformer

    def model(tie):
        torch.manual_seed(0)
        return Transformer.build(ModelConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=64, seq_len=16, tie_embeddings=tie))

    cfg = TrainConfig(optimizer=optimizer, lr=1e-2, embedding_lr_ratio=8.0, head_lr_ratio=0.5)
    m = model(tie=False)
    opt = build_optimizer(m, cfg, "cpu")
    rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert rate[id(m.tok_embeddings.weight)] == pytest.approx(0.08) and rate[id(m.output.weight)] == pytest.approx(0.005)
    assert rate[id(m.norm.weight)] == rate[id(m.layers["0"].feed_forward.w1.weight)] == pytest.approx(0.01)
    set_lr(opt, 1e-3)  # the schedule scales every group, each keeping its ratio
    rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert rate[id(m.tok_embeddings.weight)] == pytest.approx(8e-3) and rate[id(m.output.weight)] == pytest.approx(5e-4)
    assert rate[id(m.norm.weight)] == pytest.approx(1e-3)
    tied = model(tie=True)  # the shared matrix is the embedding: its rate; a head rate has nothing to act on
    rate = {id(p): g["lr"] for g in build_optimizer(tied, dataclasses.replace(cfg, head_lr_ratio=1.0), "cpu").param_groups for p in g["params"]}
    assert rate[id(tied.output.weight)] == pytest.approx(0.08)
    with pytest.raises(UserError, match="head_lr_ratio needs an output head of its own"):
        build_optimizer(tied, cfg, "cpu")
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(UserError, match="embedding_lr_ratio must be a positive number"):
            check_schedule(dataclasses.replace(cfg, embedding_lr_ratio=bad))
    # the ratios are part of the optimizer's state: a resumed run keeps them
    _steps(m, opt, 2)
    ckpt.save_checkpoint(tmp_path / "ck", model_state=m.state_dict(), optimizer_state=opt.state_dict(), loop_state={"step": 2})
    again = model(tie=False)
    opt_again = build_optimizer(again, cfg, "cpu")
    ckpt.load_checkpoint(tmp_path / "ck", again, opt_again, restore_rng=False)
    set_lr(opt, 2e-3), set_lr(opt_again, 2e-3)
    assert _steps(m, opt, 2, seed=1) == _steps(again, opt_again, 2, seed=1)
    # ratios of 1 keep the groups as before, so older checkpoints still load
    plain = build_optimizer(model(tie=False), TrainConfig(optimizer=optimizer, lr=1e-2), "cpu")
    assert len(plain.param_groups) == (3 if optimizer == "muon" else 2)
