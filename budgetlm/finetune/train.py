"""`budgetlm finetune`: adapt a pretrained run to a task with a full or parameter-efficient method.

setup (read files, discover labels, load the base run, build head + method) -> fit (AdamW,
warm-up then linear decay, evaluation a few times an epoch, early stopping on the validation
metric, the best state kept) -> save (only what trained, plus finetune.json naming the base run).

The learning rate follows progress = max(step / planned steps, budget progress), so with
`--budget` the decay ends at the deadline exactly as in pretraining (Cramming), and without it at
the last planned epoch. Warm-up is the first 6% of progress (RoBERTa's fine-tuning setting).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from budgetlm.budget import hms
from budgetlm.config import FinetuneConfig
from budgetlm.errors import UserError
from budgetlm.files import write_json
from budgetlm.finetune.heads import TaskModel, collate, encode_examples, set_body_dropout
from budgetlm.finetune.labels import FINETUNE_FILE, WEIGHTS_FILE, LabelSpace, file_sha256
from budgetlm.finetune.methods import apply_method, trainable_report, trainable_state_dict
from budgetlm.finetune.metrics import main_metric, task_metrics
from budgetlm.finetune.predict import predict_examples
from budgetlm.finetune.tasks import Columns, Example, infer_format, read_task_file
from budgetlm.train_step import train_step

__all__ = ["FINETUNE_FILE", "WEIGHTS_FILE", "Base", "FinetuneConfig", "LabelSpace", "Result", "file_sha256", "fit", "load_base", "save_finetuned"]

# Peak learning rates by method. Full fine-tuning: 1e-4 for a body of BERT-base's width, a little
# above its usual 2e-5..5e-5 because budget runs are short, scaled by width (see default_lr).
# LoRA and adapters train fresh, zero-started parameters and want ~10x more (Hu et al. 2021 use
# 4e-4..5e-4; Houlsby et al. 2019 1e-4..1e-3); directly optimised prefixes more still (P-tuning v2).
DEFAULT_LR = {"full": 1e-4, "lora": 1e-3, "adapter": 1e-3, "prefix": 1e-2}
REFERENCE_WIDTH = 768


def default_lr(method: str, n_embd: int) -> float:
    """The peak learning rate when --lr is not given, for a body of width `n_embd`.

    Under Adam the best rate for hidden matrices falls about as 1/width (muP, Yang et al. 2022),
    so full fine-tuning takes DEFAULT_LR["full"] * 768 / n_embd: 6e-4 for the width-128 demo body.
    Measured there (sentiment, 3 seeds, accuracy): 1e-4 0.59 (one seed, below the random body),
    3e-4 0.673, 6e-4 0.690, 1e-3 0.693, 2e-3 0.690. The other methods' fresh parameters do not
    inherit the body's scale, so their rates stay fixed.
    """
    if method == "full":
        return DEFAULT_LR["full"] * REFERENCE_WIDTH / n_embd
    return DEFAULT_LR[method]


@dataclass
class Base:
    """What a fine-tuning run starts from: the body, its tokenizer and where they came from."""

    body: torch.nn.Module
    tokenizer: object
    run_dir: Path | None
    info: dict


def load_base(run_dir: str | Path, device: str | torch.device = "cpu", random_init: bool = False, seed: int = 0) -> Base:
    """The pretrained body of `run_dir` (or, with `random_init`, the same architecture freshly initialised)."""
    from budgetlm.model import Transformer
    from budgetlm.run import load_run, weights_path

    run = load_run(run_dir, device=device)
    tok = run.tokenizer
    if tok.vocab_size > run.config.model.vocab_size:
        raise UserError(f"the tokenizer of {run_dir} ({tok.vocab_size} ids) does not match its model ({run.config.model.vocab_size} ids)")
    data_json = Path(run_dir) / "data.json"
    if data_json.is_file():
        recorded = json.loads(data_json.read_text(encoding="utf-8")).get("tokenizer_sha256")
        if recorded and recorded != tok.sha256:
            raise UserError(f"the tokenizer.json of {run_dir} is not the one its data was prepared with")
    body = run.model
    if random_init:
        torch.manual_seed(seed)
        body = Transformer.build(run.config.model, device=torch.device(device))
    wpath = weights_path(run_dir)
    info = {
        "run": str(Path(run_dir).resolve()),
        "tokenizer_sha256": tok.sha256,
        "weights_file": wpath.name if wpath.parent == Path(run_dir) else str(wpath.relative_to(run_dir)),
        "weights_sha256": file_sha256(wpath),
        "weights_size": wpath.stat().st_size,
        "objective": run.config.model.objective,
        "random_init": random_init,
    }
    return Base(body, tok, Path(run_dir), info)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast where the device supports it, fp16 on older GPUs, nothing (fp32) on CPU by default."""
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA GPU (use bf16 or fp32 on CPU)")
    if precision == "fp32":
        return precision, contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return precision, lambda: torch.autocast(device.type, dtype=dtype)


def split_valid(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded hold-out of the training examples (at least one, at most half)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_valid = min(max(1, round(len(examples) * fraction)), len(examples) // 2)
    if n_valid < 1:
        raise UserError(f"{len(examples)} training example(s) are too few to hold out a validation split; pass --valid FILE")
    held = set(order[:n_valid])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


@dataclass
class Result:
    model: TaskModel
    space: LabelSpace
    metrics: dict  # validation metrics of the best state
    history: list[dict]
    summary: dict


# ---------------------------------------------------------------------------------------------
# fit


def _task_loss(model: TaskModel, batch: dict) -> torch.Tensor:
    return model.loss(model(batch["idx"], batch["lengths"]), batch["labels"])


def fit(base: Base, train: list[Example], valid: list[Example], cfg: FinetuneConfig, log=print, metrics_log=None) -> Result:
    """Fine-tune `base.body` on `train`, early-stopping on `valid`; returns the model in its best state."""
    from budgetlm.budget import Clock, parse_budget

    device = resolve_device(cfg.device)
    precision, autocast = autocast_for(cfg.precision, device)
    space = LabelSpace.from_examples(cfg.task, train)
    unseen = space.check_known(valid, "the validation data")
    n_unseen = sum(unseen.values())
    if n_unseen:  # a rare tag (UH, SYM in the WSJ) may be missing from training: the head cannot predict it, so it counts as an error
        n_tokens = sum(len(e.label) for e in valid)
        shown = ", ".join(f"{t!r} x{n}" for t, n in unseen.most_common(5)) + (", ..." if len(unseen) > 5 else "")
        log(f"warning: {n_unseen} of {n_tokens} validation tokens ({n_unseen / n_tokens:.2%}) carry {len(unseen)} tag(s) "
            f"never seen in training ({shown}); they are scored as errors")  # fmt: skip
    body = base.body.to(device)
    max_len = min(cfg.max_len, body.cfg.seq_len)
    torch.manual_seed(cfg.seed)
    model = TaskModel(body, cfg.task, space.num_labels(), dropout=cfg.dropout, pooling=cfg.pooling).to(device)
    set_body_dropout(body, cfg.dropout)
    apply_method(model, cfg.method, cfg.method_options)
    model.to(device)
    params = trainable_report(model)
    log(
        f"{cfg.task} with {cfg.method}: {params['trainable_params']:,} of {params['total_params']:,} parameters train "
        f"({params['trainable_share']:.2%}) | {len(train)} train, {len(valid)} valid examples | {precision} on {device}"
    )

    encoded = encode_examples(base.tokenizer, model.objective, cfg.task, train, max_len, space.index, space.stats)
    pad_id = base.tokenizer.pad_id if base.tokenizer.pad_id is not None else 0
    steps_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    planned = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    eval_every = max(1, steps_per_epoch // max(1, cfg.evals_per_epoch))
    metric = main_metric(cfg.task, space.labels)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # no weight decay on biases, norms and prefixes/embeddings-like vectors (BERT's convention)
            (decay if p.dim() >= 2 and "kv_prefix" not in name else no_decay).append(p)
    peak = cfg.peak_lr(body.cfg.n_embd)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=peak, betas=(0.9, 0.999), eps=1e-8
    )
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    clock = Clock(parse_budget(cfg.budget)) if cfg.budget else None

    def lr_at(progress: float) -> float:
        if progress < cfg.warmup:
            return peak * (progress / cfg.warmup)
        return peak * max(0.0, (1.0 - progress) / (1.0 - cfg.warmup))

    def evaluate() -> dict:
        preds = predict_examples(model, base.tokenizer, valid, space, max_len, batch_size=max(cfg.batch_size, 64), autocast=autocast)
        gold = [e.label for e in valid]
        return task_metrics(cfg.task, gold, preds, space.labels)

    best, best_state, history, bad_evals = -math.inf, None, [], 0
    step, seen, start = 0, 0, time.monotonic()
    order_gen = random.Random(cfg.seed)
    stop = False
    if clock:
        clock.start()
    window_start, window_examples = time.monotonic(), 0
    while not stop:
        order = list(range(len(encoded)))
        order_gen.shuffle(order)
        for b in range(0, len(order), cfg.batch_size):
            progress = step / planned
            if clock:
                progress = max(progress, clock.progress(tokens=seen, steps=step))
            if step >= planned or (clock and clock.should_stop(tokens=seen, steps=step)):
                stop = True
                break
            lr = lr_at(progress)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = collate([encoded[i] for i in order[b : b + cfg.batch_size]], pad_id, cfg.task)
            batch = {k: v.to(device) for k, v in batch.items()}
            model.train()
            result = train_step(model, optimizer, [batch], _task_loss, n_micro=1, params=trainable, autocast=autocast,
                                scaler=scaler, grad_clip=cfg.grad_clip, reduce_loss=False)  # fmt: skip
            if not result.stepped and not math.isfinite(result.loss):
                raise UserError(f"non-finite loss at step {step + 1}; lower --lr (now {peak:g})")
            loss_val = result.loss
            step += 1
            n_tokens = int(batch["lengths"].sum())
            seen += n_tokens
            window_examples += len(batch["lengths"])
            if clock:
                clock.step_done()
            if step % 10 == 0 or step == 1:
                now = time.monotonic()
                eps = window_examples / max(now - window_start, 1e-9)
                window_start, window_examples = now, 0
                elapsed = time.monotonic() - start
                left = f", {hms(clock.remaining())} left" if clock and clock.budget.kind == "time" else ""
                log(
                    f"step {step:6d} | loss {loss_val:.4f} | lr {lr:.2e} | {eps:,.0f} ex/s | "
                    f"{hms(elapsed)} elapsed{left} ({progress:.0%} of budget)"
                )
                if metrics_log:
                    metrics_log.log("train", step, loss=loss_val, lr=lr, examples_per_s=eps, elapsed=elapsed, progress=progress)
            if step % eval_every == 0 or step >= planned:
                overhead = clock.overhead() if clock else contextlib.nullcontext()
                with overhead:
                    val = evaluate()
                history.append({"step": step, **val})
                if metrics_log:
                    metrics_log.log("eval", step, elapsed=time.monotonic() - start, **val)
                improved = val[metric] > best
                log(f"step {step:6d} | " + " | ".join(f"val_{k} {v:.4f}" for k, v in val.items()) + (" (best)" if improved else ""))
                if improved:
                    best, best_state, bad_evals = val[metric], trainable_state_dict(model), 0
                else:
                    bad_evals += 1
                    # never before one full epoch: early evaluations of a barely trained head are noisy
                    if bad_evals >= cfg.patience and step >= steps_per_epoch:
                        log(f"early stop: val_{metric} did not improve for {cfg.patience} evaluations")
                        stop = True
                        break
    if not history or history[-1]["step"] != step:
        val = evaluate()
        history.append({"step": step, **val})
        if val[metric] > best:
            best, best_state = val[metric], trainable_state_dict(model)
    if best_state is not None:
        from budgetlm.finetune.methods import load_trainable_state

        load_trainable_state(model, best_state)
    model.eval()
    best_eval = max(history, key=lambda h: h[metric])
    best_metrics = {k: v for k, v in best_eval.items() if k != "step"}
    summary = {
        "steps": step,
        "best_step": best_eval["step"],
        "elapsed_s": round(time.monotonic() - start, 1),
        "metric": metric,
        "peak_lr": peak,
        **({"valid_unseen_tag_tokens": n_unseen} if cfg.task == "tag" else {}),
        **params,
        **{f"val_{k}": v for k, v in best_metrics.items()},
    }
    return Result(model, space, best_metrics, history, summary)


# ---------------------------------------------------------------------------------------------
# save


def save_finetuned(out_dir: Path, result: Result, base: Base, cfg: FinetuneConfig, data_info: dict) -> None:
    """finetune.json + head_and_method.safetensors (only what trained) + report.md."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = trainable_state_dict(result.model)
    tmp = out_dir / (WEIGHTS_FILE + ".tmp")
    save_file({k: v.cpu() for k, v in state.items()}, str(tmp))
    tmp.replace(out_dir / WEIGHTS_FILE)
    meta = {
        "task": cfg.task,
        "method": cfg.method,
        "labels": result.space.labels,
        "label_stats": result.space.stats,
        "fallback_label": result.space.fallback,
        "pooling": result.model.pooling,
        "head_bias": result.model.head.bias is not None,  # absent in directories written before it was recorded: True
        "max_len": min(cfg.max_len, base.body.cfg.seq_len),
        "base": base.info,
        "data": data_info,
        "hyperparameters": asdict(cfg),
        "method_options": cfg.method_options.as_dict(),
        "metrics": result.metrics,
        "summary": result.summary,
        "history": result.history,
    }
    write_json(out_dir / FINETUNE_FILE, meta)
    lines = [
        "# budgetlm fine-tuning report",
        "",
        f"Task `{cfg.task}` with method `{cfg.method}` on base run `{base.info['run']}`.",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in result.summary.items()]
    lines += ["", "## Data", "", "```json", json.dumps(data_info, indent=2), "```", ""]
    lines += ["## Validation history", "", "| step | " + " | ".join(result.metrics) + " |", "| --- |" + " --- |" * len(result.metrics)]
    lines += [f"| {h['step']} | " + " | ".join(f"{h[k]:.4f}" for k in result.metrics) + " |" for h in result.history]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# the command


def check_finetune_config(cfg: FinetuneConfig) -> None:
    """Settings that cannot work, refused before any file is read."""
    for name, value in (("epochs", cfg.epochs), ("batch_size", cfg.batch_size), ("max_len", cfg.max_len)):
        if value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if cfg.lr is not None and cfg.lr <= 0:
        raise UserError(f"--lr must be positive, got {cfg.lr}")
    if cfg.budget:
        from budgetlm.budget import parse_budget

        parse_budget(cfg.budget)  # a bad budget fails before any work
    autocast_for(cfg.precision, resolve_device(cfg.device))  # an impossible precision fails before any work


def finetune_run(run: str | Path, train_file: str | Path, out: str | Path, cfg: FinetuneConfig | None = None,
                 valid_file: str | Path | None = None, log=print) -> dict:  # fmt: skip
    """Fine-tune run `run` on `train_file` (validating on `valid_file` or a held-out share of it) into
    `out`; returns the summary (the best validation metrics, steps, time)."""
    from budgetlm.tracking import MetricsLog

    cfg = cfg or FinetuneConfig()
    check_finetune_config(cfg)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path {out_dir} is a file")
    # a directory left by an attempt that failed before saving (only its metrics log) may be reused
    leftovers = {p.name for p in out_dir.iterdir()} - {"metrics.jsonl"} if out_dir.is_dir() else set()
    if leftovers:
        raise UserError(f"output directory {out_dir} exists and is not empty")
    (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    fmt = None if cfg.format == "auto" else cfg.format
    columns = Columns(text=cfg.text_column or None, text2=cfg.text2_column or None, label=cfg.label_column or None,
                      header=False if cfg.no_header else None)  # fmt: skip
    train_data = read_task_file(train_file, cfg.task, fmt, columns)
    if valid_file:
        valid_data = read_task_file(valid_file, cfg.task, fmt, columns)
        train, valid = train_data.examples, valid_data.examples
    else:
        valid_data = None
        train, valid = split_valid(train_data.examples, cfg.valid_fraction, cfg.seed)
    base = load_base(run, device=resolve_device(cfg.device))
    for name, data in (("train", train_data), ("valid", valid_data)):
        if data is not None and data.skipped:
            log(f"{name}: skipped {data.skipped} malformed row(s)")
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_log = MetricsLog(out_dir, trackers="none")
    try:
        result = fit(base, train, valid, cfg, log=log, metrics_log=metrics_log)
    finally:
        metrics_log.close()
    data_info = {
        "train": str(Path(train_file).resolve()),
        "valid": str(Path(valid_file).resolve()) if valid_file else None,
        "format": infer_format(Path(train_file), fmt),
        "columns": train_data.columns,
        "train_examples": len(train),
        "valid_examples": len(valid),
        "skipped": train_data.skipped + (valid_data.skipped if valid_data else 0),
    }
    save_finetuned(out_dir, result, base, cfg, data_info)
    metric = result.summary["metric"]
    log(f"done: {result.summary['steps']} steps in {hms(result.summary['elapsed_s'])} | best val_{metric} {result.metrics[metric]:.4f} | {out_dir}")
    return {"out": str(out_dir), **result.summary}


def finetune_command(args) -> int:
    from budgetlm.flags import print_config, settings_from_args

    cfg = settings_from_args(FinetuneConfig, args)
    if args.print_config:
        print_config(cfg, args.json)
        return 0
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    summary = finetune_run(args.run, args.train, args.out, cfg, valid_file=args.valid, log=log)
    if args.json:
        print(json.dumps(summary))
    return 0
