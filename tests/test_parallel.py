"""Multi-process pretraining on CPU/gloo: FSDP2, tensor parallel, HSDP, pipelines (1F1B, GPipe,
interleaved 1F1B) and hybrids match one process, write sharded checkpoints (every rank its own
files) that resume under another layout or process count, and bad degrees give one line.

Every layout must reproduce the single-process losses with the same global batch. The tolerance
is 1e-4 (absolute, on losses near 6 and on weights near 0.02): the math is the same but the
order of floating-point sums is not (sharded all-reduces, tensor-parallel partial sums, a pipeline's
pieces), which moves fp32 results by about 1e-6 per step; a wrong gradient, batch or optimizer state
moves them by 1e-3 or more within two steps (the first real update already changes the loss by ~0.05).

Launches are shared (two module-scoped fixtures): eleven launches in all, most on 4 processes.
The schedule is constant, so a run stopped at step 4 and resumed with a longer budget continues
exactly where a single run of 10 steps would be.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from budgetlm.run import load_run
from budgetlm.tracking import read_metrics

pytestmark = pytest.mark.slow

COMMON = [
    "auto=false",  # the planner times this device; every layout must train the very same model
    "model.n_layer=4",  # interleaved 1F1B on 2 ranks needs 4 stages
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
    "train.embedding_lr_ratio=0.5",  # the embedding and head in groups of their own: every layout and checkpoint must carry them
    "train.head_lr_ratio=0.5",
    "train.schedule=constant",
    "train.warmup=0",
]
TOL = 1e-4
# Weights after 8 Muon steps: its Newton-Schulz iterations amplify the sums' rounding. Two layouts' consolidated
# weights differed by 1.4e-4 on an AMD EPYC (torch 2.13, fp32; under 1e-4 on an Intel Xeon); a wrong state moves them by 1e-3.
WEIGHT_TOL = 3e-4


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _command(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "budgetlm", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "budgetlm", *args]


def launch(nproc: int, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(_command(nproc, args), env=_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def pretrain_args(data: Path, out: Path, budget: str, *sets: str) -> list[str]:
    args = ["pretrain", "--data", str(data), "--out", str(out), "--budget", budget]
    for s in [*COMMON, *sets]:
        args += ["--set", s]
    return args


def pretrain(nproc: int, data: Path, out: Path, budget: str, *sets: str) -> Path:
    launch(nproc, pretrain_args(data, out, budget, *sets))
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
    assert worst < WEIGHT_TOL, worst


@pytest.fixture(scope="module")
def runs(prepared_bpe, tmp_path_factory):
    """The launches from scratch, shared by the tests below."""
    root = tmp_path_factory.mktemp("parallel")
    data = prepared_bpe
    out = {"data": data, "root": root}
    out["single"] = pretrain(1, data, root / "single", "steps:10")
    # 4 processes, each its own layout, for the first 4 steps
    out["fsdp"] = pretrain(4, data, root / "fsdp", "steps:4", "parallel.dp_shard=-1", "parallel.activation_checkpointing=selective")
    out["hsdp"] = pretrain(4, data, root / "hsdp", "steps:4", "parallel.dp_replicate=2", "parallel.dp_shard=2")
    out["fsdp_tp"] = pretrain(4, data, root / "fsdp_tp", "steps:4", "parallel.dp_shard=2", "parallel.tp=2", "parallel.activation_checkpointing=full")
    out["pp_tp"] = pretrain(4, data, root / "pp_tp", "steps:4", "parallel.pp=2", "parallel.tp=2")  # 1F1B
    out["pp_fsdp"] = pretrain(4, data, root / "pp_fsdp", "steps:4", "parallel.pp=2", "parallel.dp_shard=2", "parallel.pp_schedule=GPipe")
    return out


@pytest.fixture(scope="module")
def resumed(runs):
    """Sharded checkpoints resumed under other layouts (a second fixture: each stays within the test timeout)."""
    root, out = runs["root"], {}
    no_ac = "parallel.activation_checkpointing=none"
    for name, source, nproc, budget, sets in (
        ("fsdp_then_tp", "fsdp", 2, "steps:8", ("parallel.dp_shard=1", "parallel.tp=2", no_ac)),  # 4 -> 2 processes, FSDP2 -> TP
        ("fsdp_then_1", "fsdp", 1, "steps:6", ("parallel.dp_shard=1", no_ac)),  # 4 -> 1
        ("pp_then_tp", "pp_fsdp", 2, "steps:8", ("parallel.pp=1", "parallel.dp_shard=1", "parallel.tp=2")),  # pipeline stages -> none
    ):
        out[name] = root / name
        shutil.copytree(runs[source], out[name])
        resume(nproc, out[name], budget, *sets)
    # the single-file checkpoint one process wrote at step 6 (the format before sharded ones) resumed by an
    # interleaved 1F1B pipeline: 4 stages of one layer, ranks (0, 2) and (1, 3), FSDP2 over 2 replicas
    out["file_then_interleaved"] = root / "file_then_interleaved"
    shutil.copytree(out["fsdp_then_1"], out["file_then_interleaved"])
    resume(4, out["file_then_interleaved"], "steps:10", "parallel.pp=2", "parallel.dp_shard=2", "parallel.pp_schedule=Interleaved1F1B")
    return out


def test_sharded_layouts_match_one_process(runs):
    ref = losses(runs["single"])
    assert sorted(ref) == list(range(1, 11))
    for name in ("fsdp", "hsdp", "fsdp_tp", "pp_tp", "pp_fsdp"):
        assert_same_losses(runs[name], ref, range(1, 5))


def test_resume_under_another_layout_continues_the_curve(runs, resumed):
    ref = losses(runs["single"])
    assert_same_losses(resumed["fsdp_then_1"], ref, range(1, 7))
    for name in ("fsdp_then_tp", "pp_then_tp", "file_then_interleaved"):
        assert_same_losses(resumed[name], ref, range(1, 9 if name != "file_then_interleaved" else 11))
    # the consolidated model.safetensors: the same weights at step 8 from either layout, and at 10 as one process
    assert_same_weights(resumed["fsdp_then_tp"], resumed["pp_then_tp"])
    assert_same_weights(resumed["file_then_interleaved"], runs["single"])


def _format(run: Path) -> str:
    return json.loads((run / "checkpoint" / "state.json").read_text())["format"]


def test_every_rank_writes_its_own_shards(runs):
    """A 4-process FSDP2 checkpoint: four shard files, one per rank, each holding a quarter of every
    matrix (no rank wrote, or held, the whole model); the whole model would be a single file."""
    from torch.distributed.checkpoint import FileSystemReader

    d = runs["fsdp"] / "checkpoint"
    assert _format(runs["fsdp"]) == "budgetlm-ckpt/2"
    assert sorted(p.name for p in d.glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]
    assert sorted(p.name for p in d.glob("rng-*.pt")) == [f"rng-{r}.pt" for r in range(4)]
    assert not (d / "model.safetensors").exists() and not (d / "optimizer.pt").exists()
    meta = FileSystemReader(str(d)).read_metadata()
    whole = sum(m.size.numel() * 4 for k, m in meta.state_dict_metadata.items() if k.startswith("model.") and hasattr(m, "size"))
    per_file: dict[str, int] = {}
    files_of: dict[str, set] = {}
    for index, info in meta.storage_data.items():
        if index.fqn.startswith("model."):
            per_file[info.relative_path] = per_file.get(info.relative_path, 0) + info.length
            files_of.setdefault(index.fqn, set()).add(info.relative_path)
    assert len(per_file) == 4 and all(0 < n < 0.4 * whole for n in per_file.values()), (per_file, whole)
    assert len(files_of["model.layers.0.attention.wq.weight"]) == 4  # every rank wrote its own rows
    assert any(k.startswith("optimizer.state.layers.0.") for k in meta.state_dict_metadata)


def test_interleaved_checkpoint_loads_on_one_process(runs, resumed):
    """The interleaved pipeline's sharded checkpoint (step 10, resumed from a single-file one) holds
    the whole model under its own names: one process loads it and has the single-process weights
    and optimizer step."""
    from budgetlm import checkpoint as C
    from budgetlm.config import TrainConfig
    from budgetlm.optim import build_optimizer

    assert _format(resumed["fsdp_then_1"]) == "budgetlm-ckpt/1" and _format(resumed["file_then_interleaved"]) == "budgetlm-ckpt/2"
    run = load_run(resumed["file_then_interleaved"])
    opt = build_optimizer(run.model, TrainConfig(optimizer="adamw"), "cpu")
    loop = C.load_checkpoint(resumed["file_then_interleaved"] / "checkpoint", run.model, opt, restore_rng=False)
    assert loop["loop"]["step"] == 10 and loop["layout"]["pp"] == 2 and loop["layout"]["dp_shard"] == 2
    assert all(int(s["step"]) == 10 for s in opt.state_dict()["state"].values())
    ref = load_run(runs["single"]).model.state_dict()
    assert max(float((v - ref[k]).abs().max()) for k, v in run.model.state_dict().items()) < TOL


def test_sharded_checkpoint_of_another_model_is_one_line(runs, tmp_path):
    from budgetlm import checkpoint as C
    from budgetlm.errors import UserError
    from budgetlm.model import Transformer

    cfg = load_run(runs["fsdp"]).config.model
    cfg.n_embd = 32
    with pytest.raises(UserError, match=r"does not match this model: 'tok_embeddings.weight' has shape \(512, 64\) there but \(512, 32\) here"):
        C.load_checkpoint(runs["fsdp"] / "checkpoint", Transformer.build(cfg), restore_rng=False)
    broken = tmp_path / "checkpoint"
    shutil.copytree(runs["fsdp"] / "checkpoint", broken)
    (broken / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="unreadable"):
        C.load_checkpoint(broken, load_run(runs["fsdp"]).model, restore_rng=False)


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


def test_sharded_checkpoint_without_a_newer_group_setting_loads(runs, tmp_path):
    """torch adds optimizer settings across versions (the GPU machines run another torch than this
    one): a setting the writer's torch lacked keeps this optimizer's value; the state itself loads."""
    import pickle

    from torch.distributed.checkpoint import FileSystemReader

    from budgetlm import checkpoint as C
    from budgetlm.config import TrainConfig
    from budgetlm.optim import build_optimizer

    d = tmp_path / "checkpoint"
    shutil.copytree(runs["fsdp"] / "checkpoint", d)
    meta = FileSystemReader(str(d)).read_metadata()
    dropped = [k for k in meta.state_dict_metadata if k.startswith("optimizer.param_groups.") and k.endswith(".maximize")]
    assert dropped
    for k in dropped:
        del meta.state_dict_metadata[k]
    (d / ".metadata").write_bytes(pickle.dumps(meta))
    run = load_run(runs["fsdp"])
    opt = build_optimizer(run.model, TrainConfig(optimizer="adamw"), "cpu")
    C.load_checkpoint(d, run.model, opt, restore_rng=False)
    state = opt.state_dict()
    assert len(state["state"]) == len(list(run.model.parameters())) and all(int(s["step"]) == 4 for s in state["state"].values())
    assert all(g["maximize"] is False for g in state["param_groups"])


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc): torchrun's workers."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        if ppid == pid:
            out.append(int(stat.parent.name))
    return out


def _signal_groups(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers through /proc")
def test_killed_sharded_run_resumes_on_other_process_counts(runs):
    """SIGKILL a 2-process FSDP2 run in the middle of a sharded save (checkpointing every step),
    then resume it on 1 process and, from a copy, as FSDP2 on 4: the save in flight is lost, the
    previous checkpoint is used, and the loss curve and final weights are the uninterrupted
    single-process run's.

    torchrun starts each worker in a session of its own, so killing torchrun's process group
    would leave the workers running: every process group (torchrun's and each worker's) is killed.
    To kill inside a save, not between two, the workers are stopped (SIGSTOP) once a step >= 3 is
    logged and a `checkpoint.tmp-*` directory exists, and killed only if it still exists while
    they are stopped (else they continue and the next save is tried)."""
    from budgetlm.checkpoint import read_loop_state

    root, ref = runs["root"], losses(runs["single"])
    run = root / "killed"
    cmd = _command(2, pretrain_args(runs["data"], run, "steps:10", "parallel.dp_shard=-1", "train.checkpoint_every=0"))
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if max(losses(run), default=0) >= 3 and any(run.glob("checkpoint.tmp-*")):
                workers = _children(proc.pid)
                _signal_groups(workers, signal.SIGSTOP)
                if any(run.glob("checkpoint.tmp-*")):
                    break  # frozen inside a save
                _signal_groups(workers, signal.SIGCONT)
            time.sleep(0.005)
    finally:
        _signal_groups([*workers, proc.pid], signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (run / "model.safetensors").exists(), "the run ended before it was killed"
    assert len(workers) == 2 and any(run.glob("checkpoint.tmp-*")), workers
    logged = max(losses(run))
    assert read_loop_state(run / "checkpoint")["loop"]["step"] == logged - 1  # the save of the last logged step was lost

    on_4 = root / "killed_then_4"
    shutil.copytree(run, on_4)
    resume(1, run, "steps:10", "parallel.dp_shard=1")
    resume(4, on_4, "steps:10")  # parallel.dp_shard=-1 as saved: FSDP2 over 4
    for r in (run, on_4):
        assert [m["step"] for m in read_metrics(r) if m["kind"] == "train"] == list(range(1, 11))  # step `logged` re-done once
        assert_same_losses(r, ref, range(1, 11))
        assert_same_weights(r, runs["single"])
        assert not any(r.glob("checkpoint.*"))  # the half-written save was cleared
    assert _format(run) == "budgetlm-ckpt/1" and _format(on_4) == "budgetlm-ckpt/2"
