"""Scaling on CPU processes (gloo): step time, peak memory per rank and bytes communicated per step,
for every parallel layout budgetlm offers, on one small GPT with one fixed global batch.

Each layout is one launch of `torch.distributed.run` (the way `budgetlm pretrain` runs under
torchrun): the model is built on `meta`, parallelised and materialised by budgetlm's own
`build_model` (tensor parallel -> checkpointing -> FSDP2 / DDP, pipeline stages), and trained with
budgetlm's `train_step` (AdamW, gradient clipping) on random tokens. Every layout sees the same
global batch; each data-parallel replica takes its share in one micro-batch (no accumulation), so
the communication is one step's worth, with nothing repeated per micro-batch.

Three measurements per layout, each on every rank:

- step time: the median over the timed steps (after warm-up) of the slowest rank's step.
- peak memory: the peak of live tensor bytes from before the model is built through the warm-up
  steps (the optimizer state exists from the first step), read as in bench/plan_memory.py:
  `torch.profiler(profile_memory=True)` has the CPU allocator report every allocation and free
  with its running total ("Total Allocated"); the largest total is the CPU counterpart of
  `torch.cuda.max_memory_allocated`. Gloo's own buffers are not tensors and are not counted.
- bytes communicated: one more step under a `TorchDispatchMode` that sees every collective and
  point-to-point op reaching the dispatcher, c10d's (`allreduce_`, `_allgather_base_`,
  `_reduce_scatter_base_`, `send`, `recv_`, `broadcast_`, ... as called by DDP's C++ reducer,
  FSDP2 and the pipeline schedules) and the functional ones DTensor uses
  (`_c10d_functional.all_gather_into_tensor`, `reduce_scatter_tensor`, `all_reduce`, ...), the
  same op sets as `torch.distributed.tensor.debug.CommDebugMode`. Each op's payload (the bytes of
  the tensors handed to it) is recorded with its group size and converted into the bytes this
  rank sends under the textbook ring algorithms: all-reduce 2(n-1)/n x S, all-gather (n-1)/n x
  output, reduce-scatter (n-1)/n x input, send S. That is the quantity the analytic formulas give
  (gloo picks its own algorithms, so the bytes on its sockets may differ).

The analytic column is computed from the model's shapes (see `analytic`): DDP 2(n-1)/n x 4P;
FSDP2 (n-1)/n x 4 x (2P + what is re-gathered in backward) -- about 3x the parameter bytes (the
last block and the root stay gathered after forward, see `analytic`); tensor parallel 8 (t-1)/t x 4 N C per
layer (with sequence parallel: four all-gathers / reduce-scatters of the (N, C) activations
forward and four backward; without it four all-reduces) plus the embedding and output; a
pipeline N x C x 4 bytes per stage boundary each way (activations forward, gradients backward).

    python bench/scaling.py --out bench/results/scaling                      # every layout
    python bench/scaling.py --strategies ddp2,fsdp2 --smoke                  # tiny model, 2 steps
    flock /tmp/budgetlm-core0.lock taskset -c 0 env OMP_NUM_THREADS=1 python bench/scaling.py --out bench/results/scaling
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
from budgetlm.memory import count_params  # noqa: E402

# the model: 4 blocks so a 2-stage pipeline has 2 each; untied so a pipeline can split it
MODEL = dict(n_layer=4, n_head=4, n_embd=128, seq_len=128, vocab_size=2048, tie_embeddings=False, qk_norm=False)
SMOKE_MODEL = dict(n_layer=2, n_head=2, n_embd=32, seq_len=16, vocab_size=256, tie_embeddings=False, qk_norm=False)
GLOBAL_SEQS = 16  # the fixed global batch, in sequences

# name -> (processes, parallel.* settings, label)
STRATEGIES = {
    "single": (1, {}, "1 process"),
    "ddp2": (2, {}, "DDP x2"),
    "ddp4": (4, {}, "DDP x4"),
    "fsdp2": (2, {"dp_shard": -1}, "FSDP2 x2"),
    "fsdp4": (4, {"dp_shard": -1}, "FSDP2 x4"),
    "hsdp2x2": (4, {"dp_replicate": 2, "dp_shard": 2}, "HSDP 2x2"),
    "tp2": (2, {"tp": 2}, "TP x2 (sequence + loss parallel)"),
    "pp2-gpipe": (2, {"pp": 2, "pp_schedule": "GPipe"}, "PP x2 GPipe"),
    "pp2-1f1b": (2, {"pp": 2, "pp_schedule": "1F1B"}, "PP x2 1F1B"),
    "fsdp2-tp2": (4, {"dp_shard": 2, "tp": 2}, "FSDP2 x2 . TP x2"),
    "pp2-tp2": (4, {"pp": 2, "tp": 2}, "PP x2 (1F1B) . TP x2"),
}


# ---------------------------------------------------------------------------------------------
# counting bytes: a dispatch mode over the collective ops


def _collective_ops():
    import torch

    c10d, fn = torch.ops.c10d, torch.ops._c10d_functional
    # op -> how the payload relates to what this rank sends: "reduce" (all-reduce), "gather" (all-gather,
    # payload = input), "scatter" (reduce-scatter, payload = input), "send", "recv", "bcast", "a2a"
    kinds = {
        "allreduce_": "reduce", "allreduce_coalesced_": "reduce",
        "_allgather_base_": "gather", "allgather_": "gather", "allgather_coalesced_": "gather", "allgather_into_tensor_coalesced_": "gather",
        "_reduce_scatter_base_": "scatter", "reduce_scatter_": "scatter", "reduce_scatter_tensor_coalesced_": "scatter",
        "send": "send", "recv_": "recv", "recv_any_source_": "recv", "broadcast_": "bcast", "alltoall_base_": "a2a", "alltoall_": "a2a",
        "reduce_": "reduce", "gather_": "gather", "scatter_": "scatter",
    }  # fmt: skip
    ops = {getattr(c10d, name): (name, kind) for name, kind in kinds.items() if hasattr(c10d, name)}
    fkinds = {
        "all_reduce": "reduce", "all_reduce_coalesced": "reduce", "all_gather_into_tensor": "gather",
        "all_gather_into_tensor_coalesced": "gather", "reduce_scatter_tensor": "scatter",
        "reduce_scatter_tensor_coalesced": "scatter", "all_to_all_single": "a2a", "broadcast": "bcast",
    }  # fmt: skip
    ops.update({getattr(fn, name): ("functional." + name, kind) for name, kind in fkinds.items() if hasattr(fn, name)})
    if hasattr(torch.ops, "_c10d_functional_autograd"):
        ops.update({getattr(torch.ops._c10d_functional_autograd, n): ("functional_autograd." + n, k) for n, k in fkinds.items()
                    if hasattr(torch.ops._c10d_functional_autograd, n)})  # fmt: skip
    return ops


def _tensors(value) -> list:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _group_size(args, kwargs) -> int:
    import torch
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    for a in [*args, *kwargs.values()]:
        if isinstance(a, dist.ProcessGroup):
            return a.size()
        if isinstance(a, torch.ScriptObject):  # c10d ops receive the group boxed
            try:
                return dist.ProcessGroup.unbox(a).size()
            except Exception:  # noqa: BLE001 - some other boxed object (a ReduceOp)
                continue
    for a in [*args, *kwargs.values()]:  # functional ops name their group
        if isinstance(a, str):
            try:
                return _resolve_process_group(a).size()
            except Exception:  # noqa: BLE001 - a reduce-op name, not a group
                continue
    return dist.get_world_size()


def _payload(name: str, kind: str, args) -> int:
    """Bytes of the tensors this op is handed: the input of gathers and reduce-scatters (c10d's
    `_allgather_base_` / `_reduce_scatter_base_` take (output, input)); everything else, all tensors."""
    if name in ("_allgather_base_", "_reduce_scatter_base_"):
        return args[1].numel() * args[1].element_size()
    if name in ("allgather_", "allgather_coalesced_", "reduce_scatter_", "allgather_into_tensor_coalesced_", "reduce_scatter_tensor_coalesced_"):
        inputs = args[1]  # (output lists, input list)
        return sum(t.numel() * t.element_size() for t in _tensors(inputs))
    first = args[0]
    return sum(t.numel() * t.element_size() for t in _tensors(first))


def ring_sent(kind: str, payload: int, n: int, rank_is_root: bool = False) -> float:
    """Bytes one rank sends for this op under ring algorithms (payload as `_payload` defines it)."""
    if n <= 1:
        return 0.0
    if kind == "reduce":
        return 2 * (n - 1) / n * payload
    if kind == "gather":  # payload = this rank's input; the output is n times it
        return (n - 1) * payload
    if kind in ("scatter", "a2a"):
        return (n - 1) / n * payload
    if kind == "send":
        return float(payload)
    if kind == "bcast":
        return float(payload) if rank_is_root else 0.0
    return 0.0  # recv: counted by the sender


def comm_counter():
    """A dispatch mode recording (op, kind, payload bytes, group size) of every collective it sees."""
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = _collective_ops()

    class CommCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls: list[dict] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(issubclass(t, DTensor) for t in types):
                # let DTensor turn the op into plain ones first: the collectives it issues while doing so
                # (implicit redistributions, loss parallel's reductions) then come back here (as CommDebugMode does)
                return NotImplemented
            kwargs = kwargs or {}
            hit = ops.get(func) or ops.get(getattr(func, "overloadpacket", None))
            if hit is not None:
                name, kind = hit
                self.calls.append({"op": name, "kind": kind, "payload": _payload(name, kind, args), "n": _group_size(args, kwargs)})
            return func(*args, **kwargs)

    return CommCounter()


def summarise_calls(calls: list[dict]) -> dict:
    by_op: dict = {}
    for c in calls:
        e = by_op.setdefault(c["op"], {"calls": 0, "payload": 0, "sent": 0.0})
        e["calls"] += 1
        e["payload"] += c["payload"]
        e["sent"] += ring_sent(c["kind"], c["payload"], c["n"])
    recv = sum(c["payload"] for c in calls if c["kind"] == "recv")
    return {"sent": sum(e["sent"] for e in by_op.values()), "received_p2p": recv, "by_op": by_op}


# ---------------------------------------------------------------------------------------------
# the worker: one rank of one layout


def worker(spec: dict) -> dict | None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from budgetlm.config import ParallelConfig, RunConfig, TrainConfig
    from budgetlm.distributed import ParallelDims, all_reduce_max, check_parallel_config, cleanup, init_distributed
    from budgetlm.model import compute_loss
    from budgetlm.optim import build_optimizer
    from budgetlm.pretrain import build_model, choose_precision
    from budgetlm.train_step import train_step

    torch.set_num_threads(1)
    dist = init_distributed("gloo")
    import torch.distributed as tdist

    cfg = RunConfig(auto=False)
    cfg.model = ModelConfig(**spec["model"])
    cfg.parallel = ParallelConfig(**spec["parallel"])
    cfg.train = TrainConfig(optimizer="adamw", lr=1e-3, grad_clip=1.0, precision="fp32", compile="false")
    dims = ParallelDims.resolve(cfg.parallel, dist.world_size)
    check_parallel_config(cfg)
    precision = choose_precision("fp32", dist.device)
    seqs = spec["global_seqs"] // dims.dp  # this replica's share, in one micro-batch
    T, V = cfg.model.seq_len, cfg.model.vocab_size
    gen = torch.Generator().manual_seed(1000 + dims.coords(dist.rank)["dp"])  # tensor / pipeline peers share a batch
    window = torch.randint(0, V, (seqs, T + 1), generator=gen)
    batch = (window[:, :-1].contiguous(), window[:, 1:].contiguous())

    def loss_fn(model, b):
        return compute_loss(model, *b)

    state: dict = {}

    def step() -> float:
        start = time.perf_counter()
        res = train_step(state["par"].train_model, state["opt"], iter([batch]), loss_fn, n_micro=1, grad_clip=1.0,
                         loss_parallel=state["par"].loss_parallel, reduce_loss=False)  # fmt: skip
        elapsed = time.perf_counter() - start
        assert res.stepped, res
        return elapsed

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _, state["par"] = build_model(cfg, dims, dist, precision)
        state["opt"] = build_optimizer(state["par"].model, cfg.train, "cpu")
        for _ in range(spec["warmup"]):
            step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    peak = max((e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"), default=0)
    del events, prof

    times = []
    for _ in range(spec["steps"]):
        if dist.world_size > 1:
            tdist.barrier()  # every rank starts the step together: the slowest rank's time is the step's
        times.append(all_reduce_max(step()))
    counter = comm_counter()
    with counter:
        step()
    mine = {"rank": dist.rank, "peak": peak, "comm": summarise_calls(counter.calls), "coords": dims.coords(dist.rank)}
    everyone = [mine]
    if dist.world_size > 1:
        everyone = [None] * dist.world_size
        tdist.all_gather_object(everyone, mine)
    cleanup()
    if dist.rank != 0:
        return None
    return {"times": times, "ranks": everyone, "describe": dims.describe()}


def run_layout(name: str, spec: dict, timeout: float = 600) -> dict:
    nproc = STRATEGIES[name][0]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    args = [__file__, "--worker", json.dumps(spec)]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{name}: launch failed ({proc.returncode}): {proc.stdout[-1500:]} {proc.stderr[-3000:]}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------
# what the formulas say


def analytic(name: str, model: dict, global_seqs: int) -> dict:
    """Bytes one rank sends per step by the standard formulas (fp32: 4 bytes per value), by term."""
    cfg = ModelConfig(**model)
    pc = count_params(cfg)
    n_proc, par, _ = STRATEGIES[name]
    L, C, T = cfg.n_layer, cfg.n_embd, cfg.seq_len
    V = pc.embedding // C
    tp, pp = par.get("tp", 1), par.get("pp", 1)
    dp = n_proc // (tp * pp)
    rep = par.get("dp_replicate", 1 if par.get("dp_shard") else dp)
    shard = dp // rep
    N = global_seqs // dp * T  # tokens one replica processes per step
    out: dict = {}
    # parameters this rank's data-parallel group synchronises (a tensor-parallel rank holds 1/tp of the
    # matrices; a pipeline stage its layers)
    layers_here = L // pp
    block = pc.block_matrices // tp + (pc.per_block - pc.block_matrices)
    root = (pc.embedding + pc.output) // tp + pc.other if pp == 1 else None
    if pp > 1:  # the heaviest stage: the first holds the embedding, the last the output and norm (equal here)
        root = pc.embedding // tp
    P_here = layers_here * block + root
    if shard > 1:  # FSDP2: all-gather forward, again in backward for what was resharded, reduce-scatter
        # budgetlm keeps the last block gathered after forward, and the root (embedding, output, final norm)
        # too: its `fully_shard` gets torch's default, None, which keeps the root gathered into backward
        regathered = (layers_here - 1) * block
        f = (shard - 1) / shard
        out["fsdp all-gather fwd"] = f * 4 * P_here
        out["fsdp all-gather bwd"] = f * 4 * regathered
        out["fsdp reduce-scatter"] = f * 4 * P_here
    if rep > 1:  # DDP, or HSDP's all-reduce of the shards across replicas
        out["replica all-reduce"] = 2 * (rep - 1) / rep * 4 * P_here / shard
    if tp > 1:
        f = (tp - 1) / tp
        act = 4 * N * C
        out["tp blocks (8 per layer)"] = 8 * layers_here * f * act
        if pp == 1:  # sequence parallel + loss parallel: embedding reduce-scatter / all-gather, output all-gather / reduce-scatter
            out["tp embedding + output"] = 4 * f * act
        else:  # no sequence or loss parallel in a pipeline; the first stage's embedding all-reduce (heavier: the last stage gathers logits)
            out["tp embedding + output"] = max(2 * f * act, f * 4 * N * V + 2 * f * act)
    if pp > 1:
        out["pp boundary"] = 4 * N * C  # activations one way, gradients back: each rank sends one of them
    out["total"] = sum(out.values())
    out["parameter_bytes"] = 4 * pc.total
    return out


# ---------------------------------------------------------------------------------------------
# the driver



def measure(name: str, args) -> dict:
    model = SMOKE_MODEL if args.smoke else MODEL
    spec = {"model": model, "parallel": STRATEGIES[name][1], "global_seqs": args.global_seqs, "warmup": args.warmup, "steps": args.steps}
    start = time.perf_counter()
    res = run_layout(name, spec)
    ranks = sorted(res["ranks"], key=lambda r: r["rank"])
    sent = [r["comm"]["sent"] for r in ranks]
    ana = analytic(name, model, args.global_seqs)
    ops: dict = {}
    for r in ranks:
        for op, e in r["comm"]["by_op"].items():
            o = ops.setdefault(op, {"calls": 0, "payload": 0})
            o["calls"] = max(o["calls"], e["calls"])
            o["payload"] = max(o["payload"], e["payload"])
    row = {
        "strategy": name,
        "label": STRATEGIES[name][2],
        "layout": res["describe"],
        "processes": STRATEGIES[name][0],
        "step_s_median": statistics.median(res["times"]),
        "step_s": res["times"],
        "peak_bytes_per_rank": [r["peak"] for r in ranks],
        "sent_bytes_per_rank": sent,
        "received_p2p_bytes_per_rank": [r["comm"]["received_p2p"] for r in ranks],
        "analytic_sent_bytes": ana,
        "ratio_max_rank": (max(sent) / ana["total"]) if ana["total"] else None,
        "ops_max_rank": ops,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps({k: row[k] for k in ("strategy", "step_s_median", "peak_bytes_per_rank", "sent_bytes_per_rank", "ratio_max_rank")}),
          flush=True)  # fmt: skip
    return row


def markdown(result: dict) -> str:
    env, rows = result["environment"], result["rows"]
    mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    kib = lambda b: f"{b / 2**10:,.0f}"  # noqa: E731
    m = ModelConfig(**result["model"])
    pc = count_params(m)
    lines = [
        "# Scaling on CPU processes: step time, peak memory and bytes communicated per step",
        "",
        f"- device: {env['device']}",
        f"- torch {env['torch']}, python {env['python']}, backend gloo",
        "- commands (timed): " + "; ".join(f"`{c}`" for c in dict.fromkeys(r.get("command", result["command"]) for r in rows)),
        f"- date: {result['date']}",
        f"- model: {m.n_layer} layers x {m.n_embd} wide, {m.n_head} heads, context {m.seq_len}, vocabulary {m.vocab_size}, untied, "
        f"no QK-norm: {pc.total / 1e6:.2f}M parameters ({mib(4 * pc.total)} MiB in fp32); fp32, AdamW, gradient clipping 1.0",
        f"- global batch: {result['global_seqs']} sequences ({result['global_seqs'] * m.seq_len} tokens) per step for every layout; "
        "each data-parallel replica takes its share in one micro-batch; a pipeline cuts it into `pp` pieces",
        f"- step time: median over {result['steps']} steps after {result['warmup']} warm-up steps of the slowest rank's step "
        "(ranks start each step at a barrier). " + (result.get("timing_note") or ""),
        "- peak memory: the largest running total of live tensor bytes on each rank from before the model is built through the "
        "warm-up steps, from `torch.profiler(profile_memory=True)` (as bench/plan_memory.py); the table shows the largest rank",
        "- bytes sent: measured on one more step by a TorchDispatchMode that records every c10d and functional collective "
        "(the ops `CommDebugMode` tracks) with its payload and group size; turned into bytes this rank sends with ring algorithms "
        "(all-reduce 2(n-1)/n S, all-gather (n-1) x input, reduce-scatter (n-1)/n S, send S). The largest rank is shown; "
        "'analytic' is `analytic()` in the script (DDP 2(n-1)/n x 4P, FSDP2 (n-1)/n x 4 x (2P + re-gathered parameters), "
        "TP 8 (t-1)/t x 4NC per layer + embedding/output, PP 4NC per boundary)",
        *(
            [
                f"- byte counts of {', '.join(r['label'] for r in rows if r.get('comm_command'))} re-measured without timing by "
                f"`{next(r['comm_command'] for r in rows if r.get('comm_command'))}`"
            ]
            if any(r.get("comm_command") for r in rows)
            else []
        ),  # fmt: skip
        "",
        "| layout | processes | step (ms) | vs 1 process | peak memory per rank (MiB) | sent per rank, measured (KiB) | analytic (KiB) "
        "| measured / analytic | sent / parameter bytes | collectives per step (largest rank) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    base = next((r["step_s_median"] for r in rows if r["strategy"] == "single"), None)
    for r in rows:
        ana = r["analytic_sent_bytes"]["total"]
        sent = max(r["sent_bytes_per_rank"])
        ops = ", ".join(f"{op.replace('functional.', 'f.')} {e['calls']}" for op, e in sorted(r["ops_max_rank"].items()))
        speed = f"{r['step_s_median'] / base:.2f}x" if base else "-"
        ratio = f"{sent / ana:.3f}" if ana else "-"
        lines.append(
            f"| {r['label']} | {r['processes']} | {1000 * r['step_s_median']:.1f} | {speed} | {mib(max(r['peak_bytes_per_rank']))} | "
            f"{kib(sent)} | {kib(ana)} | {ratio} | {sent / r['analytic_sent_bytes']['parameter_bytes']:.2f} | {ops or '-'} |"
        )
    lines += ["", "Analytic terms (KiB per rank per step):", ""]
    for r in rows:
        terms = {k: v for k, v in r["analytic_sent_bytes"].items() if k not in ("total", "parameter_bytes")}
        if terms:
            lines.append(f"- {r['label']}: " + ", ".join(f"{k} {kib(v)}" for k, v in terms.items()))
    lines += ["", *notes(rows, m)]
    return "\n".join(lines) + "\n"


def notes(rows: list[dict], m: ModelConfig) -> list[str]:
    """What the table says, from its own numbers."""
    comm = [r for r in rows if r["analytic_sent_bytes"]["total"]]
    ratios = [max(r["sent_bytes_per_rank"]) / r["analytic_sent_bytes"]["total"] for r in comm]
    out = []
    if ratios:
        extra = max(max(r["sent_bytes_per_rank"]) - r["analytic_sent_bytes"]["total"] for r in comm)
        out.append(
            f"- Measured against analytic: {min(ratios):.4f} to {max(ratios):.4f} over the {len(ratios)} layouts that communicate. "
            "What the formulas leave out is small (at most "
            f"{extra / 2**10:,.0f} KiB per step): the gradient-norm reductions, loss parallel's reductions of per-token maxima and "
            "sums, the all-reduces of the replicated norm gains' gradients under tensor parallel, the pipeline's loss hand-over."
        )
    pc = count_params(m)
    kept = (pc.embedding + pc.output + pc.other + pc.per_block) / pc.total
    out.append(
        "- The rules of thumb '2x the parameter bytes for DDP, 3x for FSDP2' are the many-process limit: per rank a ring all-reduce "
        "sends 2(n-1)/n of the buffer, an all-gather or reduce-scatter (n-1)/n, so at n = 2 DDP sends 1.0x and FSDP2 at most 1.5x "
        "(1.5x and 2.25x at n = 4). FSDP2 sends less than that (column 'sent / parameter bytes') because the root and the last "
        f"block are not all-gathered again in backward ({kept:.0%} of the parameters here)."
    )
    bcast = [(r["label"], r["ops_max_rank"]["broadcast_"]) for r in rows if "broadcast_" in r["ops_max_rank"]]
    if bcast:
        out.append(
            "- Broadcasts are listed but not in 'sent' (only the root sends). "
            + "; ".join(f"{label}: {op['calls']} per step, {op['payload']:,} bytes" for label, op in bcast)
            + ". A pipeline broadcasts the loss from its last stage (`Pipeline._run`), so every rank logs the same number. "
            "DDP does not re-broadcast its buffers before every forward (`apply_ddp` turns that off: the rotary tables are "
            "computed on every rank)."
        )
    fsdp = [r for r in rows if "fsdp all-gather bwd" in r["analytic_sent_bytes"]]
    if fsdp:
        out.append(
            "- FSDP2 keeps the root's parameters (embedding, output, final norm) gathered from forward into backward, and the "
            "last block's: backward starts with them. `apply_fsdp` gives the root torch's default, `reshard_after_forward=None` "
            "(it used to pass True explicitly, which turns that rule off: the root was all-gathered a second time in backward, 13% "
            "of FSDP2 x2's bytes in the previous measurement)."
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategies", default="", help=f"comma-separated subset of: {', '.join(STRATEGIES)} (default: all)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per layout")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (memory is profiled over them)")
    p.add_argument("--global-seqs", type=int, default=GLOBAL_SEQS, help="global batch in sequences")
    p.add_argument("--smoke", action="store_true", help="a tiny model and 2 timed steps (for tests)")
    p.add_argument("--timing-note", default="", help="a sentence on how the timed run was placed (cores, lock), for the report")
    p.add_argument("--out", default="", help="write OUT.jsonl and OUT.md")
    p.add_argument("--merge", action="store_true", help="keep the other layouts already in OUT.jsonl")
    p.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.jsonl")
    p.add_argument("--comm-only", action="store_true", help="with --merge: replace only the byte counts of the layouts measured")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        out = worker(json.loads(args.worker))
        if out is not None:
            print(json.dumps(out), flush=True)
        return 0

    import torch

    if args.smoke:
        args.steps, args.warmup = 2, 1
    if args.render:  # the tables again from OUT.jsonl, measuring nothing
        rows = [json.loads(ln) for ln in Path(args.out).with_suffix(".jsonl").read_text().splitlines() if ln.strip()]
        result = {**{k: rows[0][k] for k in ("command", "date", "environment", "model", "global_seqs")}, "rows": rows}
        result.update(steps=len(rows[0]["step_s"]), warmup=rows[0].get("warmup", "?"), timing_note=rows[0].get("timing_note", ""))
        Path(args.out).with_suffix(".md").write_text(markdown(result), encoding="utf-8")
        return 0
    names = [n.strip() for n in args.strategies.split(",")] if args.strategies else list(STRATEGIES)
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        p.error(f"unknown strategies: {', '.join(unknown)}")
    rows = []
    for name in names:
        try:
            rows.append(measure(name, args))
        except Exception as exc:  # one failing layout does not lose the others
            print(f"{name}: failed: {exc}", file=sys.stderr)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "environment": {
            "device": f"{cpu_name()}, {affinity} core(s) available to the run, 1 torch thread per process",
            "torch": torch.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "model": SMOKE_MODEL if args.smoke else MODEL,
        "global_seqs": args.global_seqs,
        "steps": args.steps,
        "warmup": args.warmup,
        "timing_note": args.timing_note,
        "rows": rows,
    }
    measured = len(rows)
    if args.out and args.merge and Path(args.out).with_suffix(".jsonl").is_file():
        # keep the layouts measured by an earlier command (e.g. the other half, each under its own lock)
        old = [json.loads(ln) for ln in Path(args.out).with_suffix(".jsonl").read_text().splitlines() if ln.strip()]
        if args.comm_only:  # only the bytes are new: step times and memory stay those of the earlier (timed) command
            new = {r["strategy"]: r for r in rows}
            comm = ("sent_bytes_per_rank", "received_p2p_bytes_per_rank", "analytic_sent_bytes", "ratio_max_rank", "ops_max_rank")
            rows = [{**r, **{k: new[r["strategy"]][k] for k in comm}, "comm_command": result["command"]} if r["strategy"] in new else r
                    for r in old]  # fmt: skip
            old = []
            result.update({k: rows[0][k] for k in ("command", "date", "warmup", "timing_note") if k in rows[0]})
            result["steps"] = len(rows[0]["step_s"])
        else:
            result["command"] += " (layouts measured by separate commands of this form, merged)"
        done = {r["strategy"] for r in rows}
        rows += [r for r in old if r["strategy"] not in done]
        rows.sort(key=lambda r: list(STRATEGIES).index(r["strategy"]))
        result["rows"] = rows
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.with_suffix(".jsonl").open("w", encoding="utf-8") as f:
            for r in rows:
                keep = ("command", "date", "environment", "model", "global_seqs", "warmup", "timing_note")
                f.write(json.dumps({**{k: result[k] for k in keep}, **r}) + "\n")
        out.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    return 0 if measured == len(names) else 1


if __name__ == "__main__":
    raise SystemExit(main())
