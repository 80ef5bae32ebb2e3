"""`budgetlm predict`: reload a fine-tuned directory and label a file, in the file's own format.

A fine-tuned directory holds only what trained; the body comes from the base run named in
finetune.json. Before anything is loaded the base run is checked against what was recorded at
training time (tokenizer hash, weight file hash), so predictions are never silently made with a
different body or vocabulary. LoRA updates are merged into the base weights after loading: the
same function, without the extra matmuls.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch

from budgetlm.errors import UserError
from budgetlm.finetune.heads import TaskModel, collate, encode_examples
from budgetlm.finetune.tasks import Columns, read_task_file, write_predictions


@torch.no_grad()
def predict_examples(model: TaskModel, tokenizer, examples: list, space, max_len: int, batch_size: int = 64, autocast=contextlib.nullcontext) -> list:
    """One prediction per example: a label name, a float (regress) or a list of tags (tag)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = encode_examples(tokenizer, model.objective, model.task, examples, max_len, None, None)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    # length-sorted batches waste little on padding; results go back to input order
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    out: list = [None] * len(encoded)
    for b in range(0, len(order), batch_size):
        chunk = order[b : b + batch_size]
        batch = collate([encoded[i] for i in chunk], pad_id, model.task)
        with autocast():
            logits = model(batch["idx"].to(device), batch["lengths"].to(device))
        logits = logits.float().cpu()
        for row, i in enumerate(chunk):
            if model.task == "regress":
                out[i] = float(logits[row]) * space.stats["std"] + space.stats["mean"]
            elif model.task == "tag":
                best = logits[row].argmax(-1).tolist()
                out[i] = [space.labels[best[pos]] if pos is not None else space.fallback for pos in encoded[i].word_starts]
            else:
                out[i] = space.labels[int(logits[row].argmax())]
    model.train(was_training)
    return out


def load_finetuned(model_dir: str | Path, device: str | torch.device = "cpu", merge: bool = True) -> tuple[TaskModel, object, object, dict]:
    """(model, tokenizer, label space, finetune.json) of a fine-tuned directory, ready to predict."""
    from safetensors.torch import load_file

    from budgetlm.finetune.labels import FINETUNE_FILE, WEIGHTS_FILE, LabelSpace, file_sha256
    from budgetlm.finetune.methods import MethodOptions, apply_method, load_trainable_state, merge_lora
    from budgetlm.model import Transformer
    from budgetlm.run import load_run

    model_dir = Path(model_dir)
    meta_path = model_dir / FINETUNE_FILE
    if not meta_path.is_file():
        raise UserError(f"{model_dir} is not a fine-tuned directory (no {FINETUNE_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError(f"{meta_path} is not valid JSON") from None
    base = meta["base"]
    run_dir = Path(base["run"])
    if not run_dir.is_dir():
        raise UserError(f"base run {run_dir} of {model_dir} is missing")
    weights = run_dir / base["weights_file"]
    if not weights.is_file():
        raise UserError(f"base run {run_dir} has no {base['weights_file']}")
    if not base.get("random_init") and file_sha256(weights) != base["weights_sha256"]:
        raise UserError(f"the weights of base run {run_dir} changed since {model_dir} was fine-tuned")
    run = load_run(run_dir, device=device)
    if run.tokenizer.sha256 != base["tokenizer_sha256"]:
        raise UserError(f"the tokenizer of base run {run_dir} does not match the one {model_dir} was fine-tuned with")
    body = run.model
    if base.get("random_init"):
        body = Transformer.build(run.config.model, device=torch.device(device))  # every weight is in the saved state
    space = LabelSpace(meta["task"], meta["labels"], meta["label_stats"], meta["fallback_label"])
    model = TaskModel(body, meta["task"], space.num_labels(), dropout=0.0, pooling=meta["pooling"], head_bias=meta.get("head_bias", True))
    opts = MethodOptions(**{**meta["method_options"], "lora_targets": tuple(meta["method_options"]["lora_targets"])})
    apply_method(model, meta["method"], opts)
    model.to(device)
    weights_file = model_dir / WEIGHTS_FILE
    if not weights_file.is_file():
        raise UserError(f"{model_dir} has no {WEIGHTS_FILE}")
    load_trainable_state(model, load_file(str(weights_file), device=str(device)))
    if merge and meta["method"] == "lora":
        merge_lora(model)
    model.eval()
    return model, run.tokenizer, space, meta


def predict_file(model_dir: str | Path, input_file: str | Path, fmt: str | None = None, device: str = "cpu"):
    """(the input's rows, one prediction per row, its format, the task) for a file, read with the training file's columns."""
    from budgetlm.finetune.tasks import infer_format
    from budgetlm.run import resolve_device

    model, tokenizer, space, meta = load_finetuned(model_dir, device=resolve_device(device))
    fmt = fmt or (infer_format(Path(input_file), None) if Path(input_file).suffix else meta["data"]["format"])
    cols = meta["data"].get("columns") or {}
    same_format = fmt == meta["data"]["format"]

    def spec(key):
        value = cols.get(key) if same_format else None
        return None if value is None else str(value)

    columns = Columns(text=spec("text"), text2=spec("text2"), header=cols.get("header") if same_format else None)
    if same_format and fmt in ("csv", "tsv") and cols.get("label") is not None:
        columns.label = str(cols["label"])
    data = _read_input(input_file, meta["task"], fmt, columns)
    return data, predict_examples(model, tokenizer, data.examples, space, meta["max_len"]), fmt, meta["task"]


def predict_texts(model_dir: str | Path, texts: list, device: str = "cpu") -> list:
    """Predictions for texts given directly: strings (a tagging model splits them at whitespace),
    lists of words (tagging), or (text, text2) pairs (pair models)."""
    from budgetlm.finetune.tasks import Example
    from budgetlm.run import resolve_device

    model, tokenizer, space, meta = load_finetuned(model_dir, device=resolve_device(device))
    examples = []
    for item in texts:
        if meta["task"] == "tag":
            examples.append(Example(item.split() if isinstance(item, str) else list(item)))
        elif isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise UserError(f"a pair is two texts, got {len(item)} items: {item!r}")
            examples.append(Example(str(item[0]), str(item[1])))
        else:
            examples.append(Example(str(item)))
    return predict_examples(model, tokenizer, examples, space, meta["max_len"])


def predict_command(args) -> int:
    from budgetlm.config import PredictConfig
    from budgetlm.flags import print_config, settings_from_args

    cfg = settings_from_args(PredictConfig, args)
    if args.print_config:
        print_config(cfg, args.json)
        return 0
    data, preds, fmt, task = predict_file(args.model_dir, args.input, None if cfg.format == "auto" else cfg.format, cfg.device)
    if data.skipped:
        print(f"skipped {data.skipped} malformed row(s) of {args.input}", file=sys.stderr)
    if cfg.output:
        path = Path(cfg.output)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            write_predictions(data, preds, fmt, task, f)
        tmp.replace(path)
    if args.json:
        summary = {"input": str(args.input), "examples": len(preds), "skipped": data.skipped}
        print(json.dumps({**summary, "output": str(cfg.output)} if cfg.output else {**summary, "predictions": preds}, ensure_ascii=False))
    elif not cfg.output:
        write_predictions(data, preds, fmt, task, sys.stdout)
    return 0


def _read_input(path, task, fmt, columns):
    """Prediction input, labels optional. The training file's columns are tried first; a file laid
    out differently (no label column, fewer columns) falls back to the defaults."""
    try:
        return read_task_file(path, task, fmt, columns, labelled=False)
    except UserError as first:
        if columns == Columns():
            raise
        try:
            return read_task_file(path, task, fmt, Columns(), labelled=False)
        except UserError:
            raise first from None
