"""Process groups and parallelism: one code path for CPU, one GPU and N processes.

Launch N processes with `torchrun --nproc_per_node=N -m budgetlm ...`; torchrun sets RANK,
WORLD_SIZE and LOCAL_RANK, and `init_distributed()` joins the group. Without those variables
the run is a single process with no process group, and every helper here (`barrier`,
`all_reduce_mean`, `broadcast_object`, ...) becomes a no-op that returns its input, so the
training loop never branches on the world size (nanochat's habit, with `print0` for logging).

    process.py      the process group, collectives, DDP helpers (no_sync, unwrap_model)
    dims.py         ParallelDims (dp_replicate x dp_shard x tp x pp = world size) and the DeviceMesh
    parallelize.py  parallelize(): tensor parallel -> activation checkpointing -> compile -> FSDP2 / DDP
    pipeline.py     stages (the model with other stages' layers deleted), GPipe / 1F1B / interleaved
                    1F1B schedules around this rank's parallelised stages
"""

from torch.nn.parallel import DistributedDataParallel as DDP

from budgetlm.distributed.dims import MESH_DIMS, ParallelDims, build_mesh
from budgetlm.distributed.parallelize import Parallelized, check_parallel_config, parallelize
from budgetlm.distributed.process import (
    DistInfo,
    all_reduce_max,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_object,
    cleanup,
    default_device,
    get_rank,
    get_world_size,
    init_distributed,
    is_main,
    no_sync,
    print0,
    unwrap_model,
    wrap_ddp,
)
from budgetlm.errors import UserError

__all__ = [
    "DDP",
    "MESH_DIMS",
    "DistInfo",
    "Parallelized",
    "ParallelDims",
    "UserError",
    "all_reduce_max",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "build_mesh",
    "check_parallel_config",
    "cleanup",
    "default_device",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main",
    "no_sync",
    "parallelize",
    "print0",
    "unwrap_model",
    "wrap_ddp",
]
