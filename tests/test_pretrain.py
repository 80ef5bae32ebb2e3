"""Budgeted pretraining end to end on tiny configs: run contents, resume, NaN handling, the
budget clock, the masked objective, DDP parity and bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from budgetlm.cli import main
from budgetlm.data.loader import seq_len_at
from budgetlm.model import Transformer
from budgetlm.plan import have_cpp_compiler
from budgetlm.pretrain import pretrain, resolve_config
from budgetlm.run import load_run
from budgetlm.tracking import read_metrics

TINY = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=64",
    "model.seq_len=32",
    "train.batch_tokens=512",
    "train.log_every=1",
    "train.eval_every=0.5",
    "train.eval_tokens=1024",
    "train.lr=3e-3",
    "train.warmup=0.1",
]


def tiny_args(data: Path, out: Path, budget: str, *extra: str) -> list[str]:
    args = ["pretrain", "--data", str(data), "--out", str(out), "--budget", budget]
    for item in [*TINY, *extra]:
        args += ["--set", item]
    return args


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if r["kind"] == "train"}


def subprocess_env() -> dict:
    # one thread each, so several processes on a small CI machine compute the same way every time
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def tiny_run(prepared_bpe, tmp_path_factory):
    run = tmp_path_factory.mktemp("pretrain") / "run"
    assert main(tiny_args(prepared_bpe, run, "steps:20")) == 0
    return run


def test_run_directory_is_complete_and_self_describing(tiny_run):
    for name in ("config.yaml", "tokenizer.json", "env.json", "data.json", "model.safetensors", "metrics.jsonl", "eval.json", "report.md"):
        assert (tiny_run / name).is_file(), name
    assert (tiny_run / "checkpoint" / "state.json").is_file()
    assert {p.name for p in (tiny_run / "plots").iterdir()} >= {"loss.png", "lr.png", "throughput.png"}
    assert any((tiny_run / "tb").iterdir())
    report = (tiny_run / "report.md").read_text()
    assert "val_bpb" in report and "## Samples" in report and "n_layer: 2" in report

    losses = train_losses(tiny_run)
    assert sorted(losses) == list(range(1, 21))
    assert losses[20] < losses[1] - 0.5, losses  # it learns
    evals = [r for r in read_metrics(tiny_run) if r["kind"] == "eval"]
    assert len(evals) >= 2 and evals[-1].get("final")
    train = [r for r in read_metrics(tiny_run) if r["kind"] == "train"]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in train)

    run = load_run(tiny_run)  # everything rebuilds from the directory alone
    assert isinstance(run.model, Transformer) and run.config.model.n_layer == 2


def test_eval_and_generate_commands_read_the_run(tiny_run, capsys, prepared_wordpiece):
    assert main(["eval", str(tiny_run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    final = json.loads((tiny_run / "eval.json").read_text())
    assert metrics["val_loss"] == pytest.approx(final["val_loss"], rel=1e-5)
    assert metrics["val_bpb"] == pytest.approx(metrics["val_loss"] / math.log(2) / _bytes_per_token(tiny_run), rel=1e-6)

    assert main(["generate", str(tiny_run), "--prompt", "KING", "--max-new-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] == "KING" and out["tokens"] == 8

    assert main(["eval", str(tiny_run), "--data", str(prepared_wordpiece)]) == 2
    assert "tokenizer mismatch" in capsys.readouterr().err


def _bytes_per_token(run: Path) -> float:
    data = json.loads((run / "data.json").read_text())["splits"]["val"]
    return data["bytes"] / data["tokens"]


CANDIDATES = ["train.seq_warmup=0.5", "train.z_loss=1e-3", "model.logit_softcap=10"]


@pytest.mark.parametrize("options", [[], CANDIDATES], ids=["defaults", "seq-warmup-z-loss-softcap"])
def test_resume_after_kill_matches_uninterrupted(prepared_bpe, tmp_path, options):
    """SIGKILL a run mid-way (checkpointing every step), resume it, and get the same losses."""
    budget, extra = "steps:40", ["train.checkpoint_every=0", *options]
    cmd = [sys.executable, "-m", "budgetlm"]
    full = tmp_path / "full"
    subprocess.run(cmd + tiny_args(prepared_bpe, full, budget, *extra), env=subprocess_env(), check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        cmd + tiny_args(prepared_bpe, killed, budget, *extra), env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and max(train_losses(killed), default=0) < 8 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "model.safetensors").exists(), "the run ended before it was killed"

    subprocess.run(cmd + ["pretrain", "--resume", str(killed)], env=subprocess_env(), check=True, capture_output=True)
    a, b = train_losses(full), train_losses(killed)
    assert sorted(b) == sorted(a) == list(range(1, 41))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-6, [(s, a[s], b[s]) for s in a if a[s] != b[s]][:3]
    assert torch.equal(load_run(full).model.output.weight, load_run(killed).model.output.weight)

    assert main(["pretrain", "--resume", str(killed)]) == 0  # a finished run says so and exits cleanly
    if options:  # the killed run resumed mid-warm-up: every step trained at the scheduled length
        lengths = {r["step"]: r["seq_len"] for r in read_metrics(killed) if r["kind"] == "train"}
        assert lengths == {s: seq_len_at((s - 1) / 40, 0.5, 32) for s in range(1, 41)}
        assert set(lengths.values()) == {4, 8, 16, 32}
        assert {r["tokens"] - 512 * r["step"] for r in read_metrics(killed) if r["kind"] == "train"} == {0}  # same tokens per batch


def test_candidates_change_training_and_evaluate_plain_cross_entropy(prepared_bpe, tmp_path):
    """Each option alters the trained weights; evaluation stays the cross-entropy of the (capped) logits."""
    runs = {}
    for name, option in [("base", None), *((o.split("=")[0], o) for o in CANDIDATES)]:
        cfg = resolve_config(None, "steps:6", [*TINY, "train.eval_every=0", *([option] if option else [])], str(prepared_bpe))
        pretrain(cfg, tmp_path / name)
        runs[name] = load_run(tmp_path / name)
    w = {k: r.model.output.weight for k, r in runs.items()}
    assert all(not torch.equal(w["base"], w[k]) for k in w if k != "base")
    run = runs["model.logit_softcap"]
    assert run.config.model.logit_softcap == 10
    x = torch.randint(0, 512, (2, 32))
    assert run.model(x).abs().max() < 10
    ev = json.loads((tmp_path / "train.z_loss" / "eval.json").read_text())
    assert math.isfinite(ev["val_loss"])


@pytest.mark.skipif(not have_cpp_compiler(), reason="torch.compile on CPU needs a C++ compiler and Python's headers")
def test_compiled_model_and_loss_train_like_eager(prepared_bpe, tmp_path):
    """train.compile=true on one process compiles the model and its loss as one graph: same losses."""
    losses = {}
    for mode in ("false", "true"):
        run = tmp_path / mode
        assert main(tiny_args(prepared_bpe, run, "steps:4", f"train.compile={mode}", "train.precision=fp32")) == 0
        losses[mode] = train_losses(run)
    assert sorted(losses["true"]) == [1, 2, 3, 4]
    assert all(abs(losses["true"][s] - losses["false"][s]) < 1e-4 for s in losses["false"]), losses


def test_nonfinite_losses_are_skipped_then_rolled_back(prepared_bpe, tmp_path, monkeypatch):
    real_forward = Transformer.forward
    calls = {"n": 0}

    def flaky_forward(self, idx, **kw):
        out = real_forward(self, idx, **kw)
        calls["n"] += 1
        if kw.get("targets") is not None and self.training and calls["n"] in (5, 6, 7):
            return out * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", flaky_forward)
    cfg = resolve_config(None, "steps:10", [*TINY, "train.max_nan_skips=3", "train.eval_every=0"], str(prepared_bpe))
    summary = pretrain(cfg, tmp_path / "run")
    events = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "event"]
    assert [e["event"] for e in events].count("nonfinite_loss") == 3
    rollback = [e for e in events if e["event"] == "rollback"]
    assert len(rollback) == 1 and rollback[0]["lr_scale"] == 0.5
    assert summary["steps"] == 10 and summary["nan_skips_rollbacks"] == 1
    weights = load_run(tmp_path / "run").model.state_dict().values()
    assert all(torch.isfinite(w).all() for w in weights)


def test_wall_clock_budget_ends_within_a_few_percent(prepared_bpe, tmp_path):
    limit = 8.0
    cfg = resolve_config(None, f"{limit}s", [*TINY, "train.eval_every=0.5"], str(prepared_bpe))
    summary = pretrain(cfg, tmp_path / "run")
    assert limit * 0.9 <= summary["elapsed_s"] <= limit * 1.03, summary
    train = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert train[-1]["progress"] > 0.8  # the schedule ran (nearly) to its end at the deadline


def test_masked_objective_trains_with_sparse_prediction(prepared_wordpiece, tmp_path):
    cfg = resolve_config(None, "steps:8", [*TINY, "model.objective=masked", "model.mlp=geglu", "model.norm=layernorm"], str(prepared_wordpiece))
    summary = pretrain(cfg, tmp_path / "run")
    assert "val_bpb" not in summary and math.isfinite(summary["val_loss"])
    losses = train_losses(tmp_path / "run")
    assert losses[8] < losses[1]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(prepared_bpe, tmp_path):
    common = ["steps:6", "train.micro_batch=8", "train.eval_every=0"]
    single = tmp_path / "single"
    single_cmd = [sys.executable, "-m", "budgetlm", *tiny_args(prepared_bpe, single, *common)]
    subprocess.run(single_cmd, env=subprocess_env(), check=True, capture_output=True)
    ddp = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "budgetlm"]
    res = subprocess.run(torchrun + tiny_args(prepared_bpe, ddp, *common), env=subprocess_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = train_losses(single), train_losses(ddp)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4, (a, b)
    wa, wb = load_run(single).model.state_dict(), load_run(ddp).model.state_dict()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4


def test_bad_input_gives_one_line_and_exit_2(prepared_bpe, tmp_path, capsys):
    def fails(args, needle):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err and "Traceback" not in err, err

    fails(tiny_args(tmp_path / "nothing", tmp_path / "r1", "steps:2"), "")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    fails(tiny_args(prepared_bpe, tmp_path / "busy", "steps:2"), "exists and is not empty")
    fails(tiny_args(prepared_bpe, tmp_path / "r2", "soon"), "budget")
    fails(tiny_args(prepared_bpe, tmp_path / "r3", "steps:2", "model.n_head=3"), "divisible")
    fails(tiny_args(prepared_bpe, tmp_path / "r4", "steps:2", "model.vocab_size=100"), "model.vocab_size=100: a vocabulary cut from the prepared 512")
    fails(tiny_args(prepared_bpe, tmp_path / "r5", "steps:2", "model.vocab_size=1000"), "must have 259..512 tokens")
    fails(["pretrain", "--resume", str(tmp_path / "missing")], "not a budgetlm run directory")
    fails(["pretrain", "--resume", str(tmp_path / "missing"), "--set", "train.lr=1"], "--resume continues a run with its own config")
    fails(tiny_args(prepared_bpe, tmp_path / "r8", "steps:2", "train.warmup=1.0"), "train.warmup")
    fails(tiny_args(prepared_bpe, tmp_path / "r9", "steps:2", "train.min_lr_ratio=2"), "train.min_lr_ratio")
    fails(tiny_args(prepared_bpe, tmp_path / "r11", "steps:2", "train.seq_warmup=1"), "train.seq_warmup")
    fails(tiny_args(prepared_bpe, tmp_path / "r12", "steps:2", "train.z_loss=-1"), "train.z_loss")
    fails(tiny_args(prepared_bpe, tmp_path / "r13", "steps:2", "model.logit_softcap=-1"), "model.logit_softcap")
    fails(tiny_args(prepared_bpe, tmp_path / "r14", "steps:2", "parallel.pp=2", "train.z_loss=1e-4"), "parallel.pp > 1 does not support")
    fails(tiny_args(prepared_bpe, tmp_path / "r10", "steps:2", "parallel.tp=2"), "parallel degrees dp_replicate=? x dp_shard=1 x tp=2 x pp=1")
    for bad in ("r8", "r9", "r10"):
        assert not (tmp_path / bad).exists(), f"{bad}: nothing may be written before the settings are checked"
