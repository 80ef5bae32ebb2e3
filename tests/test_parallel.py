"""Multi-process pretraining on CPU/gloo: FSDP2, tensor parallel, HSDP, pipelines (1F1B, GPipe)
and hybrids match one process, resume under another layout, and bad degrees give one line.

Every layout must reproduce the single-process losses with the same global batch. The tolerance
is 1e-4 (absolute, on losses near 6 and on weights near 0.02): the math is the same but the
order of floating-point sums is not (sharded all-reduces, tensor-parallel partial sums), which
moves fp32 results by about 1e-6 per step; a wrong gradient, batch or optimizer state moves them
by 1e-3 or more within two steps (the first real update already changes the loss by ~0.05).

Launches are shared (module-scoped runs): eleven launches in all, most on 4 processes.
The schedule is constant, so a run stopped at step 4 and resumed with a longer budget continues
exactly where a single run of 8 steps would be.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from budgetlm.run import load_run
from budgetlm.tracking import read_metrics

pytestmark = pytest.mark.slow

COMMON = [
    "auto=false",  # the planner times this device; every layout must train the very same model
    "model.n_layer=2",
    "model.n_head=4",
    "model.n_embd=64",
    "model.seq_len=32",
    "model.tie_embeddings=false",
    "model.qk_norm=true",  # tensor parallel replicates its per-head gains while q and k are split by heads
    "train.batch_tokens=512",
    "train.micro_batch=4",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_tokens=1024",
    "train.lr=3e-3",
    "train.schedule=constant",
    "train.warmup=0",
]
TOL = 1e-4


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch(nproc: int, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "budgetlm", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "budgetlm", *args]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def pretrain(nproc: int, data: Path, out: Path, budget: str, *sets: str) -> Path:
    args = ["pretrain", "--data", str(data), "--out", str(out), "--budget", budget]
    for s in [*COMMON, *sets]:
        args += ["--set", s]
    launch(nproc, args)
    return out


def resume(nproc: int, run: Path, budget: str, *sets: str) -> Path:
    args = ["pretrain", "--resume", str(run), "--budget", budget]
    for s in sets:
        args += ["--set", s]
    launch(nproc, args)
    return run


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if r["kind"] == "train"}


def assert_same_losses(run: Path, ref: dict[int, float], steps: range) -> None:
    got = losses(run)
    assert sorted(got) == list(steps) or set(steps) <= set(got), sorted(got)
    diffs = {s: abs(got[s] - ref[s]) for s in steps}
    assert max(diffs.values()) < TOL, {s: (got[s], ref[s]) for s in steps}


def assert_same_weights(run: Path, ref: Path) -> None:
    a, b = load_run(run).model.state_dict(), load_run(ref).model.state_dict()
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < TOL, worst


@pytest.fixture(scope="module")
def runs(prepared_bpe, tmp_path_factory):
    """The launches, shared by the tests below."""
    root = tmp_path_factory.mktemp("parallel")
    data = prepared_bpe
    out = {"data": data}
    out["single"] = pretrain(1, data, root / "single", "steps:8")
    # 2 processes, each its own layout, for the first 4 steps
    out["fsdp"] = pretrain(2, data, root / "fsdp", "steps:4", "parallel.dp_shard=-1", "parallel.activation_checkpointing=selective")
    out["tp"] = pretrain(2, data, root / "tp", "steps:4", "parallel.tp=2")
    # 4 processes: two hybrids
    out["hsdp"] = pretrain(4, data, root / "hsdp", "steps:4", "parallel.dp_replicate=2", "parallel.dp_shard=2")
    out["fsdp_tp"] = pretrain(4, data, root / "fsdp_tp", "steps:4", "parallel.dp_shard=2", "parallel.tp=2", "parallel.activation_checkpointing=full")
    out["pp_tp"] = pretrain(4, data, root / "pp_tp", "steps:4", "parallel.pp=2", "parallel.tp=2")  # 1F1B
    out["pp_fsdp"] = pretrain(4, data, root / "pp_fsdp", "steps:4", "parallel.pp=2", "parallel.dp_shard=2", "parallel.pp_schedule=GPipe")
    # resumes under other layouts, continuing to step 8
    out["fsdp_then_pp_tp"] = root / "fsdp_then_pp_tp"  # FSDP2 on 2 processes -> pipeline x TP on 4
    shutil.copytree(out["fsdp"], out["fsdp_then_pp_tp"])
    resume(4, out["fsdp_then_pp_tp"], "steps:8", "parallel.dp_shard=1", "parallel.pp=2", "parallel.tp=2", "parallel.activation_checkpointing=none")
    out["pp_tp_then_1"] = root / "pp_tp_then_1"  # pipeline x TP on 4 processes -> 1 process
    shutil.copytree(out["pp_tp"], out["pp_tp_then_1"])
    resume(1, out["pp_tp_then_1"], "steps:8", "parallel.pp=1", "parallel.tp=1")
    return out


def test_sharded_layouts_match_one_process(runs):
    ref = losses(runs["single"])
    assert sorted(ref) == list(range(1, 9))
    for name in ("fsdp", "tp", "hsdp", "fsdp_tp", "pp_tp", "pp_fsdp"):
        assert_same_losses(runs[name], ref, range(1, 5))


def test_resume_under_another_layout_continues_the_curve(runs):
    ref = losses(runs["single"])
    for name in ("fsdp_then_pp_tp", "pp_tp_then_1"):
        assert_same_losses(runs[name], ref, range(1, 9))
        assert_same_weights(runs[name], runs["single"])  # the consolidated model.safetensors


def test_consolidated_weights_serve_eval_and_generate(runs, capsys):
    from budgetlm.cli import main

    for run in (runs["fsdp_tp"], runs["pp_fsdp"]):
        assert (run / "model.safetensors").is_file() and (run / "report.md").read_text().count("## Samples") == 1
    run = runs["pp_tp"]
    assert (run / "model.safetensors").is_file() and (run / "report.md").read_text().count("## Samples") == 1
    assert main(["eval", str(run), "--json"]) == 0
    assert main(["generate", str(run), "--prompt", "KING", "--max-new-tokens", "4", "--json"]) == 0
    capsys.readouterr()


def test_bad_degrees_give_one_line_per_process(prepared_bpe, tmp_path):
    args = ["pretrain", "--data", str(prepared_bpe), "--out", str(tmp_path / "r"), "--budget", "steps:1", "--set", "parallel.tp=4"]
    res = launch(2, args, check=False)
    assert res.returncode != 0
    # one line from each process (two processes writing at once may interleave them), and no traceback of ours
    assert res.stderr.count("budgetlm pretrain: error:") == 2, res.stderr[-2000:]
    assert "parallel degrees dp_replicate=? x dp_shard=1 x tp=4 x pp=1 do not multiply to the 2 processes started" in res.stderr
    assert "budgetlm/" not in "".join(ln for ln in res.stderr.splitlines() if ln.strip().startswith("File "))  # torchrun's own report only
    assert not (tmp_path / "r").exists()


def test_sharded_checkpoint_loads_on_one_process(runs, tmp_path):
    """A checkpoint written by 4 processes (FSDP2 x TP) holds whole tensors by name: one process
    loads the weights and the optimizer state into an unsharded model."""
    from budgetlm import checkpoint as C
    from budgetlm.config import TrainConfig
    from budgetlm.optim import build_optimizer

    run = load_run(runs["fsdp_tp"])
    opt = build_optimizer(run.model, TrainConfig(), "cpu")
    loop = C.load_checkpoint(runs["fsdp_tp"] / "checkpoint", run.model, opt, restore_rng=False)
    assert loop["loop"]["step"] == 4 and loop["layout"]["tp"] == 2 and loop["layout"]["world_size"] == 4
    assert all(int(s["step"]) == 4 for s in opt.state_dict()["state"].values())
    assert torch.isfinite(next(iter(opt.state.values()))["exp_avg"]).all()
