"""Language-model evaluation: validation loss, perplexity and bits per byte on fixed held-out tokens.

Bits per byte (nanochat's headline metric) does not depend on the vocabulary, so runs with
different tokenizers compare: bpb = loss_nats_per_token / ln 2 * tokens_per_byte, with tokens per
byte of the validation split taken from the data manifest. Masked models report the masked-token
loss (bits per byte is only defined for the causal objective).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from budgetlm.errors import UserError


@torch.no_grad()
def evaluate_lm(
    model: torch.nn.Module,
    data,  # budgetlm.data.dataset.PreparedData
    *,
    objective: str,
    seq_len: int,
    n_tokens: int,
    batch_size: int,
    device: torch.device,
    autocast=contextlib.nullcontext,
    mlm_rate: float = 0.15,
    seed: int = 0,
    loss_parallel: bool = False,
) -> dict:
    """Mean loss over the first `n_tokens` of the validation split (the same tokens every call).

    Every rank of a sharded model (FSDP2 / tensor parallel) must call it: its forward has collectives.
    `loss_parallel`: the model's logits are vocabulary-sharded DTensors (tensor parallel)."""
    from budgetlm.data.loader import val_batches
    from budgetlm.data.masking import mask_tokens
    from budgetlm.model import compute_loss

    loss_ctx = contextlib.nullcontext
    if loss_parallel:
        from torch.distributed.tensor.parallel import loss_parallel as loss_ctx

    tokens = data.tokens("val")
    window = seq_len + 1
    n_tokens = min(n_tokens, (len(tokens) // window) * window)
    if n_tokens < window:
        raise UserError(f"the validation split has {len(tokens)} tokens, fewer than one sequence of {window}")
    tok = data.tokenizer
    generator = torch.Generator().manual_seed(seed)  # same masks every evaluation
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for w in val_batches(tokens, seq_len, n_tokens, batch_size):
        if objective == "causal":
            x, y = w[:, :-1], w[:, 1:]
        else:
            x, y = mask_tokens(
                w[:, :-1], mask_id=tok.mask_id, vocab_size=tok.vocab_size, rate=mlm_rate, special_ids=tok.special_ids, generator=generator
            )
        n = int((y != -100).sum())
        if n == 0:
            continue
        if hasattr(model, "pipeline_loss"):  # a pipeline: every stage runs the batch, the last one scores it
            if x.shape[0] % model.n_microbatches:
                continue  # a short last batch does not split into the schedule's pieces
            with autocast():
                loss = model.pipeline_loss(x.to(device), y.to(device))
        else:
            with loss_ctx(), autocast():
                loss = compute_loss(model, x.to(device), y.to(device))
        if hasattr(loss, "full_tensor"):
            loss = loss.full_tensor()
        total += float(loss) * n
        count += n
    model.train(was_training)
    mean = total / max(count, 1)
    out = {"val_loss": mean, "val_ppl": math.exp(min(mean, 50.0)), "val_tokens": count}
    if objective == "causal":
        out["val_bpb"] = mean / math.log(2) / data.bytes_per_token("val")
    return out


def evaluate_run(run, cfg=None) -> dict:
    """Validation metrics of a run (a directory or a loaded `budgetlm.run.Run`) on its own data or `cfg.data`."""
    from budgetlm.config import EvalConfig
    from budgetlm.data.dataset import PreparedData
    from budgetlm.data.vocab import find_derived
    from budgetlm.run import Run, load_run, resolve_device

    cfg = cfg or EvalConfig()
    if isinstance(run, Run):
        device = next(run.model.parameters()).device
    else:
        device = resolve_device(cfg.device)
        run = load_run(run, device)
    data_dir = cfg.data or run.config.data
    if not data_dir:
        raise UserError("the run does not name its data directory; pass --data DIR")
    data = PreparedData(data_dir)
    if data.tokenizer.sha256 != run.tokenizer.sha256:  # the run may have trained on a vocabulary cut from this data
        data = find_derived(data, run.tokenizer.sha256) or data
    if data.tokenizer.sha256 != run.tokenizer.sha256:
        raise UserError(f"tokenizer mismatch: {data_dir} was prepared with another tokenizer than run {run.dir}")
    if cfg.tokens < 0:
        raise UserError(f"--tokens must be >= 0 (0 = the run's eval_tokens), got {cfg.tokens}")
    autocast = contextlib.nullcontext
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        autocast = lambda: torch.autocast("cuda", dtype=dtype)  # noqa: E731
    mc = run.config.model
    metrics = evaluate_lm(
        run.model,
        data,
        objective=mc.objective,
        seq_len=mc.seq_len,
        n_tokens=cfg.tokens or run.config.train.eval_tokens,
        batch_size=max(1, 8192 // mc.seq_len),
        device=device,
        autocast=autocast,
        mlm_rate=run.config.train.mlm_rate,
    )
    metrics["data"] = str(Path(data_dir).resolve())
    return metrics


def eval_command(args) -> int:
    from budgetlm.config import EvalConfig
    from budgetlm.files import write_json
    from budgetlm.flags import print_config, settings_from_args

    cfg = settings_from_args(EvalConfig, args)
    if args.print_config:
        print_config(cfg, args.json)
        return 0
    metrics = evaluate_run(args.run, cfg)
    if not cfg.data:
        write_json(Path(args.run) / "eval.json", metrics)
    if args.json:
        print(json.dumps(metrics))
    else:
        parts = [f"val_loss {metrics['val_loss']:.4f}", f"ppl {metrics['val_ppl']:.2f}"]
        if "val_bpb" in metrics:
            parts.append(f"bits/byte {metrics['val_bpb']:.4f}")
        print(f"{args.run}: " + "  ".join(parts) + f"  ({metrics['val_tokens']} tokens)")
    return 0
