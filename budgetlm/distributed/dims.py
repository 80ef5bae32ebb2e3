"""How the processes are laid out: pipeline x replicated data x sharded data x tensor parallel.

`ParallelDims` resolves `parallel.*` against the number of processes started; the product of the
four degrees must equal it. Ranks are laid out with tensor parallel innermost (neighbouring ranks
share a node's fast links), then sharded data, replicated data, and pipeline outermost, as in
torchtitan. `build_mesh` makes the matching `DeviceMesh`; `coords` says where one rank sits
without any communication (the data loader needs its data-parallel rank before the mesh exists).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from budgetlm.errors import UserError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    world_size: int
    fsdp_on_one_process: bool = False  # FSDP2 with dp_shard = 1 (CPU offload on a single process)

    @classmethod
    def resolve(cls, parallel, world_size: int) -> ParallelDims:
        """Degrees from a `ParallelConfig` and the world size; one UserError line naming them when they do not fit."""
        rep, shard, tp, pp = parallel.dp_replicate, parallel.dp_shard, parallel.tp, parallel.pp
        for name, value in (("tp", tp), ("pp", pp)):
            if value < 1:
                raise UserError(f"parallel.{name}={value} must be at least 1")
        for name, value in (("dp_replicate", rep), ("dp_shard", shard), ("dp", parallel.dp)):
            if value == 0 or value < -1:
                raise UserError(f"parallel.{name}={value} must be at least 1 (or -1: what the other degrees leave)")
        if rep == -1 and shard == -1:
            rep = 1
        rest = tp * pp * (rep if rep > 0 else 1) * (shard if shard > 0 else 1)
        if (rep == -1 or shard == -1) and world_size % rest == 0:
            if rep == -1:
                rep = world_size // rest
            else:
                shard = world_size // rest
        if rep == -1 or shard == -1 or rep * shard * tp * pp != world_size:
            show = lambda v: "?" if v == -1 else str(v)
            raise UserError(
                f"parallel degrees dp_replicate={show(rep)} x dp_shard={show(shard)} x tp={tp} x pp={pp} "
                f"do not multiply to the {world_size} process{'es' if world_size != 1 else ''} started"
                + (" (start several with torchrun --nproc_per_node=N -m budgetlm pretrain ...)" if world_size == 1 else "")
            )
        if parallel.dp != -1 and parallel.dp != rep * shard:
            raise UserError(f"parallel.dp={parallel.dp} does not match dp_replicate={rep} x dp_shard={shard} for {world_size} processes")
        return cls(rep, shard, tp, pp, world_size, fsdp_on_one_process=bool(parallel.fsdp_cpu_offload and shard == 1))

    # -- what is in use ------------------------------------------------------------------------

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different micro-batches are processed at once."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> bool:
        """FSDP2 (or HSDP): sharded data parallel, CPU offload, or replicas of a tensor- or pipeline-parallel
        model (DDP cannot wrap DTensor parameters, and hangs inside a pipeline stage's backward on torch
        2.13; HSDP with shards of 1 is the same replication)."""
        return self.dp_shard > 1 or self.fsdp_on_one_process or (self.dp_replicate > 1 and (self.tp > 1 or self.pp > 1))

    @property
    def ddp(self) -> bool:
        return self.dp_replicate > 1 and not self.fsdp

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        return (self.pp, self.dp_replicate, self.dp_shard, self.tp)

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index along each mesh dimension, plus its data-parallel rank `dp`."""
        out = {}
        for name, size in zip(reversed(MESH_DIMS), reversed(self.sizes)):
            out[name] = rank % size
            rank //= size
        out["dp"] = out["dp_replicate"] * self.dp_shard + out["dp_shard"]
        return out

    def describe(self) -> str:
        parts = []
        if self.pp > 1:
            parts.append(f"pp {self.pp}")
        if self.fsdp:
            parts.append(f"HSDP {self.dp_replicate} x {self.dp_shard}" if self.dp_replicate > 1 else f"FSDP2 {self.dp_shard}")
        elif self.dp_replicate > 1:
            parts.append(f"DDP {self.dp_replicate}")
        if self.tp > 1:
            parts.append(f"tp {self.tp}")
        return " x ".join(parts) or "1 process"


def build_mesh(dims: ParallelDims, device: torch.device):
    """The DeviceMesh (pp, dp_replicate, dp_shard, tp) over all ranks; None in a single process
    unless FSDP2 needs one (CPU offload on one process)."""
    if dims.world_size == 1 and not dims.fsdp:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    if dims.world_size == 1:
        import torch.distributed as dist

        if not dist.is_initialized():  # FSDP2 on one process still wants a (trivial) group
            import tempfile

            f = tempfile.NamedTemporaryFile(prefix="budgetlm-pg-", delete=False)
            dist.init_process_group("gloo" if device.type != "cuda" else "nccl", init_method=f"file://{f.name}", rank=0, world_size=1)
    return init_device_mesh(device.type, dims.sizes, mesh_dim_names=MESH_DIMS)
