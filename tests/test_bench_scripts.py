"""The benchmark scripts that only run where a GPU is lent at least parse."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_sh_parses_and_explains_itself():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu.sh")], check=True)
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--dry-run" in out and "9 minutes" in out


@pytest.mark.slow
def test_scaling_bench_measures_ddp_and_fsdp_bytes(tmp_path):
    """bench/scaling.py on 2 gloo processes with a tiny model: the bytes its dispatch mode counts for
    DDP are the ring all-reduce of every gradient, 2 (n-1)/n x 4 bytes per parameter, with no
    broadcast of the (constant) rotary buffers before each forward; FSDP2's match the formula in
    which only the blocks but the last are all-gathered again in backward (the root stays gathered)."""
    import sys

    out = tmp_path / "scaling"
    cmd = [sys.executable, str(ROOT / "bench" / "scaling.py"), "--smoke", "--strategies", "ddp2,fsdp2", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    ddp, fsdp = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert ddp["processes"] == 2 and len(ddp["peak_bytes_per_rank"]) == 2 and min(ddp["peak_bytes_per_rank"]) > 0
    assert ddp["ops_max_rank"]["allreduce_"]["calls"] >= 1 and "broadcast_" not in ddp["ops_max_rank"]
    for row in (ddp, fsdp):
        assert abs(row["ratio_max_rank"] - 1.0) < 0.01, row["analytic_sent_bytes"]
    n_layer = 2  # the smoke model: forward gathers both blocks and the root, backward the first block again
    assert fsdp["ops_max_rank"]["_allgather_base_"]["calls"] == n_layer + 1 + (n_layer - 1), fsdp["ops_max_rank"]
    assert "| DDP x2 | 2 |" in out.with_suffix(".md").read_text()


def test_savers_bench_worker_runs_in_process():
    """bench/savers.py's worker trains a tiny model with selective checkpointing (in this process:
    no launch), and without a GPU it records FSDP2 CPU offload's one-line refusal."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("savers", ROOT / "bench" / "savers.py")
    savers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(savers)
    threads = torch.get_num_threads()
    try:
        got = savers.worker({"part": "time", "model": savers.SMOKE_MODEL, "micro": 2, "ckpt": "selective", "steps": 1, "warmup": 0})
        assert len(got["times"]) == 1 and got["times"][0] > 0
    finally:
        torch.set_num_threads(threads)
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in savers.offload_refusal()


def _train_speed():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_speed", ROOT / "bench" / "train_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_train_speed(tmp_path, *extra):
    import torch

    threads = torch.get_num_threads()
    try:
        out = tmp_path / "speed"
        quick = ["--warmup", "1", "--steps", "1", "--repeats", "1", "--peak-n", "128"]
        _train_speed().main(["--configs", "smoke", "--dtype", "fp32", *quick, "--out", str(out), *extra])
    finally:
        torch.set_num_threads(threads)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert not [r for r in rows if "error" in r], rows
    return {r["variant"]: r for r in rows}, out.with_suffix(".md").read_text()


def test_train_speed_bench_smoke(tmp_path):
    """bench/train_speed.py, eager, on a tiny model: budgetlm (through pretrain's loss function) and HF
    both train with the same weights (the script asserts equal logits and equal loss) and get a row."""
    pytest.importorskip("transformers")
    rows, md = _run_train_speed(tmp_path)
    assert set(rows) == {"budgetlm", "hf"} and rows["hf"]["speedup_vs_hf"] == 1.0
    assert rows["budgetlm"]["step_ms_median"] > 0 and "| smoke |" in md
    # the configs the planner picks for short CPU budgets, tied and without QK-norm like HF Llama
    configs = _train_speed().CONFIGS
    assert configs["cpu-0.7m"] == (dict(n_layer=2, n_head=2, n_embd=128, seq_len=128, vocab_size=2048, tie_embeddings=True, qk_norm=False), 16)
    assert all(sizes["tie_embeddings"] and not sizes["qk_norm"] for sizes, _ in configs.values())


def test_step_profile_bench_classes_the_step_and_writes_json(tmp_path):
    """bench/step_profile.py (also gpu.sh's profile section): budgetlm's own step under the profiler, by
    operator and class; the matmuls are found and the classes' shares add up to the whole."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("step_profile", ROOT / "bench" / "step_profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--config", "smoke", "--steps", "1", "--rows", "3", "--out", str(tmp_path / "p")]) == 0
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["step_ms"] > 0 and result["optimizer"] == "muon" and not result["compiled"]
    assert result["shares"]["matmul"] > 0 and abs(sum(result["shares"].values()) - 1) < 1e-3
    assert mod.kernel_class("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul" and mod.kernel_class("flash_fwd_kernel") == "attention"
    assert mod.kernel_class("multi_tensor_apply_kernel") == "optimizer" and mod.kernel_class("triton_poi_fused_mul_0") == "other"


@pytest.mark.slow
def test_train_speed_bench_compiled_rows(tmp_path):
    """--compile / --compile-hf: each compiles its model together with its loss and gets a row."""
    pytest.importorskip("transformers")
    rows, _ = _run_train_speed(tmp_path, "--compile", "--compile-hf", "--no-eager")
    assert set(rows) == {"budgetlm+compile", "hf+compile"}


@pytest.mark.slow
def test_plan_memory_bench_trains_and_scores_the_estimate(tmp_path):
    """bench/plan_memory.py --smoke trains real steps through pretrain's loss and scores memory.py
    against the measured peak (it once broke silently when the model's call signature changed)."""
    import sys

    out = tmp_path / "plan_memory"
    cmd = [sys.executable, str(ROOT / "bench" / "plan_memory.py"), "--smoke", "--no-rss", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len(rows) == 2 and all(r["measured_tensor_peak"] > 0 and abs(r["error"]) < 0.15 for r in rows), rows


@pytest.mark.slow
def test_serve_load_bench_smoke(tmp_path):
    """bench/serve_load.py --smoke against a tiny run: the batching and one-at-a-time servers and the
    engine alone each answer every request of every level, with no 5xx, and the table is written."""
    import sys

    pytest.importorskip("fastapi")
    from test_finetune_runs import make_tiny_run

    run = make_tiny_run(tmp_path / "run")
    out = tmp_path / "load"
    cmd = [sys.executable, str(ROOT / "bench" / "serve_load.py"), str(run), "--smoke", "--max-batch", "4", "1", "--engine", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = json.loads(out.with_suffix(".json").read_text())
    served = [r for r in rows if "server" not in r]
    assert sorted((r["max_batch"], r["concurrency"]) for r in served) == [(1, 1), (1, 4), (4, 1), (4, 4)]
    for row in served:
        assert row["ok"] == row["requests"] == 4 and row["5xx"] == 0 and row["tokens_per_s"] > 0 and row["p50_ttft_s"] > 0
        assert row["server_cpu_ms_per_token"] > 0 and row["client_cpu_ms_per_token"] > 0
    assert sum(1 for r in rows if r.get("server", "").startswith("batching engine")) == 2
    assert "| 4 |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_compress_bench_smoke_has_every_row_and_its_suite_score(tmp_path):
    """bench/compress.py --smoke end to end (tiny runs, step budgets), the suite on a small local corpus: every
    method's row is in the table with a suite score, the mean of the two tasks' headline metrics."""
    import sys

    from test_suite import _corpus

    corpus = tmp_path / "pattern"
    corpus.mkdir()
    _corpus(corpus)
    out = tmp_path / "compress"
    cmd = [sys.executable, str(ROOT / "bench" / "compress.py"), "--smoke", "--repeats", "1", "--work", str(tmp_path / "work"),
           "--out", str(out), "--suite-corpus", str(corpus)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len(rows) == 9
    for row in rows:
        s = row["suite"]
        assert 0 <= s["sentiment_accuracy"] <= 1 and 0 <= s["pos_token_accuracy"] <= 1
        assert s["score"] == pytest.approx((s["sentiment_accuracy"] + s["pos_token_accuracy"]) / 2)
    md = out.with_suffix(".md").read_text()
    assert "suite score (sentiment / POS)" in md and "Majority-class baselines" in md
