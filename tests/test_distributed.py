"""Distributed helpers: no-ops in one process, real collectives and DDP over 2 gloo processes."""

import copy

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from budgetlm import distributed as D


@pytest.fixture
def single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_single_process_is_a_no_op(single_process, capsys):
    info = D.init_distributed()
    assert (info.rank, info.local_rank, info.world_size, info.is_main) == (0, 0, 1, True)
    assert info.device.type in ("cpu", "cuda", "mps")
    t = torch.tensor([3.0])
    assert D.all_reduce_mean(t) is t and t.item() == 3.0
    assert D.all_reduce_max(2.5) == 2.5
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    D.barrier()
    D.print0("hello")
    assert capsys.readouterr().out == "hello\n"
    model = nn.Linear(2, 2)
    assert D.wrap_ddp(model, info) is model
    with D.no_sync(model, enabled=True):
        pass
    D.cleanup()


def test_bad_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(D.UserError):
        D.init_distributed()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(D.UserError):
        D.init_distributed()


def test_unwrap_model_through_compile():
    model = nn.Linear(2, 2)
    assert D.unwrap_model(model) is model
    assert D.unwrap_model(torch.compile(model)) is model


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(D.get_world_size())]
    torch.distributed.all_gather(out, t)
    return out


def _check_ddp_matches_one_process(info: D.DistInfo, rank: int, world_size: int) -> None:
    # In its own function so the DDP wrapper is out of scope when D.cleanup() runs.
    # The same model and global batch on every rank; the reference sees the whole batch.
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    ref = copy.deepcopy(model)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    nn.functional.mse_loss(ref(x), y).backward()
    ref_opt.step()

    ddp = D.wrap_ddp(model, info)
    assert isinstance(ddp, D.DDP)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    shard_x, shard_y = x.chunk(world_size)[rank], y.chunk(world_size)[rank]
    micro = list(zip(shard_x.chunk(2), shard_y.chunk(2)))
    for i, (xb, yb) in enumerate(micro):
        last = i == len(micro) - 1
        with D.no_sync(ddp, enabled=not last):
            (nn.functional.mse_loss(ddp(xb), yb) / len(micro)).backward()
        grads = _gather(model.weight.grad.detach().clone())
        # Under no_sync each rank holds only its own gradient; after the last micro-batch
        # DDP has averaged them, so all ranks agree.
        assert torch.equal(grads[0], grads[1]) == last
    opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def _worker(rank: int, world_size: int, init_file: str) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = D.init_distributed("auto", init_method=f"file://{init_file}", timeout_s=60)
    try:
        assert (info.rank, info.world_size, info.device.type) == (rank, world_size, "cpu")
        assert D.is_main() == (rank == 0)

        t = torch.tensor([rank + 1.0, 2.0 * (rank + 1)])
        D.all_reduce_mean(t)
        assert torch.allclose(t, torch.tensor([1.5, 3.0]))
        assert D.all_reduce_max(float(rank)) == world_size - 1
        assert D.broadcast_object({"from": rank, "list": [rank]}) == {"from": 0, "list": [0]}
        D.barrier()

        _check_ddp_matches_one_process(info, rank, world_size)
    finally:
        D.cleanup()


def test_two_gloo_processes(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)


def _dims(world: int, **settings) -> D.ParallelDims:
    from budgetlm.config import ParallelConfig

    return D.ParallelDims.resolve(ParallelConfig(**settings), world)


def test_parallel_dims_fill_in_and_name_bad_degrees():
    d = _dims(8)
    assert (d.dp_replicate, d.dp_shard, d.tp, d.pp, d.ddp, d.fsdp) == (8, 1, 1, 1, True, False)  # DDP by default
    d = _dims(8, dp_shard=-1, tp=2)
    assert (d.dp_replicate, d.dp_shard, d.dp, d.fsdp) == (1, 4, 4, True)
    d = _dims(8, dp_replicate=2, dp_shard=2, tp=2)
    assert d.describe() == "HSDP 2 x 2 x tp 2"
    assert _dims(4, dp_replicate=2, tp=2).fsdp  # replicas of a TP model: HSDP with shards of one, not DDP
    # ranks: tensor parallel innermost, pipeline outermost
    d = _dims(8, pp=2, dp_shard=2, tp=2)
    assert [d.coords(r)["tp"] for r in range(4)] == [0, 1, 0, 1]
    assert [d.coords(r)["pp"] for r in range(8)] == [0] * 4 + [1] * 4
    assert [d.coords(r)["dp"] for r in range(4)] == [0, 0, 1, 1]
    one_line = r"^parallel degrees dp_replicate=\? x dp_shard=1 x tp=3 x pp=1 do not multiply to the 4 processes started$"
    with pytest.raises(D.UserError, match=one_line):
        _dims(4, tp=3)
    with pytest.raises(D.UserError, match="dp_replicate=2 x dp_shard=2 x tp=2 x pp=1"):
        _dims(4, dp_replicate=2, dp_shard=2, tp=2)
    with pytest.raises(D.UserError, match="parallel.dp=3 does not match"):
        _dims(4, dp=3)
    with pytest.raises(D.UserError, match="parallel.tp=0"):
        _dims(4, tp=0)


def test_pipeline_stages_balance_flops():
    from budgetlm.distributed.pipeline import stage_layers

    assert stage_layers(8, 512, 512, 2) == [list(range(4)), list(range(4, 8))]  # output ~0.04 blocks: an even cut
    # a large vocabulary makes the output projection worth ~2.7 blocks: the last stage gets fewer layers
    assert stage_layers(8, 768, 50304, 2) == [list(range(5)), list(range(5, 8))]
    assert sum(len(s) for s in stage_layers(13, 256, 4096, 4)) == 13
    with pytest.raises(D.UserError, match="at least as many layers"):
        stage_layers(2, 64, 128, 3)


def test_interleaved_stages_are_looped_and_their_schedule_checked():
    """Interleaved 1F1B: rank r of P runs stages r, r + P, ... of P x V, cut by FLOPs like one stage per rank."""
    from budgetlm.distributed.pipeline import check_schedule, stage_ids, stage_layers

    assert stage_ids(1, 2, "Interleaved1F1B", 2) == ([1, 3], 4)
    assert stage_ids(0, 4, "Interleaved1F1B", 3) == ([0, 4, 8], 12)
    assert stage_ids(1, 2, "1F1B", 2) == ([1], 2)  # one stage per rank whatever pp_virtual_stages says
    # 8 layers in 4 stages, the last also holding an output projection worth ~2.7 layers: rank 1 of 2 runs 1-3 and 7
    layers = stage_layers(8, 768, 50304, 4)
    assert [layers[s] for s in stage_ids(1, 2, "Interleaved1F1B", 2)[0]] == [[1, 2, 3], [7]]
    with pytest.raises(D.UserError, match="at least 2"):
        stage_ids(0, 2, "Interleaved1F1B", 1)
    check_schedule("Interleaved1F1B", 2, 4)
    check_schedule("Interleaved1F1B", 4, 2)  # fewer pieces than ranks: one round
    check_schedule("Interleaved1F1B", 4, 10)  # two rounds of 5
    with pytest.raises(D.UserError, match=r"pp_microbatches=9 divisible by its rounds, max\(1, pp_microbatches // parallel.pp\) = 2"):
        check_schedule("Interleaved1F1B", 4, 9)
    with pytest.raises(D.UserError, match="not one of"):
        check_schedule("ZeroBubble", 2, 2)


def test_settings_that_cannot_work_are_refused_before_anything_runs():
    from budgetlm.config import RunConfig, apply_overrides

    def refused(*overrides, match):
        cfg = apply_overrides(RunConfig(), list(overrides))
        with pytest.raises(D.UserError, match=match):
            D.check_parallel_config(cfg)

    refused("parallel.tp=3", match="must divide model.n_head")
    refused("parallel.tp=2", "model.objective=masked", match="causal only")
    refused("parallel.pp=2", match="tie_embeddings=false")
    refused("parallel.pp=8", "model.tie_embeddings=false", match="at least as many layers")
    interleaved = ("parallel.pp=4", "model.tie_embeddings=false", "model.n_layer=6", "parallel.pp_schedule=Interleaved1F1B")
    refused(*interleaved, match=r"parallel.pp=4 x parallel.pp_virtual_stages=2 stages need at least as many layers \(model.n_layer=6\)")
    refused("parallel.dp_shard=-1", "parallel.ddp_comm_hook=powersgd", match="DDP only")
    refused("parallel.tp=2", "model.value_embeddings=all", match="model.value_embeddings work with data parallelism")
    refused("parallel.pp=2", "model.tie_embeddings=false", "model.smear=true", match="model.smear work with data parallelism")
    if not torch.cuda.is_available():
        refused("parallel.fsdp_cpu_offload=true", match="needs a CUDA GPU")
