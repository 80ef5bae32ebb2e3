"""Muon with its Newton-Schulz iterations batched over matrices of one shape.

The update is `torch.optim.Muon`'s (Jordan et al. 2024; PyTorch >= 2.9), term for term:

    B <- mu B + (1 - mu) G                       momentum buffer (a lerp, as torch does)
    U <- (1 - mu) G + mu B  (Nesterov)  or  B
    O <- NS5(U / ||U||)                          quintic Newton-Schulz in bf16, on the wide orientation
                                                 (fp32 on CPUs without fast bf16: `ns_dtype`)
    W <- (1 - lr wd) W - lr s O                  s = 0.2 sqrt(max(fan_out, fan_in)) ("match_rms_adamw",
                                                 Liu et al. 2025) or sqrt(max(1, fan_out / fan_in))

with the same hyperparameters and the same state (one `momentum_buffer` per matrix), so
checkpoints move between the two. What differs is how it runs: torch steps one matrix at a time,
about 25 small operations each; a Transformer has 7 matrices per block in 3 shapes, so here the
momentum is one foreach call and each shape's iterations are one batched matmul chain
(`torch.baddbmm`). At the sizes a short CPU budget trains (2 x 128) that took the step's Muon
share from about 16 ms to 11 ms, a tenth of the whole step. It also runs on any PyTorch 2.
"""

from __future__ import annotations

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's and Keller Jordan's quintic
NS_STEPS = 5
EPS = 1e-7


def newton_schulz(
    x: torch.Tensor, steps: int = NS_STEPS, coefficients=NS_COEFFICIENTS, eps: float = EPS, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Approximately orthogonalise each matrix of a (n, rows, cols) stack with rows <= cols, in `dtype`:
    the result is close to U V^T of each matrix's SVD (singular values land in about [0.7, 1.2])."""
    a, b, c = coefficients
    x = x.to(dtype)
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


def lr_scale(shape: torch.Size, adjust_lr_fn: str | None) -> float:
    """The factor on the learning rate that makes updates of different shapes comparable."""
    fan_out, fan_in = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(fan_out, fan_in))
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, fan_out / fan_in))
    return 1.0


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters; see the module docstring. Arguments as `torch.optim.Muon`'s."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = EPS,
        ns_steps: int = NS_STEPS,
        adjust_lr_fn: str | None = None,
        ns_dtype: torch.dtype = torch.bfloat16,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0 (got {lr}, {momentum}, {weight_decay})")
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw' (got {adjust_lr_fn!r})")
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
        )  # fmt: skip
        self.ns_dtype = ns_dtype  # not a group setting: it says how this machine runs the update, not what the update is
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D parameters, got one of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
            mu = group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - mu)
            updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
            # matrices of one shape (tall ones transposed to wide) are orthogonalised together
            stacks: dict[tuple, list[int]] = {}
            for i, p in enumerate(params):
                stacks.setdefault((min(p.shape), max(p.shape), p.device, p.dtype), []).append(i)
            lr, wd = group["lr"], group["weight_decay"]
            for members in stacks.values():
                tall = [params[i].size(0) > params[i].size(1) for i in members]
                wide = torch.stack([updates[i].mT if t else updates[i] for i, t in zip(members, tall)])
                ortho = newton_schulz(wide, group["ns_steps"], group["ns_coefficients"], group["eps"], self.ns_dtype)
                ortho = ortho.to(params[members[0]].dtype)
                by_shape: dict[torch.Size, tuple[list, list]] = {}  # tall and wide ones may scale differently
                for i, o, t in zip(members, ortho.unbind(0), tall):
                    mine, theirs = by_shape.setdefault(params[i].shape, ([], []))
                    mine.append(params[i])
                    theirs.append(o.mT if t else o)
                for shape, (mine, ortho_updates) in by_shape.items():
                    if wd:
                        torch._foreach_mul_(mine, 1 - lr * wd)
                    torch._foreach_add_(mine, ortho_updates, alpha=-lr * lr_scale(shape, group["adjust_lr_fn"]))
        return loss
