"""Per-step cost of the training options the defaults were measured with (logit soft-cap, z-loss,
sequence-length warm-up): one optimizer step (`budgetlm.train_step`, forward + backward + clip +
Muon/AdamW) of the model the planner chooses for 90 s on a CPU, each variant timed in turn over
several rounds so that drift on a shared machine hits all of them alike; the median per variant.

    taskset -c 1 .venv/bin/python bench/step_cost.py [--rounds 7] [--steps 20]

Variants: the defaults; model.logit_softcap=15; train.z_loss=1e-4; and the defaults at the
shorter lengths a sequence-length warm-up trains at (the same tokens per step).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch

from budgetlm.config import ModelConfig, TrainConfig
from budgetlm.data.loader import split_windows
from budgetlm.model import Transformer, compute_loss
from budgetlm.optim import build_optimizer
from budgetlm.train_step import train_step

# the planner's choice for 90 s on one core of this machine (bench/results/quality.md)
MODEL = dict(n_layer=2, n_embd=128, n_head=2, seq_len=128, vocab_size=2048, qk_norm=True, tie_embeddings=False)
BATCH_TOKENS, LR = 2048, 0.016


def variants() -> dict[str, tuple[dict, float, int]]:
    """name -> (model overrides, z_loss, training length)"""
    out = {"defaults": ({}, 0.0, 128), "logit_softcap=15": ({"logit_softcap": 15.0}, 0.0, 128), "z_loss=1e-4": ({}, 1e-4, 128)}
    out.update({f"seq {n} (warm-up)": ({}, 0.0, n) for n in (16, 32, 64)})
    return out


def _loss(model, batch, z_loss):
    return compute_loss(model, *batch, z_loss)


def time_steps(model_over: dict, z_loss: float, length: int, steps: int, precision: str) -> float:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**MODEL, **model_over})
    model = Transformer.build(cfg)
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=LR), "cpu")
    w = torch.randint(0, cfg.vocab_size, (BATCH_TOKENS // cfg.seq_len, cfg.seq_len + 1))
    batch = (split_windows(w[:, :-1], length), split_windows(w[:, 1:], length))
    dtype = torch.bfloat16 if precision == "bf16" else None
    autocast = functools.partial(torch.autocast, "cpu", dtype=dtype, enabled=dtype is not None)
    loss_fn = functools.partial(_loss, z_loss=z_loss)
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        train_step(model, opt, iter([batch]), loss_fn, n_micro=1, autocast=autocast, grad_clip=1.0)
        if i >= 3:  # oneDNN's first calls create kernels
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    a = p.parse_args()
    torch.set_num_threads(1)
    res: dict[str, list[float]] = {k: [] for k in variants()}
    for _ in range(a.rounds):
        for name, (over, z, n) in variants().items():
            res[name].append(time_steps(over, z, n, a.steps, a.precision))
    base = statistics.median(res["defaults"])
    out = {k: {"ms": round(1e3 * statistics.median(v), 2), "vs_defaults": round(statistics.median(v) / base, 3)} for k, v in res.items()}
    for k, v in out.items():
        print(f"{k:22s} {v['ms']:7.2f} ms/step  {v['vs_defaults']:.3f}x")
    print(json.dumps({"precision": a.precision, "rounds": a.rounds, "steps": a.steps, "torch": torch.__version__, "results": out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
