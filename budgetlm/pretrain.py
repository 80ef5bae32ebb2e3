"""Budgeted pretraining: setup -> fit -> validate, stopping on the budget.

`setup` opens the data (fixing the vocabulary), builds the model on `meta`, parallelises and
initialises it (`budgetlm.distributed.parallelize`), then the optimizer, the micro-batch size and
the loop state; `fit` runs optimizer steps (`budgetlm.train_step`) until the clock says stop;
`validate` evaluates, saves and writes the report.

The learning rate, the batch-size ramp and stopping are functions of budget progress
(elapsed / budget), so the decay ends at the deadline whatever the throughput (Cramming).
One code path for CPU, one GPU and N processes under torchrun: the global batch is fixed by the
config and gradient accumulation is derived from it, so 1 and 8 processes do the same math
(nanochat). What the clock counts is documented in budgetlm/budget.py and the README.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from budgetlm import checkpoint as ckpt
from budgetlm import continued, speed
from budgetlm.budget import Clock, hms, parse_budget
from budgetlm.config import RunConfig, apply_overrides, config_overrides, load_recipe, override_keys, save_config, to_dict
from budgetlm.data.dataset import PreparedData
from budgetlm.data.loader import DeviceBatches, TrainBatches, seq_len_at, split_windows
from budgetlm.data.masking import mask_tokens
from budgetlm.data.vocab import can_derive, derive_vocabulary, derived_path
from budgetlm.distributed import (
    MESH_DIMS,
    DistInfo,
    ParallelDims,
    Parallelized,
    all_reduce_max,
    barrier,
    broadcast_object,
    build_mesh,
    check_parallel_config,
    cleanup,
    init_distributed,
    parallelize,
    print0,
)
from budgetlm.distributed.pipeline import build_pipeline, make_stage, merge_stages, stage_ids, stage_layers
from budgetlm.errors import UserError
from budgetlm.evaluate.lm import evaluate_lm
from budgetlm.files import write_json
from budgetlm.hardware import peak_flops
from budgetlm.model import Transformer, compute_loss
from budgetlm.optim import batch_size_at, build_optimizer, check_schedule, lr_at, ramp_progress, set_lr
from budgetlm.plan import Corpus, Plan, Planner, apply_plan, format_plan, make_plan, user_fixed
from budgetlm.report import write_plots, write_report
from budgetlm.run import CHECKPOINT_DIR, CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, run_config
from budgetlm.trackers import parse_trackers
from budgetlm.tracking import MetricsLog, environment
from budgetlm.train_step import train_step

PLAN_FILE = "plan.json"
CPU_MICRO_BATCH_TOKENS = 8192  # one forward of this many tokens keeps a laptop CPU busy without swapping


# ---------------------------------------------------------------------------------------------
# configuration


def resolve_config(recipe: str | None, budget: str | None, overrides: list[str], data: str | None) -> RunConfig:
    """Defaults <- recipe <- --budget <- dotted flags / --set <- --data, then checked."""
    cfg = load_recipe(recipe) if recipe else RunConfig()
    if budget:
        cfg.budget.limit = budget
    apply_overrides(cfg, overrides)
    if data:
        cfg.data = str(Path(data).resolve())
    check_config(cfg)
    return cfg


def check_config(cfg: RunConfig) -> None:
    """Contradictions the type system cannot see, each named by key."""
    m, t = cfg.model, cfg.train
    parse_budget(cfg.budget.limit)
    parse_trackers(t.trackers)
    if m.n_embd % m.n_head:
        raise UserError(f"model.n_embd={m.n_embd} must be divisible by model.n_head={m.n_head}")
    if (m.n_embd // m.n_head) % 2:
        raise UserError(f"head size model.n_embd/model.n_head={m.n_embd // m.n_head} must be even for rotary embeddings")
    if m.n_kv_head and m.n_head % m.n_kv_head:
        raise UserError(f"model.n_head={m.n_head} must be divisible by model.n_kv_head={m.n_kv_head}")
    if t.batch_tokens < m.seq_len:
        raise UserError(f"train.batch_tokens={t.batch_tokens} is smaller than one sequence (model.seq_len={m.seq_len})")
    check_schedule(t)  # warm-up, cool-down, ramp and min_lr_ratio: before anything is written
    if not 0.0 <= t.seq_warmup < 1.0:
        raise UserError(f"train.seq_warmup must be a fraction of the budget in [0, 1), got {t.seq_warmup}")
    if t.z_loss < 0:
        raise UserError(f"train.z_loss={t.z_loss} must be >= 0")
    if m.logit_softcap < 0:
        raise UserError(f"model.logit_softcap={m.logit_softcap} must be > 0, or 0 for none")
    if cfg.parallel.pp > 1 and (t.seq_warmup or t.z_loss):  # the pipeline's schedule owns the loss and fixes the shapes
        raise UserError("parallel.pp > 1 does not support train.seq_warmup or train.z_loss yet")
    if cfg.parallel.tp > 1 and cfg.parallel.loss_parallel and t.z_loss:
        raise UserError("train.z_loss needs whole logits: set parallel.loss_parallel=false with parallel.tp > 1")
    if cfg.parallel.tp > 1 and m.mlm_head:  # the tensor-parallel plan has no layout for the head between the final norm and the output
        raise UserError("model.mlm_head is not supported with parallel.tp > 1 yet")
    if m.mlm_head and m.objective != "masked":
        raise UserError("model.mlm_head is the masked objective's prediction head; a causal model has none")
    if not m.first_attention_norm and not m.embed_norm:
        raise UserError("model.first_attention_norm=false needs model.embed_norm=true (the first block would read raw embeddings)")
    if not 0 < t.mlm_rate < 1:
        raise UserError(f"train.mlm_rate={t.mlm_rate} must be in (0, 1)")
    if not 0 <= cfg.budget.reserve < 0.5:
        raise UserError(f"budget.reserve={cfg.budget.reserve} must be in [0, 0.5)")
    if not cfg.auto:  # with auto the plan may still change the model (e.g. untie the head for a pipeline): checked in setup
        check_parallel_config(cfg)


# ---------------------------------------------------------------------------------------------
# setup


@dataclass
class Precision:
    name: str  # bf16 | fp16 | fp32
    dtype: torch.dtype
    device_type: str

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def choose_precision(setting: str, device: torch.device) -> Precision:
    if setting == "auto":
        if device.type == "cuda":
            setting = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            setting = "fp32"
    if setting == "fp16" and device.type != "cuda":
        raise UserError("train.precision=fp16 needs a CUDA GPU (use bf16 or fp32 on CPU)")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[setting]
    return Precision(setting, dtype, device.type)


def divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def choose_micro_batch(cfg: RunConfig, per_replica_seqs: int, par: Parallelized, optimizer, precision: Precision, device: torch.device) -> int:
    """Sequences per forward pass: the configured value, or the largest divisor of the per-replica
    batch that fits (CPU: a token cap; GPU: probed with a forward+backward, halving on OOM).

    The GPU probe runs once the optimizer exists and holds a stand-in for its state (AdamW's two
    moments, allocated lazily at the first step), so what it finds still fits when training."""
    if cfg.train.micro_batch:
        if per_replica_seqs % cfg.train.micro_batch:
            raise UserError(f"train.micro_batch={cfg.train.micro_batch} must divide the per-replica batch of {per_replica_seqs} sequences")
        return cfg.train.micro_batch
    candidates = divisors_desc(per_replica_seqs)
    if hasattr(par.train_model, "pipeline_step"):  # the schedule cuts each micro-batch into n pieces
        n = par.train_model.n_microbatches
        fits = [d for d in candidates if d % n == 0 and d * cfg.model.seq_len <= CPU_MICRO_BATCH_TOKENS * n]
        if not fits:
            raise UserError(f"the per-replica batch of {per_replica_seqs} sequences does not split into parallel.pp_microbatches={n}")
        return fits[0]
    if device.type != "cuda":
        return next(d for d in candidates if d * cfg.model.seq_len <= CPU_MICRO_BATCH_TOKENS or d == 1)
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p
    state_elems = sum(2 * local(p).numel() for g in optimizer.param_groups for p in g["params"] if local(p).device.type == "cuda")
    reserve = torch.empty(state_elems, dtype=torch.float32, device=device)
    # the bare model: DDP's hooks would all-reduce the probe's gradients
    model = par.model if par.compiled != "whole" else par.train_model
    loss_ctx = contextlib.nullcontext
    if par.loss_parallel:
        from torch.distributed.tensor.parallel import loss_parallel as loss_ctx
    chosen = 1
    for d in candidates:
        try:
            x = torch.randint(0, cfg.model.vocab_size, (d, cfg.model.seq_len), device=device)
            with loss_ctx():
                with precision.autocast():
                    loss = compute_loss(model, x, x)
                loss.backward()
            model.zero_grad(set_to_none=True)
            chosen = d
            break
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    else:
        raise UserError(f"not even one sequence of {cfg.model.seq_len} tokens fits on {device}; lower model.seq_len or the model size")
    del reserve
    torch.cuda.empty_cache()
    return min_over_ranks(chosen)


def min_over_ranks(value: int) -> int:
    """The smallest `value` over ranks (all ranks must use the same micro-batch)."""
    return int(-all_reduce_max(-float(value)))


@dataclass
class LoopState:
    """Everything besides weights and optimizer that resume needs (saved in state.json)."""

    step: int = 0
    tokens: int = 0
    lr_scale: float = 1.0  # halved on each rollback after repeated non-finite losses
    nan_skips: int = 0
    rollbacks: int = 0
    next_eval: float = 0.0  # progress at which the next periodic evaluation runs
    evals: list = field(default_factory=list)
    done: bool = False
    extension: dict | None = None  # the latest new budget this run was given (budgetlm.continued)
    extensions: list = field(default_factory=list)  # every one, in order


def make_batch(w: torch.Tensor, cfg: RunConfig, tokenizer, sample_ids: list[int] | None = None):
    """Inputs and targets from a (B, T+1) window: shifted for causal, masked for masked.

    Each window's mask is drawn from its own generator, seeded by the run's seed and the window's
    place in the data stream (`TrainBatches.sample_ids`), so a window is masked the same way
    whatever the number of processes, the micro-batch size or a resume in between."""
    if cfg.model.objective == "causal":
        return w[:, :-1], w[:, 1:]
    ids = sample_ids if sample_ids is not None else range(w.shape[0])
    rows = [
        mask_tokens(
            w[i : i + 1, :-1],
            mask_id=tokenizer.mask_id,
            vocab_size=tokenizer.vocab_size,
            rate=cfg.train.mlm_rate,
            special_ids=tokenizer.special_ids,
            generator=torch.Generator().manual_seed((cfg.train.seed + 1) * 1_000_003 + sid),
        )
        for i, sid in enumerate(ids)
    ]
    return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])


def prepare_run_dir(run_dir: Path, cfg: RunConfig, data: PreparedData, dist: DistInfo) -> None:
    if dist.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / CONFIG_FILE)
        shutil.copyfile(Path(cfg.data) / "tokenizer.json", run_dir / TOKENIZER_FILE)
        write_json(run_dir / "env.json", environment(str(dist.device)))
        m = data.manifest
        splits = {name: {k: split[k] for k in ("documents", "tokens", "bytes")} for name, split in m["splits"].items()}
        write_json(run_dir / "data.json", {"path": cfg.data, "tokenizer_sha256": m["tokenizer"]["sha256"], "splits": splits})
    barrier()


def changed_keys(cfg: RunConfig) -> set[str]:
    """Dotted keys whose value differs from the default: what a user of the Python API set."""
    default = RunConfig()
    out = set()
    for section in ("model", "train"):
        mine, base = getattr(cfg, section), getattr(default, section)
        out |= {f"{section}.{k}" for k in base.__dataclass_fields__ if getattr(mine, k) != getattr(base, k)}
    return out


def plan_run(cfg: RunConfig, dist: DistInfo, user_keys: set[str] | None) -> Plan:
    """Fill every key the user did not set from the budget (`budgetlm.plan`), timing candidate models
    on this device, and derive the chosen vocabulary from the prepared one. Rank 0 plans and the
    other ranks take its plan, so every process trains the same model."""
    if not cfg.data:
        raise UserError("no data directory: pass --data DIR (from `budgetlm data prepare`)")
    data, device = PreparedData(cfg.data), dist.device
    user_keys = changed_keys(cfg) if user_keys is None else set(user_keys)
    fixed_model, fixed_train = user_fixed(cfg, user_keys)
    if cfg.model.objective == "masked" or not can_derive(data.tokenizer):
        fixed_model["vocab_size"] = data.vocab_size
    if "model.vocab_size" in user_keys:
        fixed_model["vocab_size"] = cfg.model.vocab_size
    par = cfg.parallel
    if par.tp > 1 or par.pp > 1 or par.fsdp_cpu_offload or par.dp_shard > 1 or (par.dp_shard == -1 and dist.world_size > 1):
        fixed_train.setdefault("optimizer", "adamw")  # Muon orthogonalises whole matrices; sharded layouts keep AdamW
    plan = None
    if dist.rank == 0:
        print0(f"choosing the model for a {cfg.budget.limit} budget on {device} (timing candidates; cached for later runs)")
        start = time.monotonic()
        derivable, corpus = can_derive(data.tokenizer), Corpus.of(data)
        planner = Planner(device, vocab_cap=data.vocab_size, vocab_derivable=derivable, corpus=corpus, world_size=dist.world_size, log=print0)
        plan = make_plan(cfg.budget.limit, planner, fixed_model=fixed_model, fixed_train=fixed_train, reserve=cfg.budget.reserve)
        print0(format_plan(plan))
        print0(f"planned in {time.monotonic() - start:.1f}s (before the clock starts)")
    plan = broadcast_object(plan)
    apply_plan(cfg, plan, keep_max_tokens="budget.max_tokens" in user_keys)
    if plan.vocab_size != data.vocab_size:
        if dist.rank == 0:  # about twice the tokens the run will read, in case it runs faster than planned
            derive_vocabulary(data, plan.vocab_size, max_train_tokens=int(2 * plan.tokens * data.vocab_size / plan.vocab_size), log=print0)
        barrier()
        cfg.data = str(derived_path(data, plan.vocab_size))
    return plan


def open_data(cfg: RunConfig) -> PreparedData:
    """The prepared data, with model.vocab_size fixed to its tokenizer's."""
    if not cfg.data:
        raise UserError("no data directory: pass --data DIR (from `budgetlm data prepare`)")
    data = PreparedData(cfg.data)
    tokenizer = data.tokenizer
    if cfg.model.vocab_size and cfg.model.vocab_size != tokenizer.vocab_size:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} does not match the data's tokenizer ({tokenizer.vocab_size})")
    cfg.model.vocab_size = tokenizer.vocab_size
    if cfg.model.objective == "masked" and tokenizer.mask_id is None:
        raise UserError("model.objective=masked needs a tokenizer with a mask token (prepare with --tokenizer wordpiece)")
    return data


def build_model(cfg: RunConfig, dims: ParallelDims, dist: DistInfo, precision: Precision) -> tuple[Transformer, Parallelized]:
    """The model on `meta`, parallelised (tensor parallel, checkpointing, compile, FSDP2/DDP), then
    allocated and initialised shard by shard. Returns the full model's description (for counting
    parameters and FLOPs) and what to train."""
    device = dist.device
    full = Transformer.on_meta(cfg.model)  # shapes only: counts without memory
    compile_on = cfg.train.compile == "true" or (cfg.train.compile == "auto" and device.type == "cuda")
    mesh = build_mesh(dims, device)
    torch.manual_seed(cfg.train.seed)
    seed = int(torch.randint(0, 2**62, ()))  # the same initialisation on every rank, stage and layout
    param_dtype = precision.dtype if precision.name == "bf16" else None
    if not dims.pp_enabled:
        model = Transformer.on_meta(cfg.model)
        return full, parallelize(model, dims, cfg, mesh, device, compile_on=compile_on, param_dtype=param_dtype, seed=seed)
    # this rank's pipeline stages: each the same model with the other stages' parts deleted, parallelised on its own
    m, p = cfg.model, cfg.parallel
    stages, n_stages = stage_ids(dims.coords(dist.rank)["pp"], dims.pp, p.pp_schedule, p.pp_virtual_stages)
    layers = stage_layers(m.n_layer, m.n_embd, full.padded_vocab_size, n_stages)
    parts = []
    for s in stages:
        model = make_stage(Transformer.on_meta(m), layers[s], first=s == 0, last=s == n_stages - 1)
        parts.append(parallelize(model, dims, cfg, mesh, device, compile_on=compile_on, param_dtype=param_dtype, seed=seed))
    pipe = build_pipeline([q.train_model for q in parts], stages=stages, n_stages=n_stages, pp_mesh=mesh["pp"], device=device,
                          schedule=p.pp_schedule, n_microbatches=p.pp_microbatches or dims.pp)  # fmt: skip
    return full, Parallelized(pipe, merge_stages([q.model for q in parts]), parts[0].compiled, loss_parallel=False)


@dataclass
class SteadyRate:
    """What this session's training steps sustained: every step but the first (which compiles and warms
    up), evaluation and checkpointing left out, as the plan's timed speed counts them."""

    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    wait_share: float = 0.0  # of the loop's threads' time spent waiting for a CPU (other work on the machine)

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens, self.seconds, self.steps = self.tokens + tokens, self.seconds + seconds, self.steps + 1

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Trainer:
    """One pretraining run's state, built by `setup` and driven by `fit` then `validate`."""

    cfg: RunConfig
    run_dir: Path
    dist: DistInfo
    dims: ParallelDims
    data: PreparedData
    full: Transformer  # on meta: the whole model's shapes
    par: Parallelized
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    precision: Precision
    global_seqs: int
    per_replica_seqs: int
    micro: int
    loader: TrainBatches
    batches: DeviceBatches
    clock: Clock
    state: LoopState
    metrics: MetricsLog
    peak: float
    peak_source: str
    cost: dict = field(default_factory=lambda: {"eval": 0.0, "save": 0.0})  # seconds of the last evaluation / save
    loss_fn: Callable | None = None  # (model, (x, y)) -> loss; None: the language-modelling loss (distillation passes its own)
    seq_len: int = 0  # this step's training sequence length (train.seq_warmup); 0 until fit sets it
    plan: Plan | None = None  # made for this run in this process (not on resume)
    steady: SteadyRate = field(default_factory=SteadyRate)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR

    # -- pieces the loop uses --------------------------------------------------------------------

    def next_batch(self):
        ids = self.loader.sample_ids(self.micro) if self.cfg.model.objective == "masked" else None
        x, y = make_batch(self.loader.next(self.micro), self.cfg, self.data.tokenizer, ids)
        if self.seq_len < self.cfg.model.seq_len:  # sequence-length warm-up: the same tokens in shorter pieces
            x, y = split_windows(x, self.seq_len), split_windows(y, self.seq_len)
        return x, y

    def timed(self, kind: str, fn, *a, **kw):
        """Run fn, remember its duration, and keep that much of the budget free for the end."""
        start = time.monotonic()
        out = fn(*a, **kw)
        self.cost[kind] = time.monotonic() - start
        self.clock.expect_tail(1.25 * (self.cost["eval"] + self.cost["save"]))  # the final eval + save, with a margin
        return out

    def save(self, done: bool = False) -> None:
        """A checkpoint of everything resume needs: single files from one process; from several, every
        rank writes its own shards (torch.distributed.checkpoint), nothing is gathered (a collective)."""
        loop = {
            "loop": {**self.state.__dict__, "done": done},
            # the stream position is global, the same on every rank: each rank's next windows follow
            # from it and the rank's data-parallel index, for any number of ranks
            "loader": self.loader.state_dict(),
            "clock": self.clock.state_dict(),
            # fp16 runs under DDP only, where every rank unscales the same all-reduced gradients: one scaler state
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "layout": {"world_size": self.dims.world_size, **{k: getattr(self.dims, k) for k in MESH_DIMS}},
        }
        if self.dist.world_size > 1:
            ckpt.save_sharded_checkpoint(self.ckpt_dir, self.par.model, self.optimizer, loop)
            return
        model_state, optim_state = ckpt.full_train_state(self.par.model, self.optimizer)
        ckpt.save_checkpoint(self.ckpt_dir, model_state=model_state, optimizer_state=optim_state, loop_state=loop)

    def restore(self, restore_rng: bool = True) -> dict:
        """Load the last checkpoint into the model, optimizer and scaler (any layout); returns its loop state."""
        partial = self.dims.pp_enabled  # a pipeline stage loads its own part (of a single-file checkpoint)
        loop = ckpt.load_checkpoint(self.ckpt_dir, self.par.model, self.optimizer, restore_rng=restore_rng, partial=partial)
        if self.scaler is not None and loop.get("scaler"):
            self.scaler.load_state_dict(loop["scaler"])
        return loop

    @property
    def gather(self):
        """For a pipeline: how whole states of the stages reach rank 0 for the final weights (None: one model holds them all)."""
        if not self.dims.pp_enabled:
            return None
        c = self.dims.coords(self.dist.rank)
        return {"sender": c["dp"] == 0 and c["tp"] == 0}

    def evaluate(self) -> dict:
        model = self.par.train_model if self.dims.pp_enabled else self.par.model  # a pipeline evaluates through its schedule
        return evaluate_lm(
            model, self.data, objective=self.cfg.model.objective, seq_len=self.cfg.model.seq_len,
            n_tokens=self.cfg.train.eval_tokens, batch_size=self.micro, device=self.device,
            autocast=self.precision.autocast, mlm_rate=self.cfg.train.mlm_rate, loss_parallel=self.par.loss_parallel,
        )  # fmt: skip


def setup(
    cfg: RunConfig, run_dir: Path, resume: bool, dist: DistInfo, user_keys: set[str] | None = None,
    init_from: Path | None = None, init_weights: Path | None = None,
) -> Trainer:
    """Data, then the model, optimizer and loop state (fresh, or from the last checkpoint). A fresh run
    starts from `init_from` (a run whose weights replace the initialisation; its model config is
    already cfg.model) or `init_weights` (a weights file of the same shapes) when given, else from
    `init_weights()`."""
    device = dist.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dims = ParallelDims.resolve(cfg.parallel, dist.world_size)
    plan = plan_run(cfg, dist, user_keys) if cfg.auto and not resume else None  # may point cfg.data at a derived vocabulary
    data = open_data(cfg)  # fixes model.vocab_size
    check_parallel_config(cfg)  # again: the plan may have changed the model's shape
    if cfg.train.optimizer == "muon" and (dims.fsdp or dims.tp_enabled):
        raise UserError("train.optimizer=muon orthogonalises whole matrices: use it without FSDP2 or tensor parallel (DDP or pipeline parallel)")

    seq_len = cfg.model.seq_len
    global_seqs = cfg.train.batch_tokens // seq_len
    if global_seqs % dims.dp:
        raise UserError(f"the global batch of {global_seqs} sequences does not split over {dims.dp} data-parallel replicas")
    per_replica_seqs = global_seqs // dims.dp
    precision = choose_precision(cfg.train.precision, device)
    full, par = build_model(cfg, dims, dist, precision)
    if init_weights is not None and not resume:
        ckpt.load_weights(init_weights, par.model)
    optimizer = build_optimizer(par.model, cfg.train, device.type)
    scaler = torch.amp.GradScaler("cuda") if precision.name == "fp16" else None
    micro = choose_micro_batch(cfg, per_replica_seqs, par, optimizer, precision, device)

    dp_rank = dims.coords(dist.rank)["dp"]
    loader = TrainBatches(data.tokens("train"), seq_len, seed=cfg.train.seed, rank=dp_rank, world_size=dims.dp)
    peak, peak_source = peak_flops(device, precision.dtype)
    trainer = Trainer(
        cfg=cfg, run_dir=run_dir, dist=dist, dims=dims, data=data, full=full, par=par, optimizer=optimizer, scaler=scaler,
        precision=precision, global_seqs=global_seqs, per_replica_seqs=per_replica_seqs, micro=micro, loader=loader,
        batches=None, clock=Clock(parse_budget(cfg.budget.limit), reserve=cfg.budget.reserve, max_tokens=cfg.budget.max_tokens), state=LoopState(),
        metrics=MetricsLog(run_dir, enabled=dist.rank == 0, trackers=cfg.train.trackers, settings=to_dict(cfg)), peak=peak, peak_source=peak_source,
    )  # fmt: skip
    trainer.batches = DeviceBatches(trainer.next_batch, device)
    trainer.plan = plan

    if resume:
        loop = trainer.restore()
        trainer.state = LoopState(**loop["loop"])
        loader_state = loop["loader"]
        # checkpoints before budgetlm 0.x's layouts stored one (identical) loader state per rank
        loader.load_state_dict(loader_state[0] if isinstance(loader_state, list) else loader_state)
        trainer.clock.load_state_dict(loop["clock"])
        if continued.budget_changed(loop["clock"], cfg.budget.limit):
            ext = continued.begin_extension(trainer.state, trainer.clock, loop["clock"], cfg.train)
            print0(f"extending: {continued.describe_extension(ext)}")
        saved = loop.get("layout", {}).get("world_size")
        if saved and saved != dist.world_size:
            print0(f"resuming a run saved on {saved} processes on {dist.world_size} ({dims.describe()})")
        if dist.rank == 0:
            save_config(cfg, run_dir / CONFIG_FILE)  # the budget and layout it continues with
        barrier()
    else:
        if init_from is not None and (init_from / CHECKPOINT_DIR).is_dir():
            loop = ckpt.load_checkpoint(init_from / CHECKPOINT_DIR, par.model, None, restore_rng=False, partial=dims.pp_enabled)
            print0(f"starting from the weights of {init_from} (step {loop['loop']['step']}, {loop['loop']['tokens']:,} tokens)")
        elif init_from is not None:  # an imported run: final weights only
            ckpt.load_weights_any_layout(init_from, par.model)
            loop = {"loop": {"step": 0, "tokens": 0}}
            print0(f"starting from the final weights of {init_from}")
        prepare_run_dir(run_dir, cfg, data, dist)
        if dist.rank == 0:
            if plan is not None:
                write_json(run_dir / PLAN_FILE, plan.to_dict())
            if init_from is not None:
                source = {"run": str(init_from.resolve()), "step": loop["loop"]["step"], "tokens": loop["loop"]["tokens"]}
                write_json(run_dir / continued.INIT_FILE, source)
    return trainer


# ---------------------------------------------------------------------------------------------
# the run


def pretrain(
    cfg: RunConfig,
    run_dir: Path,
    resume: bool = False,
    user_keys: set[str] | None = None,
    init_from: Path | None = None,
    init_weights: Path | None = None,
    loss_fn: Callable | None = None,
) -> dict:
    """Train under cfg.budget into run_dir; returns the final metrics.

    With `cfg.auto`, every model and train key not in `user_keys` (the dotted keys the user set;
    default: those that differ from the defaults) is chosen by `budgetlm.plan` for the budget.
    `init_from`: a run whose latest weights the new run starts from (see `budgetlm.continued`;
    build `cfg` with `continued.init_from_config`). `init_weights` starts from a weights file instead
    (a pruned model's recovery); `loss_fn(model, (x, y))` replaces the language-modelling loss (distillation)."""
    run_dir = Path(run_dir)
    dist = init_distributed(cfg.parallel.backend)
    try:
        summary = _pretrain(cfg, run_dir, resume, dist, user_keys, None if init_from is None else Path(init_from), init_weights, loss_fn)
    except BaseException:
        cleanup(barrier=False)  # the other ranks may be inside another collective: no barrier to hang on
        raise
    cleanup()
    return summary


def _pretrain(cfg: RunConfig, run_dir: Path, resume: bool, dist: DistInfo, user_keys: set[str] | None = None, init_from: Path | None = None,
              init_weights: Path | None = None, loss_fn: Callable | None = None) -> dict:  # fmt: skip
    t = setup(cfg, run_dir, resume, dist, user_keys, init_from, init_weights)
    t.loss_fn = loss_fn
    if t.state.done:
        if t.clock.should_stop(tokens=t.state.tokens, steps=t.state.step):
            print0(f"run {run_dir} already finished; nothing to resume")
            return {"val": t.state.evals[-1] if t.state.evals else {}, "already_finished": True}
        t.state.done = False
        print0(f"run {run_dir} finished at step {t.state.step}; continuing under the longer budget {cfg.budget.limit}")
    announce(t, resume)
    fit(t)
    return validate(t)


def announce(t: Trainer, resume: bool) -> None:
    """The run's first lines; a fresh run also logs its start and writes a step-0 checkpoint."""
    cfg, full = t.cfg, t.full
    n_params, flops_per_token = full.num_params(), full.flops_per_token(cfg.model.seq_len)
    accum = t.per_replica_seqs // t.micro
    if resume:
        print0(f"resuming {t.run_dir} at step {t.state.step} ({t.state.tokens:,} tokens, {t.clock.elapsed():.0f}s of budget used)")
        if t.dist.rank == 0:
            t.metrics.truncate_after(t.state.step)
    print0(
        f"model {n_params / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOPs/token | batch {t.global_seqs} x {cfg.model.seq_len} tokens = "
        f"{t.dims.dp} replicas x {accum} accumulation x {t.micro} micro | {t.dims.describe()} | {t.precision.name} on {t.device}"
        f"{' compiled' if t.par.compiled else ''} | budget {cfg.budget.limit} | peak {t.peak / 1e12:.2f} TFLOP/s ({t.peak_source})"
    )
    if not resume:
        t.metrics.log("event", 0, event="start", params=n_params, flops_per_token=flops_per_token, peak_flops=t.peak, micro_batch=t.micro)
        t.timed("save", t.save)  # a step-0 checkpoint: resume and NaN rollback always have somewhere to go


def _loss(model, batch, z_loss: float = 0.0) -> torch.Tensor:
    x, y = batch
    return compute_loss(model, x, y, z_loss)


def fit(t: Trainer) -> None:
    """Optimizer steps until the budget is spent, with periodic logs, evaluations and checkpoints."""
    cfg, state, clock = t.cfg, t.state, t.clock
    flops_per_token = t.full.flops_per_token(cfg.model.seq_len)
    params = [p for g in t.optimizer.param_groups for p in g["params"]]
    loss_fn = t.loss_fn or functools.partial(_loss, z_loss=cfg.train.z_loss)
    if t.par.compiled == "model+loss":
        loss_fn = torch.compile(loss_fn)  # compiles on the first step, on the clock
    sp = t.dims.tp if t.dims.tp_enabled and cfg.parallel.sequence_parallel else 1  # lengths must split over the TP ranks
    first_step = state.step
    clock.start()
    waits, fit_start = speed.cpu_wait_seconds(), time.monotonic()
    last_ckpt = time.monotonic()
    window_tokens, window_start = 0, time.monotonic()
    try:
        while True:
            progress, stop = _agree(clock, state, t.dist, t.device)
            if stop:
                break
            lr = lr_at(progress, cfg.train, state.extension) * state.lr_scale
            set_lr(t.optimizer, lr)
            ramp = ramp_progress(progress, state.extension)
            accum = max(1, batch_size_at(ramp, cfg.train, t.per_replica_seqs, t.micro) // t.micro)
            t.seq_len = seq_len_at(ramp, cfg.train.seq_warmup, cfg.model.seq_len, sp)
            result = train_step(
                t.par.train_model, t.optimizer, t.batches.take(accum), loss_fn, n_micro=accum, params=params,
                autocast=t.precision.autocast, scaler=t.scaler, grad_clip=cfg.train.grad_clip, loss_parallel=t.par.loss_parallel,
            )  # fmt: skip
            if not result.stepped:
                _handle_nonfinite(t, result.loss)
                continue
            state.nan_skips = 0
            step_tokens = accum * t.micro * t.dims.dp * cfg.model.seq_len
            state.step += 1
            state.tokens += step_tokens
            window_tokens += step_tokens
            step_seconds = clock.step_done()
            if state.step > first_step + 1:
                t.steady.add(step_tokens, step_seconds)

            if state.step % cfg.train.log_every == 0 or state.step == 1:
                if t.device.type == "cuda":
                    torch.cuda.synchronize()
                now = time.monotonic()
                tps = window_tokens / max(now - window_start, 1e-9)
                mfu = tps * flops_per_token / (t.peak * t.dist.world_size)
                window_tokens, window_start = 0, now
                progress = clock.progress(tokens=state.tokens, steps=state.step)
                t.metrics.log("train", state.step, loss=result.loss, lr=lr, tokens=state.tokens, tokens_per_s=tps, mfu=mfu,
                              grad_norm=result.grad_norm, elapsed=clock.elapsed(), progress=progress,
                              batch_seqs=accum * t.micro * t.dims.dp, seq_len=t.seq_len)  # fmt: skip
                left = f", {hms(clock.remaining())} left" if clock.budget.kind == "time" else ""
                print0(
                    f"step {state.step:6d} | loss {result.loss:.4f} | lr {lr:.2e} | {tps:,.0f} tok/s | MFU {mfu:.1%} | "
                    f"{hms(clock.elapsed())} elapsed{left} ({progress:.0%} of budget)"
                )
            if cfg.train.eval_every > 0 and progress >= state.next_eval:
                with clock.overhead():
                    val = t.timed("eval", t.evaluate)
                state.evals.append({"step": state.step, "elapsed": clock.elapsed(), **val})
                state.next_eval = (math.floor(progress / cfg.train.eval_every) + 1) * cfg.train.eval_every
                t.metrics.log("eval", state.step, elapsed=clock.elapsed(), **val)
                print0(f"step {state.step:6d} | val_loss {val['val_loss']:.4f}" + (f" | bits/byte {val['val_bpb']:.4f}" if "val_bpb" in val else ""))
            if time.monotonic() - last_ckpt >= cfg.train.checkpoint_every:
                with clock.overhead():
                    t.timed("save", t.save)
                last_ckpt = time.monotonic()
        if t.device.type == "cpu":  # a GPU's steps are paced by the GPU: a host thread's wait costs them little
            waited = speed.waited_between(waits, speed.cpu_wait_seconds())
            t.steady.wait_share = speed.wait_share(max(time.monotonic() - fit_start, 1e-9), waited, torch.get_num_threads())
    except KeyboardInterrupt:
        t.save()
        print0(f"interrupted at step {state.step}; checkpoint saved, continue with: budgetlm pretrain --resume {t.run_dir}")
        raise


def validate(t: Trainer) -> dict:
    """The final evaluation, checkpoint, consolidated weights, report and summary."""
    cfg, state, clock = t.cfg, t.state, t.clock
    if state.evals and state.evals[-1]["step"] == state.step:  # a periodic evaluation just ran
        val = {k: v for k, v in state.evals[-1].items() if k.startswith("val_")}
    else:
        val = t.evaluate()
        state.evals.append({"step": state.step, "elapsed": clock.elapsed(), **val})
    t.metrics.log("eval", state.step, elapsed=clock.elapsed(), final=True, **val)
    t.save(done=True)
    n_params = t.full.num_params()
    summary = {
        "steps": state.step,
        "tokens": state.tokens,
        "elapsed_s": round(clock.elapsed(), 1),
        "budget": cfg.budget.limit,
        "budget_used": round(_budget_used(clock, state), 4),
        "params": n_params,
        "nan_skips_rollbacks": state.rollbacks,
        **val,
    }
    held_out, asked = len(t.data.tokens("val")), cfg.train.eval_tokens
    summary["val_split_tokens"] = held_out
    # the split is smaller than an evaluation asks: say so next to the number (scoring whole windows of
    # seq_len tokens may fall short of `asked` by less than one window: that is not a small split)
    if val.get("val_tokens", asked) <= asked - cfg.model.seq_len:
        summary["warning"] = (
            f"validation scored {val['val_tokens']:,} tokens, fewer than train.eval_tokens={asked:,} (the split holds {held_out:,}): "
            "the loss is noisier than asked; prepare more data or a larger min_val_tokens"
        )
        print0(f"warning: {summary['warning']}")
    if state.extensions:
        summary["extended"] = "; ".join(continued.describe_extension(e) for e in state.extensions)
    init_file = t.run_dir / continued.INIT_FILE
    if init_file.is_file():
        summary["init_from"] = json.loads(init_file.read_text(encoding="utf-8"))["run"]
    plan_file = t.run_dir / PLAN_FILE
    plan = json.loads(plan_file.read_text(encoding="utf-8")) if plan_file.is_file() else {}
    if plan and clock.budget.kind == "time":  # how well the planner predicted this device's speed
        summary["planned_tokens"] = round(plan["tokens"])
        summary["tokens_vs_plan"] = round(state.tokens / max(plan["tokens"], 1), 3)
        if t.steady.seconds > 0:
            summary["tokens_per_s"] = round(t.steady.tokens_per_s)
            summary["speed_vs_plan"] = round(t.steady.tokens_per_s / plan["tokens_per_s"], 3)
        if t.dist.rank == 0:
            _teach_planner(t)
    if clock.max_tokens and state.tokens >= clock.max_tokens:  # ended by the token limit, before the deadline
        summary["data_limit"] = f"stopped at budget.max_tokens={clock.max_tokens:,}"
        if plan.get("data_limit") == clock.max_tokens:
            summary["data_limit"] += f": {clock.max_tokens / plan['data_tokens']:.1f} passes over the training text, the most it supports"
    weights = ckpt.full_model_state(t.par.model, gather=t.gather)  # consolidated on rank 0, once (a collective when sharded)
    if t.dist.rank == 0:
        ckpt.save_weights_state(t.run_dir / WEIGHTS_FILE, weights)
        write_json(t.run_dir / "eval.json", val)
        samples = []
        if cfg.model.objective == "causal":
            model = t.par.model
            if ckpt.is_sharded(model) or t.dims.pp_enabled:  # sample from one whole copy, built from the consolidated weights
                model = Transformer.build(cfg.model, device=t.device, seed=0)
                ckpt.load_weights(t.run_dir / WEIGHTS_FILE, model)
            samples = _samples(model, t.data, cfg, t.device)
            t.metrics.text("samples", "\n\n".join(f"{prompt}▌{text}" for prompt, text in samples), state.step)
        write_report(t.run_dir, cfg, summary, samples, write_plots(t.run_dir))
        t.metrics.log("event", state.step, event="end", **{k: v for k, v in summary.items() if isinstance(v, (int, float))})
        t.metrics.finish(summary)
    t.metrics.close()
    print0(
        f"done: {state.step} steps, {state.tokens:,} tokens in {hms(summary['elapsed_s'])} | val_loss {val['val_loss']:.4f}"
        + (f" | bits/byte {val['val_bpb']:.4f}" if "val_bpb" in val else "")
        + f" | report {t.run_dir / 'report.md'}"
    )
    return summary


def _teach_planner(t: Trainer) -> None:
    """Record what this run sustained over the speed its plan timed for its model, so that later plans
    of it on this device expect what runs here make (`budgetlm.speed.calibration`). Only a plan made
    for this run, from undisturbed timings, and a long enough run on an undisturbed machine say that."""
    plan, steady = t.plan, t.steady
    if plan is None or not plan.speed_key or plan.cpu_wait or t.state.extensions or t.micro != plan.micro_batch:
        return  # not planned here, timed beside other work, extended, or stepping another micro-batch than was timed
    if steady.seconds < speed.RUN_MIN_SECONDS or steady.steps < speed.RUN_MIN_STEPS or steady.wait_share >= speed.CLEAN_WAIT:
        return
    timed = plan.tokens_per_s / plan.speed_calibration
    ratio = speed.record_run_speed(t.device, t.dist.world_size, plan.speed_key, steady.tokens_per_s, timed)
    if ratio is not None:
        runs = speed.calibration(t.device, plan.speed_key, t.dist.world_size)
        print0(f"sustained {steady.tokens_per_s:,.0f} tokens/s, {ratio:.2f}x the speed timed for the plan; plans of this model here now "
               f"expect {runs.factor:.2f}x its timing ({f'the median of {runs.runs} runs' if runs.runs > 1 else 'one run'})")  # fmt: skip


def _handle_nonfinite(t: Trainer, loss_val: float) -> None:
    """Skip a step with a non-finite loss or gradient; after `max_nan_skips` in a row, roll back
    to the last checkpoint's weights, optimizer and scaler with half the learning rate. The data
    position and the clock go on, so the batches that diverged are not replayed."""
    state, cfg = t.state, t.cfg
    state.nan_skips += 1
    t.metrics.log("event", state.step, event="nonfinite_loss", loss=str(loss_val), consecutive=state.nan_skips)
    print0(f"step {state.step}: non-finite loss ({loss_val}); step skipped ({state.nan_skips}/{cfg.train.max_nan_skips})")
    if state.nan_skips < cfg.train.max_nan_skips:
        return
    restored = t.restore(restore_rng=False)["loop"]
    state.step, state.tokens = restored["step"], restored["tokens"]
    state.rollbacks += 1
    state.lr_scale *= 0.5
    state.nan_skips = 0
    t.metrics.log("event", state.step, event="rollback", lr_scale=state.lr_scale)
    print0(f"rolled back to the checkpoint at step {state.step}; learning rate scaled by {state.lr_scale:g}")


def _agree(clock: Clock, state: LoopState, dist: DistInfo, device: torch.device) -> tuple[float, bool]:
    """Budget progress and the stop decision, taken from rank 0 so every rank uses the same
    learning rate and stops at the same step (each rank's clock drifts a little)."""
    progress = clock.progress(tokens=state.tokens, steps=state.step)
    stop = clock.should_stop(tokens=state.tokens, steps=state.step)
    if dist.world_size == 1:
        return progress, stop
    t = torch.tensor([progress, float(stop)], dtype=torch.float64, device=device)
    torch.distributed.broadcast(t, src=0)
    return float(t[0]), bool(t[1])


def _budget_used(clock: Clock, state: LoopState) -> float:
    """The fraction of the whole budget (reserve included) the run used."""
    done = {"time": clock.elapsed(), "tokens": state.tokens, "steps": state.step}[clock.budget.kind]
    return done / clock.budget.limit


@torch.no_grad()
def _samples(model: Transformer, data: PreparedData, cfg: RunConfig, device: torch.device, n: int = 2, new_tokens: int = 64) -> list[tuple[str, str]]:
    """A few continuations of held-out text, for the report: each prompt is the first 12 tokens of
    a validation document (found after a separator), so it starts where a text starts."""
    from budgetlm.generate import generate

    tok = data.tokenizer
    val = data.tokens("val")
    out = []
    for i in range(n):
        start = i * max(1, len(val) // n)
        window = [int(t) for t in val.get(start, min(4096, len(val) - start))]
        seps = [j for j, t in enumerate(window) if t == tok.eos_id]
        if seps and i > 0:  # the first sample starts at the split's first document already
            start += seps[0] + 1
        ids = [int(t) for t in val.get(start, min(12, len(val) - start)) if int(t) not in tok.special_ids] or [tok.eos_id]
        idx = torch.tensor([ids], device=device)
        gen = torch.Generator(device=device).manual_seed(i)
        new = generate(model, idx, new_tokens, temperature=0.8, top_k=50, generator=gen)
        out.append((tok.decode(ids), tok.decode(new[0, len(ids):].tolist())))
    return out


# ---------------------------------------------------------------------------------------------
# the command


def start_run(cfg: RunConfig, out: str | Path | None, user_keys: set[str] | None = None, init_from: Path | None = None) -> dict:
    """A new run of `cfg` in `out` (which must not hold anything yet), from scratch or from `init_from`'s
    weights; the final metrics."""
    if not out:
        raise UserError("pass --out RUN, the run directory to create")
    run_dir = Path(out)
    if run_dir.exists() and any(run_dir.iterdir()):
        hint = " (continue it with --resume)" if (run_dir / CHECKPOINT_DIR).exists() else ""
        raise UserError(f"run directory {run_dir} exists and is not empty{hint}")
    return pretrain(cfg, run_dir, user_keys=user_keys, init_from=init_from)


def resume_config(run: str | Path, budget: str | None, overrides: list[str]) -> RunConfig:
    """The config a resumed run continues with: its own, a longer budget and another layout allowed."""
    if any(not o.startswith("parallel.") for o in overrides):
        raise UserError("--resume continues a run with its own config; only --budget (a longer one) and parallel.* (another layout) may change")
    run_dir = Path(run)
    cfg = run_config(run_dir)
    from budgetlm.compress import compression_info

    if (compression_info(run_dir) or {}).get("method") == "distill":
        raise UserError(f"{run_dir} is a distilled student: its loss needs the teacher, and --resume would train it without; distill again")
    if not (run_dir / CHECKPOINT_DIR).is_dir():
        raise UserError(f"run {run_dir} has no checkpoint to resume from")
    if budget:
        if str(parse_budget(budget)) != str(parse_budget(cfg.budget.limit)):
            cfg.budget.max_tokens = 0  # asking for a longer budget asks for more training, past the plan's data limit too
        cfg.budget.limit = budget
    apply_overrides(cfg, overrides)
    check_config(cfg)
    return cfg


def pretrain_command(args) -> int:
    from budgetlm.flags import print_config

    overrides = config_overrides(args)
    init_from = getattr(args, "init_from", None)
    if init_from:
        if args.resume or args.recipe:
            raise UserError("--init-from takes the model and settings from RUN; give no --resume or --recipe with it")
        cfg = continued.init_from_config(Path(init_from), args.data, args.budget, overrides)
        check_config(cfg)
    elif args.resume:
        if args.recipe or args.data or args.out:
            raise UserError("--resume continues a run with its own config; only --budget (a longer one) and parallel.* (another layout) may change")
        cfg = resume_config(args.resume, args.budget, overrides)
    else:
        cfg = resolve_config(args.recipe, args.budget, overrides, args.data)
    if args.print_config:
        print_config(cfg, args.json)
        if cfg.auto and not args.resume and not init_from:
            print("auto: the model and train keys you did not set are chosen for the budget when the run starts "
                  "(`budgetlm plan` shows the choice)", file=sys.stderr)  # fmt: skip
        return 0
    # under --json stdout carries the result alone: the progress lines go to stderr
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        if args.resume:
            summary = pretrain(cfg, Path(args.resume), resume=True)
        elif init_from:
            summary = start_run(cfg, args.out, init_from=Path(init_from))
        else:
            summary = start_run(cfg, args.out, user_keys=override_keys(RunConfig, overrides))
    if args.json:
        print(json.dumps(summary))
    return 0
