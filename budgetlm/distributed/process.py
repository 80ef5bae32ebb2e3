"""The process group: joining it, and collectives that are no-ops in a single process.

Launch N processes with `torchrun --nproc_per_node=N -m budgetlm ...`; torchrun sets RANK,
WORLD_SIZE and LOCAL_RANK, and `init_distributed()` joins the group. Without those variables
the run is a single process with no process group, and every helper here (`barrier`,
`all_reduce_mean`, `broadcast_object`, ...) becomes a no-op that returns its input, so the
training loop never branches on the world size (nanochat's habit, with `print0` for logging).

Collectives go through the default process group. With NCCL, tensors must live on the GPU:
the helpers that build their own tensors (`all_reduce_max`) put them on the right device.
"""

from __future__ import annotations

import builtins
import gc
import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from budgetlm.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its global rank, rank on its node, the world size and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def default_device(local_rank: int = 0) -> torch.device:
    """cuda:local_rank when a GPU is present, else Apple's mps, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(backend: str = "auto", *, init_method: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun's environment, or run as one process.

    backend: "auto" = nccl when CUDA is available, gloo otherwise (CPU, and mps which has no
    collective backend of its own). `init_method` defaults to torchrun's env:// rendezvous;
    tests pass a `file://` path instead. Calling it again after the group exists returns the
    same info.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"bad distributed environment: RANK={rank} WORLD_SIZE={world_size}")
    if world_size == 1:
        return DistInfo(0, 0, 1, default_device(local_rank))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise UserError("parallel.backend nccl needs CUDA GPUs; use gloo on CPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif backend == "gloo":
        # gloo also works across GPUs, but each process should still own its own GPU.
        device = default_device(local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        raise UserError(f"unknown process-group backend '{backend}' (use auto, nccl or gloo)")
    if not dist.is_initialized():
        kwargs = {}
        if backend == "nccl":
            kwargs["device_id"] = device  # binds the communicator eagerly, avoiding a hang on first use
        dist.init_process_group(
            backend, init_method=init_method or "env://", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s), **kwargs
        )
    return DistInfo(rank, local_rank, world_size, device)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if _active() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """True on global rank 0 (and in a single process)."""
    return get_rank() == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if is_main():
        builtins.print(*args, **kwargs)


def barrier() -> None:
    if _active():
        dist.barrier()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average `tensor` over ranks, in place, and return it (gloo has no AVG op, so SUM / N)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks, in place, and return it."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(value: float) -> float:
    """The largest `value` over ranks, e.g. elapsed time, so all ranks stop on the same step."""
    if not _active():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` (any picklable value) on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def cleanup(barrier: bool = True) -> None:
    """Leave the process group (at the end of a run, on every rank), after dropping the model.

    `barrier=False` on the way out of an exception: the other ranks may be waiting in some other
    collective, and a barrier would then hang until the group's timeout instead of letting
    torchrun stop the job.

    Every rank first passes a barrier, so no rank tears its group down while a peer's last
    collective is still in flight. Each gloo collective's work object is released on a gloo worker
    thread after the caller's wait returns, and releasing its tensors takes the GIL; a worker still
    busy when the interpreter shuts down is killed mid-destructor and the process aborts
    ("terminate called without an active exception"). The barrier is the last collective and
    completes only when every rank's earlier work has finished; collecting garbage then drops the
    DDP/FSDP reference cycles that keep the group alive, so destroy_process_group joins the workers.
    """
    if dist.is_available() and dist.is_initialized():
        if barrier and dist.get_world_size() > 1:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def wrap_ddp(model: nn.Module, info: DistInfo, **kwargs) -> nn.Module:
    """DistributedDataParallel around `model` when world_size > 1, else `model` itself.

    The model must already be on `info.device`. Extra keyword arguments go to DDP.
    """
    if info.world_size == 1:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids, **kwargs)


def _find_ddp(model: nn.Module) -> DDP | None:
    while True:
        if isinstance(model, DDP):
            return model
        inner = getattr(model, "_orig_mod", None)  # torch.compile's wrapper
        if not isinstance(inner, nn.Module):
            return None
        model = inner


def no_sync(model: nn.Module, enabled: bool = True):
    """Context that skips DDP's gradient all-reduce for this backward when `enabled`.

    With gradient accumulation, use `no_sync(model, enabled=not last_micro_step)` around each
    micro-batch's forward and backward: gradients are summed locally and all-reduced once, on
    the last micro-batch. A no-op for a plain (single-process) model.
    """
    ddp = _find_ddp(model) if enabled else None
    return ddp.no_sync() if ddp is not None else nullcontext()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DDP and torch.compile wrappers (for saving and evaluation)."""
    while True:
        if isinstance(model, DDP):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model
