"""Where one training step's time goes: torch.profiler over budgetlm's own step (`train_step`:
forward, backward, clipping and the optimizer), grouped by operator, on a CPU or a GPU.

    taskset -c 1 .venv/bin/python bench/step_profile.py --config cpu-0.7m --optimizer muon
    python bench/step_profile.py --device cuda --config gpt2-124m --batch 16 --dtype bf16 --compile --out /tmp/prof

The model is one of `bench/train_speed.py`'s configurations, built as budgetlm's defaults build it
(QK-norm, untied head) unless `--llama-shaped` (tied, no QK-norm: the shape compared with Hugging
Face there). On a GPU the table is sorted by GPU time and each kernel is put in a class (matmul,
attention, optimizer, other) so that a compiled step's gap to peak can be read at a glance.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_speed import CONFIGS, DTYPES  # noqa: E402

from budgetlm.config import ModelConfig, TrainConfig  # noqa: E402
from budgetlm.model import Transformer, compute_loss  # noqa: E402
from budgetlm.optim import build_optimizer  # noqa: E402
from budgetlm.train_step import train_step  # noqa: E402

# substrings of kernel / operator names -> class (first match wins)
CLASSES = (
    ("attention", ("flash", "attention", "fmha", "sdpa")),
    ("matmul", ("gemm", "matmul", "aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "cutlass", "sm90_xmma", "nvjet", "cublas")),
    ("optimizer", ("adam", "muon", "foreach", "lerp", "multi_tensor")),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, keys in CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", default="cpu-0.7m", choices=sorted(CONFIGS))
    ap.add_argument("--batch", type=int, default=0, help="micro-batch in sequences (default: the config's)")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--optimizer", default="muon", choices=("muon", "adamw"))
    ap.add_argument("--llama-shaped", action="store_true", help="tied embeddings, no QK-norm (train_speed.py's shape)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model and its loss as one graph")
    ap.add_argument("--steps", type=int, default=5, help="profiled steps (after 3 untimed ones)")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--out", default="", help="write OUT.json (the table's rows and the classes' shares)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    sizes, batch = CONFIGS[args.config]
    sizes = dict(sizes)
    if not args.llama_shaped:
        sizes.update(qk_norm=True, tie_embeddings=False)
    cfg = ModelConfig(**sizes)
    batch = args.batch or batch
    torch.manual_seed(0)
    model = Transformer.build(cfg, device)
    optimizer = build_optimizer(model, TrainConfig(optimizer=args.optimizer, lr=1e-3, precision=args.dtype), device.type)
    loss_fn = torch.compile(compute_loss) if args.compile else compute_loss
    low = DTYPES[args.dtype]
    autocast = (lambda: torch.autocast(device.type, dtype=low)) if low is not None else contextlib.nullcontext
    scaler = torch.amp.GradScaler("cuda") if args.dtype == "fp16" else None

    def batches():
        while True:
            w = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), device=device)
            yield w[:, :-1], w[:, 1:]

    it = batches()

    def step():
        train_step(model, optimizer, it, lambda m, b: loss_fn(m, *b), n_micro=1, autocast=autocast, scaler=scaler, grad_clip=1.0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):  # first-call allocations, kernel caches, compilation
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    step_ms = 1000 * (time.perf_counter() - t0) / args.steps

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
    on_gpu = device.type == "cuda"
    events = prof.key_averages()

    def own_us(e) -> float:
        return (e.self_device_time_total if on_gpu else e.self_cpu_time_total) / args.steps

    rows = sorted(({"name": e.key, "calls": e.count // args.steps, "us_per_step": round(own_us(e), 1)} for e in events if own_us(e) > 0),
                  key=lambda r: -r["us_per_step"])  # fmt: skip
    total = sum(r["us_per_step"] for r in rows) or 1.0
    shares: dict[str, float] = {}
    for r in rows:
        r["class"] = kernel_class(r["name"])
        shares[r["class"]] = shares.get(r["class"], 0.0) + r["us_per_step"] / total
    where = "GPU" if on_gpu else "CPU"
    print(f"{args.config} {args.dtype} {args.optimizer}{' compiled' if args.compile else ''}, batch {batch} x {cfg.seq_len}: {step_ms:.1f} ms a step")
    print(f"{where} time by class: " + ", ".join(f"{k} {v:.0%}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1])))
    print(f"{'us/step':>10} {'share':>6} {'calls':>6}  class      name")
    for r in rows[: args.rows]:
        print(f"{r['us_per_step']:>10.1f} {r['us_per_step'] / total:>6.1%} {r['calls']:>6}  {r['class']:<10} {r['name'][:90]}")
    if args.out:
        result = dict(config=args.config, dtype=args.dtype, optimizer=args.optimizer, compiled=args.compile, batch=batch,
                      device=torch.cuda.get_device_name(device) if on_gpu else "cpu", torch=torch.__version__,
                      step_ms=round(step_ms, 2), shares={k: round(v, 4) for k, v in shares.items()}, rows=rows[:100])  # fmt: skip
        Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
