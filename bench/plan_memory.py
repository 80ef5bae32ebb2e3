"""Memory of a training step: `budgetlm.memory.estimate_memory` against the measured peak.

Each configuration trains a few real steps (forward, backward, gradient clipping, fused AdamW step,
zero_grad) in a fresh subprocess, so nothing from an earlier configuration is still allocated.
Two measurements per configuration:

- tensor peak (the one the estimate is held to): the peak of live tensor bytes. On CUDA this is
  `torch.cuda.max_memory_allocated`. A CPU has no such counter, so the step runs under
  `torch.profiler` with `profile_memory=True`, which has PyTorch's CPU allocator report every
  allocation and free with its running total ("Total Allocated"); the peak of that total from
  before the model is built is the CPU equivalent of `max_memory_allocated`.
- process peak RSS minus that of a subprocess that imports torch and budgetlm and builds nothing.
  This is what the machine must have free, but it is not what the estimate models: it adds code
  pages and kernel caches mapped on first use (oneDNN, autograd), thread stacks, the C allocator's
  free-but-kept blocks, and loses tensors that were allocated but never touched. It is shown for
  reference, not scored.

    python bench/plan_memory.py --out bench/results/plan_memory            # CPU, every config
    python bench/plan_memory.py --device cuda --out bench/results/gpu/plan_memory
    python bench/plan_memory.py --configs tiny-fp32 --smoke                  # one quick config
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from budgetlm.config import ModelConfig  # noqa: E402
from budgetlm.hardware import cpu_name  # noqa: E402
from budgetlm.memory import count_params, estimate_memory  # noqa: E402

TARGET = 0.15  # |estimate - measured| / measured

# name -> (model sizes, micro-batch, precision, activation checkpointing)
CONFIGS = {
    "tiny-fp32-b1": (dict(n_layer=2, n_head=4, n_embd=128, seq_len=128, vocab_size=2048), 1, "fp32", "none"),
    "tiny-bf16-b32": (dict(n_layer=2, n_head=4, n_embd=128, seq_len=128, vocab_size=2048), 32, "bf16", "none"),
    "tiny-fp32-b32-s512": (dict(n_layer=2, n_head=4, n_embd=128, seq_len=512, vocab_size=2048), 32, "fp32", "none"),
    "demo-fp32-b16": (dict(n_layer=4, n_head=4, n_embd=128, seq_len=128, vocab_size=2048), 16, "fp32", "none"),
    "demo-bf16-b16": (dict(n_layer=4, n_head=4, n_embd=128, seq_len=128, vocab_size=2048), 16, "bf16", "none"),
    "demo-fp32-b16-ckpt": (dict(n_layer=4, n_head=4, n_embd=128, seq_len=128, vocab_size=2048), 16, "fp32", "full"),
    "5m-fp32-b8": (dict(n_layer=4, n_head=4, n_embd=256, seq_len=256, vocab_size=8192), 8, "fp32", "none"),
    "5m-bf16-b8": (dict(n_layer=4, n_head=4, n_embd=256, seq_len=256, vocab_size=8192), 8, "bf16", "none"),
    "5m-bf16-b8-ckpt": (dict(n_layer=4, n_head=4, n_embd=256, seq_len=256, vocab_size=8192), 8, "bf16", "full"),
    "5m-fp32-b8-selective": (dict(n_layer=4, n_head=4, n_embd=256, seq_len=256, vocab_size=8192), 8, "fp32", "selective"),
    "5m-gqa-qknorm-fp32": (dict(n_layer=4, n_head=8, n_kv_head=2, n_embd=256, seq_len=256, vocab_size=8192, qk_norm=True), 8, "fp32", "none"),
    "5m-gelu-untied-bf16": (dict(n_layer=4, n_head=4, n_embd=256, seq_len=256, vocab_size=8192, mlp="gelu", tie_embeddings=False), 8, "bf16", "none"),
    "5m-masked-bf16": (
        dict(objective="masked", n_layer=4, n_head=4, n_embd=256, seq_len=128, vocab_size=8192, mlp="geglu", norm="layernorm"),
        16,
        "bf16",
        "none",
    ),
    "14m-fp32-b8": (dict(n_layer=6, n_head=6, n_embd=384, seq_len=256, vocab_size=8192), 8, "fp32", "none"),
    "30m-bf16-b4-s512": (dict(n_layer=8, n_head=8, n_embd=512, seq_len=512, vocab_size=8192), 4, "bf16", "none"),
    "30m-fp32-b4-s512-ckpt": (dict(n_layer=8, n_head=8, n_embd=512, seq_len=512, vocab_size=8192), 4, "fp32", "full"),
    "65m-fp32-b1-s512": (dict(n_layer=12, n_head=10, n_embd=640, seq_len=512, vocab_size=8192), 1, "fp32", "none"),
    "65m-bf16-b2-s512": (dict(n_layer=12, n_head=10, n_embd=640, seq_len=512, vocab_size=8192), 2, "bf16", "none"),
}
# too big for a CPU core in minutes; bench/gpu.sh measures them on a GPU
GPT2 = dict(n_layer=12, n_head=12, n_embd=768, seq_len=1024, vocab_size=50257)  # the gpt-124m-1gpu recipe's model
BERT = dict(
    objective="masked", n_layer=16, n_head=12, n_embd=768, ffn_hidden=1536, mlp="geglu", norm="layernorm", embed_norm=True,
    seq_len=128, vocab_size=32768,
)  # the bert-24h recipe's model
GPU_CONFIGS = {
    "gpt2-124m-bf16-b8": (GPT2, 8, "bf16", "none"),
    "gpt2-124m-bf16-b8-ckpt": (GPT2, 8, "bf16", "full"),
    "gpt2-124m-fp16-b8": (GPT2, 8, "fp16", "none"),
    "gpt2-124m-fp32-b4": (GPT2, 4, "fp32", "none"),
    "bert-24h-bf16-b128": (BERT, 128, "bf16", "none"),
}
CPU_DEFAULT = list(CONFIGS)
CONFIGS.update(GPU_CONFIGS)
SMOKE = ["tiny-fp32-b1", "demo-fp32-b16-ckpt"]
MLM_RATE = 0.15


# ---------------------------------------------------------------------------------------------
# the worker: one configuration in a fresh process


def train_steps(spec: dict, device_name: str, steps: int) -> None:
    """Build the model and run `steps` training steps the way budgetlm's pretraining loop does."""
    import contextlib

    import torch
    from torch.utils.checkpoint import checkpoint

    from budgetlm.config import TrainConfig
    from budgetlm.model import IGNORE_INDEX, Transformer, compute_loss
    from budgetlm.optim import build_optimizer

    cfg = ModelConfig(**spec["sizes"])
    device = torch.device(device_name)
    torch.manual_seed(0)
    model = Transformer.build(cfg, device)
    blocks = list(model.layers.values())
    if spec["ckpt"] == "full":
        wrapped = blocks
    elif spec["ckpt"] == "selective":
        wrapped = blocks[1::2]  # every second block, as memory.py assumes
    else:
        wrapped = []
    for block in wrapped:  # torch.utils.checkpoint around each block's forward (non-reentrant)
        block.forward = lambda *a, _f=block.forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)
    optimizer = build_optimizer(model, TrainConfig(), device.type)
    precision = spec["precision"]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    B, T = spec["micro_batch"], cfg.seq_len
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        window = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=gen)
        if cfg.objective == "masked":
            x = window[:, :T].clone()
            y = torch.full_like(x, IGNORE_INDEX)
            pick = torch.randperm(B * T, generator=gen)[: round(B * T * MLM_RATE)]
            y.view(-1)[pick] = x.view(-1)[pick]
        else:
            x, y = window[:, :-1], window[:, 1:]
        x, y = x.to(device), y.to(device)
        with autocast():
            loss = compute_loss(model, x, y)  # what pretrain calls
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    mode, device = spec["mode"], spec["device"]
    out: dict = {"mode": mode}
    if mode == "baseline":
        torch.ones(1) + 1  # the torch runtime is up; nothing is built
    elif mode == "rss":
        train_steps(spec, device, spec["steps"])
    elif mode == "tensor" and device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_steps(spec, device, spec["steps"])
        out["tensor_peak"] = torch.cuda.max_memory_allocated() - base
        out["reserved_peak"] = torch.cuda.max_memory_reserved()
    elif mode == "tensor":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            train_steps(spec, device, spec["steps"])
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(trace))
            events = json.loads(trace.read_text())["traceEvents"]
        totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
        out["tensor_peak"] = max(totals)
        out["allocations"] = len(totals)
    out["rss_mb"] = rss_mb()
    return out


def run_worker(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"worker failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------
# the driver


def measure(name: str, args, baseline_mb: float) -> dict:
    sizes, micro, precision, ckpt = CONFIGS[name]
    if args.device == "cpu" and precision == "fp16":
        precision = "bf16"
    spec = dict(sizes=sizes, micro_batch=micro, precision=precision, ckpt=ckpt, device=args.device, steps=args.steps, threads=args.threads)
    start = time.perf_counter()
    tensor = run_worker({**spec, "mode": "tensor"})
    rss = run_worker({**spec, "mode": "rss"}) if args.device == "cpu" and not args.no_rss else {}
    cfg = ModelConfig(**sizes)
    est = estimate_memory(
        cfg, micro_batch=micro, precision=precision, optimizer="adamw", activation_checkpointing=ckpt,
        device_type=args.device, mlm_rate=MLM_RATE,
    )
    measured = tensor["tensor_peak"]
    row = dict(
        config=name,
        params=count_params(cfg).total,
        n_layer=cfg.n_layer,
        n_embd=cfg.n_embd,
        vocab_size=cfg.vocab_size,
        objective=cfg.objective,
        seq_len=cfg.seq_len,
        micro_batch=micro,
        precision=precision,
        checkpointing=ckpt,
        measured_tensor_peak=measured,
        estimate=est.total,
        error=round((est.total - measured) / measured, 4),
        estimate_terms=est.as_dict(),
        rss_delta_mb=round(rss["rss_mb"] - baseline_mb, 1) if rss else None,
        reserved_peak=tensor.get("reserved_peak"),
        seconds=round(time.perf_counter() - start, 1),
    )
    names = ("weights", "gradients", "optimizer_state", "activations", "recompute", "logits_loss", "autocast_weights")
    terms = {k: v for k, v in est.as_dict().items() if k in names}
    row["dominant"] = max(terms, key=terms.get)
    print(json.dumps({k: v for k, v in row.items() if k != "estimate_terms"}), flush=True)
    return row



def markdown(result: dict) -> str:
    env = result["environment"]
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    lines = [
        "# Training-step memory: estimate (budgetlm/memory.py) vs measured peak",
        "",
        f"- device: {env['device']}",
        f"- torch {env['torch']}, python {env['python']}",
        f"- command: `{result['command']}`",
        f"- date: {result['date']}",
        f"- measured: {result['method']}",
        f"- target: estimate within {TARGET:.0%} of the measured tensor peak for every config; "
        f"{'met' if result['all_within_target'] else 'NOT met'} (worst {result['worst_error']:+.1%})",
        "",
        "Each step: forward (autocast where bf16), backward, clip_grad_norm_, fused AdamW step, zero_grad(set_to_none); "
        f"{result['steps']} steps in a fresh process per config; ckpt = torch.utils.checkpoint per block "
        "(selective: every second block). Columns in MiB.",
        "",
        "| config | params | seq x batch | prec | ckpt | measured | estimate | error | weights+grads+opt | activations"
        " | logits/loss | autocast copies | peak at | biggest term | RSS delta |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in result["rows"]:
        t = r["estimate_terms"]
        wgo = t["weights"] + t["optimizer_state"] + (t["gradients"] if t["peak_at"] == "backward end" else 0)
        rss = "-" if r["rss_delta_mb"] is None else f"{r['rss_delta_mb']:.0f}"
        lines.append(
            f"| {r['config']} | {r['params'] / 1e6:.2f}M | {r['seq_len']} x {r['micro_batch']} | {r['precision']} | {r['checkpointing']} | "
            f"{mib(r['measured_tensor_peak'])} | {mib(r['estimate'])} | {r['error']:+.1%} | {mib(wgo)} | {mib(t['activations'])} | "
            f"{mib(t['logits_loss'])} | {mib(t['autocast_weights'])} | {t['peak_at']} | {r['dominant']} | {rss} |"
        )
    lines += [
        "",
        "weights+grads+opt counts gradients only where the peak is at the end of the backward pass (at its start they do not exist yet: "
        "zero_grad sets them to None). RSS delta: the process's peak resident memory minus that of a process that only imports "
        f"torch and budgetlm ({result['baseline_rss_mb']:.0f} MB); shown for reference, not scored (see the script's docstring).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--configs", default="", help=f"comma-separated subset of: {', '.join(CONFIGS)} (default: all but the GPU ones on a CPU)")
    p.add_argument("--smoke", action="store_true", help=f"only {', '.join(SMOKE)}, 2 steps")
    p.add_argument("--steps", type=int, default=3, help="training steps per config (the peak is over all of them)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads in the workers")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS run (halves the time)")
    p.add_argument("--out", default="", help="write OUT.json and OUT.md")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure", file=sys.stderr)
        return 1
    default = CPU_DEFAULT if args.device == "cpu" else CPU_DEFAULT + list(GPU_CONFIGS)
    names = SMOKE if args.smoke else ([n.strip() for n in args.configs.split(",")] if args.configs else default)
    if args.smoke:
        args.steps = 2
    baseline = run_worker(dict(mode="baseline", device=args.device, threads=args.threads))["rss_mb"]
    rows = []
    for name in names:
        try:
            rows.append(measure(name, args, baseline))
        except Exception as exc:  # one failing config does not lose the others
            print(f"{name}: failed: {exc}", file=sys.stderr)
    if args.device == "cuda":
        device = torch.cuda.get_device_name()
        method = "torch.cuda.max_memory_allocated() over the steps, minus memory_allocated() before the model is built"
    else:
        device = f"{cpu_name()}, {os.cpu_count()} cores visible, {args.threads} torch thread(s)"
        method = "torch.profiler(profile_memory=True): peak of the CPU allocator's running 'Total Allocated' from before the model is built"
    errors = [abs(r["error"]) for r in rows]
    result = dict(
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        environment=dict(device=device, torch=torch.__version__, python=platform.python_version()),
        method=method,
        steps=args.steps,
        baseline_rss_mb=baseline,
        all_within_target=bool(rows) and len(rows) == len(names) and max(errors) <= TARGET,
        worst_error=max((r["error"] for r in rows), key=abs, default=0.0),
        rows=rows,
    )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        out.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    return 0 if result["all_within_target"] else 3


if __name__ == "__main__":
    raise SystemExit(main())
