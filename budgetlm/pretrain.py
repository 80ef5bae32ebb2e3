"""Budgeted pretraining: setup -> fit -> validate, stopping on the budget.

The learning rate, the batch-size ramp and stopping are functions of budget progress
(elapsed / budget), so the decay ends at the deadline whatever the throughput (Cramming).
One code path for CPU, one GPU and N processes under torchrun: the global batch is fixed by the
config and gradient accumulation is derived from it, so 1 and 8 processes do the same math
(nanochat). What the clock counts is documented in budgetlm/budget.py and the README.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from budgetlm import checkpoint as ckpt
from budgetlm.budget import Clock, hms, parse_budget
from budgetlm.config import RunConfig, apply_overrides, load_recipe, save_config
from budgetlm.data.dataset import PreparedData
from budgetlm.data.loader import TrainBatches
from budgetlm.data.masking import mask_tokens
from budgetlm.data.vocab import can_derive, derive_vocabulary, derived_path
from budgetlm.distributed import DistInfo, all_reduce_mean, barrier, broadcast_object, cleanup, init_distributed, no_sync, print0, wrap_ddp
from budgetlm.errors import UserError
from budgetlm.evaluate.lm import evaluate_lm
from budgetlm.files import write_json
from budgetlm.hardware import peak_flops
from budgetlm.model import Transformer
from budgetlm.optim import batch_size_at, build_optimizer, lr_at
from budgetlm.plan import Plan, Planner, apply_plan, format_plan, make_plan, user_fixed
from budgetlm.report import write_plots, write_report
from budgetlm.run import CHECKPOINT_DIR, CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, run_config
from budgetlm.tracking import MetricsLog, environment

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
    if m.n_embd % m.n_head:
        raise UserError(f"model.n_embd={m.n_embd} must be divisible by model.n_head={m.n_head}")
    if (m.n_embd // m.n_head) % 2:
        raise UserError(f"head size model.n_embd/model.n_head={m.n_embd // m.n_head} must be even for rotary embeddings")
    if m.n_kv_head and m.n_head % m.n_kv_head:
        raise UserError(f"model.n_head={m.n_head} must be divisible by model.n_kv_head={m.n_kv_head}")
    if t.batch_tokens < m.seq_len:
        raise UserError(f"train.batch_tokens={t.batch_tokens} is smaller than one sequence (model.seq_len={m.seq_len})")
    if not 0 <= t.warmup <= 1 or not 0 <= t.cooldown <= 1 or not 0 <= t.batch_ramp <= 1:
        raise UserError("train.warmup, train.cooldown and train.batch_ramp are fractions of the budget in [0, 1]")
    if not 0 < t.mlm_rate < 1:
        raise UserError(f"train.mlm_rate={t.mlm_rate} must be in (0, 1)")
    if not 0 <= cfg.budget.reserve < 0.5:
        raise UserError(f"budget.reserve={cfg.budget.reserve} must be in [0, 0.5)")
    if cfg.parallel.tp != 1 or cfg.parallel.pp != 1:
        raise UserError("parallel.tp and parallel.pp > 1 are not supported yet; data parallelism scales with torchrun")


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


def choose_micro_batch(cfg: RunConfig, per_rank_seqs: int, model: Transformer, precision: Precision, device: torch.device) -> int:
    """Sequences per forward pass: the configured value, or the largest divisor of the per-rank
    batch that fits (CPU: a token cap; GPU: probed with a forward+backward, halving on OOM)."""
    if cfg.train.micro_batch:
        if per_rank_seqs % cfg.train.micro_batch:
            raise UserError(f"train.micro_batch={cfg.train.micro_batch} must divide the per-process batch of {per_rank_seqs} sequences")
        return cfg.train.micro_batch
    candidates = divisors_desc(per_rank_seqs)
    if device.type != "cuda":
        return next(d for d in candidates if d * cfg.model.seq_len <= CPU_MICRO_BATCH_TOKENS or d == 1)
    for d in candidates:
        try:
            x = torch.randint(0, cfg.model.vocab_size, (d, cfg.model.seq_len), device=device)
            with precision.autocast():
                loss = model(x, x)
            loss.backward()
            model.zero_grad(set_to_none=True)
            return d
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    raise UserError(f"not even one sequence of {cfg.model.seq_len} tokens fits on {device}; lower model.seq_len or the model size")


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


def make_batch(w: torch.Tensor, cfg: RunConfig, tokenizer, generator: torch.Generator | None):
    """Inputs and targets from a (B, T+1) window: shifted for causal, masked for masked."""
    if cfg.model.objective == "causal":
        return w[:, :-1], w[:, 1:]
    return mask_tokens(
        w[:, :-1],
        mask_id=tokenizer.mask_id,
        vocab_size=tokenizer.vocab_size,
        rate=cfg.train.mlm_rate,
        special_ids=tokenizer.special_ids,
        generator=generator,
    )


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


def plan_run(cfg: RunConfig, data: PreparedData, device: torch.device, dist: DistInfo, user_keys: set[str] | None) -> tuple[PreparedData, Plan]:
    """Fill every key the user did not set from the budget (`budgetlm.plan`), timing candidate models
    on this device, and derive the chosen vocabulary from the prepared one. Rank 0 plans and the
    other ranks take its plan, so every process trains the same model."""
    user_keys = changed_keys(cfg) if user_keys is None else set(user_keys)
    fixed_model, fixed_train = user_fixed(cfg, user_keys)
    if cfg.model.objective == "masked" or not can_derive(data.tokenizer):
        fixed_model["vocab_size"] = data.vocab_size
    if "model.vocab_size" in user_keys:
        fixed_model["vocab_size"] = cfg.model.vocab_size
    plan = None
    if dist.rank == 0:
        print0(f"choosing the model for a {cfg.budget.limit} budget on {device} (timing candidates; cached for later runs)")
        start = time.monotonic()
        planner = Planner(device, vocab_cap=data.vocab_size, vocab_derivable=can_derive(data.tokenizer), world_size=dist.world_size, log=print0)
        plan = make_plan(cfg.budget.limit, planner, fixed_model=fixed_model, fixed_train=fixed_train, reserve=cfg.budget.reserve)
        print0(format_plan(plan))
        print0(f"planned in {time.monotonic() - start:.1f}s (before the clock starts)")
    plan = broadcast_object(plan)
    apply_plan(cfg, plan)
    if plan.vocab_size != data.vocab_size:
        if dist.rank == 0:  # about twice the tokens the run will read, in case it runs faster than planned
            derive_vocabulary(data, plan.vocab_size, max_train_tokens=int(2 * plan.tokens * data.vocab_size / plan.vocab_size), log=print0)
        barrier()
        data = PreparedData(derived_path(data, plan.vocab_size))
        cfg.data = str(data.path)
    return data, plan


# ---------------------------------------------------------------------------------------------
# the run


def pretrain(cfg: RunConfig, run_dir: Path, resume: bool = False, user_keys: set[str] | None = None) -> dict:
    """Train under cfg.budget into run_dir; returns the final metrics.

    With `cfg.auto`, every model and train key not in `user_keys` (the dotted keys the user set;
    default: those that differ from the defaults) is chosen by `budgetlm.plan` for the budget."""
    run_dir = Path(run_dir)
    dist = init_distributed(cfg.parallel.backend)
    device = dist.device
    try:
        return _pretrain(cfg, run_dir, resume, dist, device, user_keys)
    finally:
        cleanup()


def _pretrain(cfg: RunConfig, run_dir: Path, resume: bool, dist: DistInfo, device: torch.device, user_keys: set[str] | None = None) -> dict:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if not cfg.data:
        raise UserError("no data directory: pass --data DIR (from `budgetlm data prepare`)")
    data = PreparedData(cfg.data)
    plan = None
    if cfg.auto and not resume:
        data, plan = plan_run(cfg, data, device, dist, user_keys)
    tokenizer = data.tokenizer
    if cfg.model.vocab_size and cfg.model.vocab_size != tokenizer.vocab_size:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} does not match the data's tokenizer ({tokenizer.vocab_size})")
    cfg.model.vocab_size = tokenizer.vocab_size
    if cfg.model.objective == "masked" and tokenizer.mask_id is None:
        raise UserError("model.objective=masked needs a tokenizer with a mask token (prepare with --tokenizer wordpiece)")
    if cfg.parallel.dp not in (-1, dist.world_size):
        raise UserError(f"parallel.dp={cfg.parallel.dp} does not match the {dist.world_size} processes started")

    seq_len = cfg.model.seq_len
    global_seqs = cfg.train.batch_tokens // seq_len
    if global_seqs % dist.world_size:
        raise UserError(f"the global batch of {global_seqs} sequences does not split over {dist.world_size} processes")
    per_rank_seqs = global_seqs // dist.world_size
    precision = choose_precision(cfg.train.precision, device)

    torch.manual_seed(cfg.train.seed)
    model = Transformer.build(cfg.model, device=device)
    micro = choose_micro_batch(cfg, per_rank_seqs, model, precision, device)
    full_accum = per_rank_seqs // micro
    optimizer = build_optimizer(model, cfg.train, device.type)
    scaler = torch.amp.GradScaler("cuda") if precision.name == "fp16" else None
    compile_on = cfg.train.compile == "true" or (cfg.train.compile == "auto" and device.type == "cuda")
    train_model = wrap_ddp(torch.compile(model) if compile_on else model, dist)

    n_params = model.num_params()
    flops_per_token = model.flops_per_token(seq_len)
    peak, peak_source = peak_flops(device, precision.dtype)
    loader = TrainBatches(data.tokens("train"), seq_len, seed=cfg.train.seed, rank=dist.rank, world_size=dist.world_size)
    mask_gen = torch.Generator().manual_seed(cfg.train.seed + 1 + dist.rank)
    clock = Clock(parse_budget(cfg.budget.limit), reserve=cfg.budget.reserve)
    state = LoopState()
    metrics = MetricsLog(run_dir, enabled=dist.rank == 0)

    ckpt_dir = run_dir / CHECKPOINT_DIR
    if resume:
        loop = ckpt.load_checkpoint(ckpt_dir, model, optimizer)
        state = LoopState(**loop["loop"])
        loader.load_state_dict(loop["loader"][dist.rank] if isinstance(loop["loader"], list) else loop["loader"])
        clock.load_state_dict(loop["clock"])
        mask_gen.set_state(torch.tensor(loop["mask_rng"][dist.rank], dtype=torch.uint8))
        if state.done:
            print0(f"run {run_dir} already finished; nothing to resume")
            return {"val": state.evals[-1] if state.evals else {}, "already_finished": True}
        if dist.rank == 0:
            metrics.truncate_after(state.step)
        print0(f"resuming {run_dir} at step {state.step} ({state.tokens:,} tokens, {clock.elapsed():.0f}s of budget used)")
    else:
        prepare_run_dir(run_dir, cfg, data, dist)
        if plan is not None and dist.rank == 0:
            write_json(run_dir / PLAN_FILE, plan.to_dict())

    cost = {"eval": 0.0, "save": 0.0}  # measured seconds of the last evaluation / checkpoint save

    def timed(kind: str, fn, *a, **kw):
        """Run fn, remember its duration, and keep that much of the budget free for the end."""
        start = time.monotonic()
        out = fn(*a, **kw)
        cost[kind] = time.monotonic() - start
        clock.expect_tail(1.25 * (cost["eval"] + cost["save"]))  # the final eval + save, with a margin
        return out

    def save(done: bool = False) -> None:
        loader_states = _gather(loader.state_dict(), dist)
        mask_states = _gather(mask_gen.get_state().tolist(), dist)
        if dist.rank == 0:
            loop = {"loop": {**state.__dict__, "done": done}, "loader": loader_states, "clock": clock.state_dict(), "mask_rng": mask_states}
            ckpt.save_checkpoint(ckpt_dir, model_state=model.state_dict(), optimizer_state=optimizer.state_dict(), loop_state=loop)
        barrier()

    def evaluate() -> dict:
        return evaluate_lm(
            model, data, objective=cfg.model.objective, seq_len=seq_len, n_tokens=cfg.train.eval_tokens,
            batch_size=micro, device=device, autocast=precision.autocast, mlm_rate=cfg.train.mlm_rate,
        )  # fmt: skip

    print0(
        f"model {n_params / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOPs/token | batch {global_seqs} x {seq_len} tokens = "
        f"{dist.world_size} processes x {full_accum} accumulation x {micro} micro | {precision.name} on {device}"
        f"{' compiled' if compile_on else ''} | budget {cfg.budget.limit} | peak {peak / 1e12:.2f} TFLOP/s ({peak_source})"
    )
    if not resume:
        metrics.log("event", 0, event="start", params=n_params, flops_per_token=flops_per_token, peak_flops=peak, micro_batch=micro)
        timed("save", save)  # a step-0 checkpoint: resume and NaN rollback always have somewhere to go

    # ------------------------------------------------------------------------------------------
    # fit
    clock.start()
    last_ckpt = time.monotonic()
    window_tokens, window_start = 0, time.monotonic()
    try:
        while True:
            progress, stop = _agree(clock, state, dist, device)
            if stop:
                break
            lr = lr_at(progress, cfg.train) * state.lr_scale
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_seqs = batch_size_at(progress, cfg.train, per_rank_seqs, micro)
            accum = max(1, step_seqs // micro)

            # ---- one optimizer step ------------------------------------------------------------
            loss_sum = torch.zeros((), device=device)
            for i in range(accum):
                x, y = make_batch(loader.next(micro), cfg, tokenizer, mask_gen)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with no_sync(train_model, i < accum - 1), precision.autocast():
                    loss = train_model(x, y)
                scaled = loss / accum
                (scaler.scale(scaled) if scaler else scaled).backward()
                loss_sum += loss.detach()
            loss_val = float(all_reduce_mean(loss_sum / accum))
            grad_norm = float("nan")
            if math.isfinite(loss_val) and cfg.train.grad_clip > 0:
                if scaler:
                    scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip))
            if not math.isfinite(loss_val) or (cfg.train.grad_clip > 0 and not math.isfinite(grad_norm) and not scaler):
                optimizer.zero_grad(set_to_none=True)
                _handle_nonfinite(state, cfg, metrics, model, optimizer, ckpt_dir, loss_val)
                continue
            state.nan_skips = 0
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_tokens = accum * micro * dist.world_size * seq_len
            state.step += 1
            state.tokens += step_tokens
            window_tokens += step_tokens
            clock.step_done()

            # ---- once in a while ---------------------------------------------------------------
            if state.step % cfg.train.log_every == 0 or state.step == 1:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                now = time.monotonic()
                tps = window_tokens / max(now - window_start, 1e-9)
                mfu = tps * flops_per_token / (peak * dist.world_size)
                window_tokens, window_start = 0, now
                progress = clock.progress(tokens=state.tokens, steps=state.step)
                metrics.log("train", state.step, loss=loss_val, lr=lr, tokens=state.tokens, tokens_per_s=tps, mfu=mfu,
                            grad_norm=grad_norm, elapsed=clock.elapsed(), progress=progress, batch_seqs=accum * micro * dist.world_size)  # fmt: skip
                left = f", {hms(clock.remaining())} left" if clock.budget.kind == "time" else ""
                print0(
                    f"step {state.step:6d} | loss {loss_val:.4f} | lr {lr:.2e} | {tps:,.0f} tok/s | MFU {mfu:.1%} | "
                    f"{hms(clock.elapsed())} elapsed{left} ({progress:.0%} of budget)"
                )
            if cfg.train.eval_every > 0 and progress >= state.next_eval:
                with clock.overhead():
                    val = timed("eval", evaluate)
                state.evals.append({"step": state.step, "elapsed": clock.elapsed(), **val})
                state.next_eval = (math.floor(progress / cfg.train.eval_every) + 1) * cfg.train.eval_every
                metrics.log("eval", state.step, elapsed=clock.elapsed(), **val)
                print0(f"step {state.step:6d} | val_loss {val['val_loss']:.4f}" + (f" | bits/byte {val['val_bpb']:.4f}" if "val_bpb" in val else ""))
            if time.monotonic() - last_ckpt >= cfg.train.checkpoint_every:
                with clock.overhead():
                    timed("save", save)
                last_ckpt = time.monotonic()
    except KeyboardInterrupt:
        save()
        print0(f"interrupted at step {state.step}; checkpoint saved, continue with: budgetlm pretrain --resume {run_dir}")
        raise

    # ------------------------------------------------------------------------------------------
    # validate
    if state.evals and state.evals[-1]["step"] == state.step:  # a periodic evaluation just ran
        val = {k: v for k, v in state.evals[-1].items() if k.startswith("val_")}
    else:
        val = evaluate()
        state.evals.append({"step": state.step, "elapsed": clock.elapsed(), **val})
    metrics.log("eval", state.step, elapsed=clock.elapsed(), final=True, **val)
    save(done=True)
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
    if dist.rank == 0:
        ckpt.save_weights(run_dir / WEIGHTS_FILE, model)
        write_json(run_dir / "eval.json", val)
        samples = _samples(model, data, cfg, device) if cfg.model.objective == "causal" else []
        write_report(run_dir, cfg, summary, samples, write_plots(run_dir))
        metrics.log("event", state.step, event="end", **{k: v for k, v in summary.items() if isinstance(v, (int, float))})
    metrics.close()
    print0(
        f"done: {state.step} steps, {state.tokens:,} tokens in {hms(summary['elapsed_s'])} | val_loss {val['val_loss']:.4f}"
        + (f" | bits/byte {val['val_bpb']:.4f}" if "val_bpb" in val else "")
        + f" | report {run_dir / 'report.md'}"
    )
    return summary


def _handle_nonfinite(state: LoopState, cfg: RunConfig, metrics: MetricsLog, model, optimizer, ckpt_dir: Path, loss_val: float) -> None:
    """Skip a step with a non-finite loss or gradient; after `max_nan_skips` in a row, roll back
    to the last checkpoint's weights and optimizer with half the learning rate. The data position
    and the clock go on, so the batches that diverged are not replayed."""
    state.nan_skips += 1
    metrics.log("event", state.step, event="nonfinite_loss", loss=str(loss_val), consecutive=state.nan_skips)
    print0(f"step {state.step}: non-finite loss ({loss_val}); step skipped ({state.nan_skips}/{cfg.train.max_nan_skips})")
    if state.nan_skips < cfg.train.max_nan_skips:
        return
    loop = ckpt.load_checkpoint(ckpt_dir, model, optimizer, restore_rng=False)
    restored = loop["loop"]
    state.step, state.tokens = restored["step"], restored["tokens"]
    state.rollbacks += 1
    state.lr_scale *= 0.5
    state.nan_skips = 0
    metrics.log("event", state.step, event="rollback", lr_scale=state.lr_scale)
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


def _gather(obj, dist: DistInfo) -> list:
    """Per-rank objects gathered on every rank (each rank reads its own slot on resume)."""
    if dist.world_size == 1:
        return [obj]
    out = [None] * dist.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


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


def pretrain_command(args) -> int:
    from budgetlm.cli import config_overrides

    overrides = config_overrides(args)
    if args.resume:
        if overrides or args.recipe or args.budget or args.data or args.out:
            raise UserError("--resume continues a run with its own config; give no other settings")
        run_dir = Path(args.resume)
        cfg = run_config(run_dir)
        if not (run_dir / CHECKPOINT_DIR).is_dir():
            raise UserError(f"run {run_dir} has no checkpoint to resume from")
        summary = pretrain(cfg, run_dir, resume=True)
    else:
        cfg = resolve_config(args.recipe, args.budget, overrides, args.data)
        if not args.out:
            raise UserError("pass --out RUN, the run directory to create")
        run_dir = Path(args.out)
        if run_dir.exists() and any(run_dir.iterdir()):
            hint = " (continue it with --resume)" if (run_dir / CHECKPOINT_DIR).exists() else ""
            raise UserError(f"run directory {run_dir} exists and is not empty{hint}")
        summary = pretrain(cfg, run_dir, user_keys={item.split("=", 1)[0].strip() for item in overrides})
    if args.json:
        print(json.dumps(summary))
    return 0
