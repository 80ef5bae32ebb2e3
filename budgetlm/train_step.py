"""One optimizer step, shared by pretraining and fine-tuning.

    for each micro-batch: forward (autocast) -> loss / n -> backward (scaled for fp16)
        gradients are synchronised on the last micro-batch only: DDP's no_sync, FSDP2's
        set_requires_gradient_sync; tensor parallel's loss runs under loss_parallel()
    loss averaged over micro-batches and data-parallel ranks
    unscale (fp16) -> clip the global gradient norm (sharded DTensor gradients included)
    step, unless the loss or the gradients are not finite: then the gradients are dropped and the
    caller decides (pretraining skips and may roll back, fine-tuning stops with an error)

The batches arrive already on the device (see `budgetlm.data.loader.DeviceBatches` for pinned,
prefetched copies); `loss_fn(model, batch)` turns one into a scalar loss.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from budgetlm.distributed import all_reduce_mean, no_sync, unwrap_model


@dataclass
class StepResult:
    loss: float  # mean over micro-batches and ranks
    grad_norm: float  # before clipping; nan when clipping is off
    stepped: bool  # False: a non-finite loss or gradient, nothing was applied


def _local(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (replicated or sharded) DTensor; plain tensors pass through."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(unwrap_model(model), FSDPModule)


def grad_sync(model: nn.Module, last: bool):
    """Context for one micro-batch's backward: gradients synchronise only when `last`."""
    if _is_fsdp(model):
        unwrap_model(model).set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return no_sync(model, enabled=not last)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, pp_group=None) -> float:
    """Clip the global L2 norm of the gradients to `max_norm`; returns the norm before clipping.

    Plain gradients take torch's fused path. Sharded ones (FSDP2 / tensor parallel DTensors, on
    one mesh or several, mixed with plain replicated ones) are normed per mesh, each completed
    over its shards, and combined; a pipeline adds the other stages' squares."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if hasattr(g, "device_mesh")]
    if not sharded and pp_group is None:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if not grads:
        return 0.0
    plain = [g for g in grads if not hasattr(g, "device_mesh")]
    device = _local_device(grads[0])
    squares = []
    if plain:
        squares.append(torch.nn.utils.get_total_norm(plain, 2.0).float().to(device) ** 2)
    by_mesh: dict = {}
    for g in sharded:
        by_mesh.setdefault((id(g.device_mesh), tuple(g.placements)), []).append(g)
    for group in by_mesh.values():
        squares.append(_local(torch.nn.utils.get_total_norm(group, 2.0)).float().to(device) ** 2)
    total = torch.stack(squares).sum()
    if pp_group is not None:
        torch.distributed.all_reduce(total, group=pp_group)
    norm = float(total.sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0 and math.isfinite(norm):
        if plain:
            torch._foreach_mul_(plain, coef)
        for g in sharded:
            g.mul_(coef)
    return norm


def _local_device(t: torch.Tensor) -> torch.device:
    return t.to_local().device if hasattr(t, "to_local") else t.device


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    *,
    n_micro: int,
    params: list[torch.Tensor] | None = None,
    autocast: Callable = contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float = 0.0,
    loss_parallel: bool = False,
    reduce_loss: bool = True,
) -> StepResult:
    """Accumulate gradients over `n_micro` batches from `batches`, then clip and step.

    `params` are the parameters to clip (default: the optimizer's). The optimizer's gradients are
    zeroed at the end whether or not it stepped."""
    if params is None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
    parallel_loss = contextlib.nullcontext
    if loss_parallel:
        from torch.distributed.tensor.parallel import loss_parallel as parallel_loss
    loss_sum = None
    pipeline = hasattr(model, "pipeline_step")  # budgetlm.distributed.pipeline.Pipeline: its schedule runs backward
    for i, batch in zip(range(n_micro), batches):
        if pipeline:
            loss = model.pipeline_step(batch, scale=1.0 / n_micro)
            loss_sum = loss if loss_sum is None else loss_sum + loss
            continue
        with grad_sync(model, last=i == n_micro - 1), parallel_loss():
            with autocast():
                loss = loss_fn(model, batch)
            scaled = loss / n_micro
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss = _local(loss.detach()).float()
        loss_sum = loss if loss_sum is None else loss_sum + loss
    mean = loss_sum / n_micro
    loss_val = float(all_reduce_mean(mean) if reduce_loss else mean)
    grad_norm = float("nan")
    if math.isfinite(loss_val) and grad_clip > 0:
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = clip_grad_norm(params, grad_clip, pp_group=model.pp_group if pipeline else None)
    # with a scaler, inf/nan gradients are the scaler's business: it skips the step and lowers its scale
    finite = math.isfinite(loss_val) and (grad_clip <= 0 or math.isfinite(grad_norm) or scaler is not None)
    if finite:
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_val, grad_norm, finite)
