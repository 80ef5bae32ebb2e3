"""Memory savers on one process: activation checkpointing none / full / selective, measured.

For a model whose activations dominate the step's memory (6 blocks of width 256 at context 512,
4 sequences per micro-batch, fp32), each setting of `parallel.activation_checkpointing` is applied
the way `budgetlm pretrain` applies it (`budgetlm.distributed.parallelize`: `full` wraps each block
in `torch.utils.checkpoint`, `selective` also keeps the matmul and attention outputs and recomputes
the rest) and trained with budgetlm's `train_step` (AdamW, gradient clipping) on random tokens.

- peak memory: in a fresh process per setting, the peak of live tensor bytes from before the model
  is built through 3 steps, from `torch.profiler(profile_memory=True)` (as bench/plan_memory.py),
  next to `budgetlm.memory.estimate_memory` for the same setting.
- step time: in a fresh process per setting and repeat, the median of the timed steps after
  warm-up; the settings are interleaved (none, full, selective, none, ...) and the table gives the
  median over all repeats' steps. Run it alone on a core (see the command below).

FSDP2 CPU offload (`parallel.fsdp_cpu_offload`) streams each block from host memory to a GPU, so on
a CPU-only machine it is refused with one line; the table records that line.

    python bench/savers.py --part memory --out bench/results/savers
    flock /tmp/budgetlm-core0.lock taskset -c 0 env OMP_NUM_THREADS=1 python bench/savers.py --part time --merge --out bench/results/savers
    python bench/savers.py --smoke                                   # a tiny model, one step each
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from budgetlm.config import ModelConfig  # noqa: E402
from budgetlm.hardware import cpu_name  # noqa: E402
from budgetlm.memory import count_params, estimate_memory  # noqa: E402

MODEL = dict(n_layer=6, n_head=4, n_embd=256, seq_len=512, vocab_size=2048)
MICRO = 4
SMOKE_MODEL = dict(n_layer=2, n_head=2, n_embd=32, seq_len=32, vocab_size=256)
MODES = ("none", "full", "selective")


# ---------------------------------------------------------------------------------------------
# the worker: one setting in a fresh process


def worker(spec: dict) -> dict:
    import torch

    from budgetlm.config import RunConfig, TrainConfig
    from budgetlm.distributed import ParallelDims, parallelize
    from budgetlm.model import Transformer, compute_loss
    from budgetlm.optim import build_optimizer
    from budgetlm.train_step import train_step

    torch.set_num_threads(1)
    cfg = RunConfig(auto=False)
    cfg.model = ModelConfig(**spec["model"])
    cfg.parallel.activation_checkpointing = spec["ckpt"]
    cfg.train = TrainConfig(optimizer="adamw", lr=1e-3, grad_clip=1.0, precision="fp32", compile="false")
    gen = torch.Generator().manual_seed(1)
    T, V = cfg.model.seq_len, cfg.model.vocab_size

    def build():
        dims = ParallelDims.resolve(cfg.parallel, 1)
        par = parallelize(Transformer.on_meta(cfg.model), dims, cfg, None, torch.device("cpu"), compile_on=False, seed=0)
        return par, build_optimizer(par.model, cfg.train, "cpu")

    def step(par, opt) -> float:
        window = torch.randint(0, V, (spec["micro"], T + 1), generator=gen)
        batch = (window[:, :-1], window[:, 1:])
        start = time.perf_counter()
        res = train_step(par.train_model, opt, iter([batch]), lambda m, b: compute_loss(m, *b), n_micro=1, grad_clip=1.0)
        elapsed = time.perf_counter() - start
        assert res.stepped
        return elapsed

    if spec["part"] == "memory":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            par, opt = build()
            for _ in range(spec["steps"]):
                step(par, opt)
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(trace))
            events = json.loads(trace.read_text())["traceEvents"]
        return {"tensor_peak": max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")}
    par, opt = build()
    for _ in range(spec["warmup"]):
        step(par, opt)
    return {"times": [step(par, opt) for _ in range(spec["steps"])]}


def run_worker(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"worker failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def offload_refusal() -> str:
    """What `budgetlm pretrain --set parallel.fsdp_cpu_offload=true` says on this machine ('' if it runs)."""
    from budgetlm.config import RunConfig
    from budgetlm.distributed import check_parallel_config
    from budgetlm.errors import UserError

    cfg = RunConfig(auto=False)
    cfg.parallel.fsdp_cpu_offload = True
    try:
        check_parallel_config(cfg)
    except UserError as exc:
        return str(exc)
    return ""


# ---------------------------------------------------------------------------------------------
# the driver



def markdown(result: dict) -> str:
    m = ModelConfig(**result["model"])
    rows = {r["ckpt"]: r for r in result["rows"]}
    mib = lambda b: f"{b / 2**20:.1f}" if b is not None else "-"  # noqa: E731
    lines = [
        "# Memory savers on one process (CPU): activation checkpointing, measured",
        "",
        f"- device: {result['environment']['device']}",
        f"- torch {result['environment']['torch']}, python {result['environment']['python']}",
        f"- commands: {'; '.join(f'`{c}`' for c in result['commands'])}",
        f"- date: {result['date']}",
        f"- model: {m.n_layer} blocks x {m.n_embd} wide, {m.n_head} heads, context {m.seq_len}, vocabulary {m.vocab_size}, "
        f"{count_params(m).total / 1e6:.2f}M parameters; {result['micro']} sequences per step ({result['micro'] * m.seq_len} tokens), "
        "fp32, AdamW, gradient clipping 1.0, eager",
        "- peak memory: live tensor bytes from before the model is built through 3 steps, `torch.profiler(profile_memory=True)` "
        "(as bench/plan_memory.py); estimate: `budgetlm.memory.estimate_memory` with the same setting",
        f"- step time: median of {result.get('time_steps', '?')} timed steps after {result.get('time_warmup', '?')} warm-up, "
        f"in {result.get('repeats', '?')} fresh processes per setting (settings interleaved); one torch thread on a reserved core",
        "",
        "| setting | peak memory (MiB) | vs none | estimate (MiB) | estimate vs measured | step time (ms) | vs none | per-repeat medians (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    base = rows.get("none", {})
    for mode in MODES:
        r = rows.get(mode)
        if r is None:
            continue
        peak, est, t = r.get("tensor_peak"), r.get("estimate"), r.get("step_s_median")
        mem_ratio = f"{peak / base['tensor_peak']:.2f}x" if peak and base.get("tensor_peak") else "-"
        est_err = f"{(est - peak) / peak:+.0%}" if peak and est else "-"
        time_ratio = f"{t / base['step_s_median']:.2f}x" if t and base.get("step_s_median") else "-"
        reps = ", ".join(f"{1000 * x:.0f}" for x in r.get("repeat_medians", [])) or "-"
        t_ms = f"{1000 * t:.0f}" if t else "-"
        lines.append(f"| activation_checkpointing={mode} | {mib(peak)} | {mem_ratio} | {mib(est)} | {est_err} | {t_ms} | {time_ratio} | {reps} |")
    refusal = result.get("offload_refusal")
    lines.append(
        "| fsdp_cpu_offload=true | not measured | | | | | | "
        + (f"refused on this CPU-only machine: `{refusal}` |" if refusal else "runs here: not measured yet |")
    )
    sel = rows.get("selective", {})
    if sel.get("tensor_peak") and sel.get("estimate"):
        lines += [
            "",
            'budgetlm/memory.py models `selective` as checkpointing every second block (torchtitan\'s `selective_ac_option="2"`), '
            "but `parallel.activation_checkpointing=selective` is op-level: every block is checkpointed and the outputs of "
            "matmuls and attention are kept (torch's selective-checkpoint policy). The two keep about the same bytes at this shape "
            "(a block's input plus q, k, v, attention, wo, w1, w3 and w2 outputs: 28C + 8F bytes per token in fp32, against 44C + 16F "
            "for a block without checkpointing, so about half; every second block also keeps about half), which is why the estimate "
            f"lands within {abs(sel['estimate'] - sel['tensor_peak']) / sel['tensor_peak']:.0%} of the measured peak; the formula "
            "describes another policy, and the two part where the MLP is wider or the attention heavier.",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", default="all", choices=("all", "memory", "time"), help="what to measure")
    p.add_argument("--repeats", type=int, default=3, help="fresh timing processes per setting")
    p.add_argument("--steps", type=int, default=5, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--smoke", action="store_true", help="a tiny model, one repeat of one step")
    p.add_argument("--out", default="", help="write OUT.json and OUT.md")
    p.add_argument("--merge", action="store_true", help="keep what OUT.json already holds for the other part")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    import torch

    model = SMOKE_MODEL if args.smoke else MODEL
    if args.smoke:
        args.repeats, args.steps, args.warmup = 1, 1, 1
    command = " ".join([Path(sys.executable).name, *sys.argv])
    result: dict = {"model": model, "micro": MICRO, "rows": [{"ckpt": m} for m in MODES], "commands": []}
    if args.out and args.merge and Path(args.out).with_suffix(".json").is_file():
        result = json.loads(Path(args.out).with_suffix(".json").read_text())
    rows = {r["ckpt"]: r for r in result["rows"]}
    if args.part in ("all", "memory"):
        for mode in MODES:
            got = run_worker({"part": "memory", "model": model, "micro": MICRO, "ckpt": mode, "steps": 3})
            est = estimate_memory(ModelConfig(**model), micro_batch=MICRO, precision="fp32", activation_checkpointing=mode, device_type="cpu")
            rows[mode].update(tensor_peak=got["tensor_peak"], estimate=est.total, estimate_peak_at=est.peak_at)
            print(json.dumps({"ckpt": mode, "tensor_peak": got["tensor_peak"], "estimate": est.total}), flush=True)
    if args.part in ("all", "time"):
        times: dict = {m: [] for m in MODES}
        medians: dict = {m: [] for m in MODES}
        for _ in range(args.repeats):
            for mode in MODES:  # interleaved, so drift in the machine's speed hits every setting alike
                got = run_worker({"part": "time", "model": model, "micro": MICRO, "ckpt": mode, "steps": args.steps, "warmup": args.warmup})
                times[mode] += got["times"]
                medians[mode].append(statistics.median(got["times"]))
                print(json.dumps({"ckpt": mode, "median_s": medians[mode][-1]}), flush=True)
        for mode in MODES:
            rows[mode].update(step_s_median=statistics.median(times[mode]), repeat_medians=medians[mode], step_s=times[mode])
        result.update(time_steps=args.steps, time_warmup=args.warmup, repeats=args.repeats)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    result.update(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        environment={
            "device": f"{cpu_name()}, {affinity} core(s) available, 1 torch thread",
            "torch": torch.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        offload_refusal=offload_refusal(),
    )
    result["commands"] = [c for c in result.get("commands", []) if f"--part {args.part}" not in c] + [command]
    result["rows"] = [rows[m] for m in MODES]
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        out.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
