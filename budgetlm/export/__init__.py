"""`budgetlm export`: a run or a fine-tuned directory in the formats other tools load.

    hf    a transformers directory (`budgetlm.export.hf`): causal runs -> LlamaForCausalLM (Qwen3 with
          QK-norm), masked runs -> EuroBertForMaskedLM (RMSNorm; with QK-norm, EuroBertQKNormForMaskedLM
          from a modeling file written into the directory, `budgetlm.export.modeling_eurobert_qk_norm`) or
          ModernBertForMaskedLM (LayerNorm in ModernBERT's layout, `budgetlm.export.modernbert`), fine-tuned classifiers -> ...ForSequence/
          TokenClassification; `--peft` writes a LoRA fine-tune unmerged as a PEFT adapter
    gguf  one llama.cpp file (`budgetlm.export.gguf`), f32 / f16 / q8_0

Only final weights are exported: a run that was stopped before it finished (only checkpoint/)
is refused, so an export never silently carries a half-trained model.
"""

from __future__ import annotations

import json
from pathlib import Path

from budgetlm.errors import UserError

FORMATS = ("hf", "gguf")


def export(source: str | Path, out: str | Path, fmt: str = "hf", dtype: str | None = None, peft: bool = False) -> dict:
    """Export a run or fine-tuned directory `source` to `out`; returns a summary dict."""
    from budgetlm.finetune.labels import FINETUNE_FILE
    from budgetlm.run import CONFIG_FILE, WEIGHTS_FILE, load_run

    source, out = Path(source), Path(out)
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}' (choose {' or '.join(FORMATS)})")
    if dtype is not None and fmt != "gguf":
        raise UserError("--dtype applies to --format gguf (hf directories hold fp32 weights)")
    if peft and fmt != "hf":
        raise UserError("--peft writes a Hugging Face PEFT adapter: use it with --format hf")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"output directory {out} exists and is not empty")
    if out.exists() and not out.is_dir() and not (fmt == "gguf" and out.suffix == ".gguf"):
        raise UserError(f"output path {out} is a file")
    if (source / FINETUNE_FILE).is_file():
        if fmt != "hf":
            raise UserError(f"{source} is a fine-tuned classifier; only --format hf exports those (GGUF holds language models)")
        from budgetlm.export.hf import export_finetuned

        return export_finetuned(source, out, peft=peft)
    if not (source / CONFIG_FILE).is_file():
        raise UserError(f"{source} is neither a budgetlm run ({CONFIG_FILE}) nor a fine-tuned directory ({FINETUNE_FILE})")
    if peft:
        raise UserError(f"--peft exports a LoRA fine-tune; {source} is a pretrained run")
    if not (source / WEIGHTS_FILE).is_file():
        raise UserError(f"run {source} has no final weights ({WEIGHTS_FILE}); let it finish or `pretrain --resume` it first")
    _refuse_compressed(source)
    run = load_run(source)
    if fmt == "gguf":
        from budgetlm.export.gguf import export_gguf

        return export_gguf(run, out, dtype or "f16")
    from budgetlm.export.hf import export_run

    return export_run(run, out)


def export_command(args) -> int:
    from budgetlm.config import ExportConfig
    from budgetlm.flags import print_config, settings_from_args

    cfg = settings_from_args(ExportConfig, args)
    if args.print_config:
        print_config(cfg, args.json)
        return 0
    summary = export(args.source, args.out, cfg.format, dtype=None if cfg.dtype == "auto" else cfg.dtype, peft=cfg.peft)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"exported {args.source} as {summary['architecture']} -> {summary['out']}")
        if summary.get("trust_remote_code"):
            print(
                f"  load it (and its tokenizer) with trust_remote_code=True: no transformers family holds this model, "
                f"so the directory carries its modeling file, {summary['modeling_file']}"
            )
    return 0


def _refuse_compressed(source: Path) -> None:
    """Quantized weights (torchao tensors) and per-block sizes (structured pruning) have no place in a
    Llama / Qwen3 config or a llama.cpp file: refuse them rather than write a wrong model."""
    from budgetlm.compress import compression_info
    from budgetlm.run import run_config

    info = compression_info(source) or {}
    method = info.get("method")
    if method in ("int8", "int8-dyn", "int4"):
        raise UserError(f"{source} is quantized ({method}); export the run it was made from")
    model = run_config(source).model
    if model.layer_heads or model.layer_ffn:
        raise UserError(f"{source} has per-block sizes (structured pruning), which Llama-family configs cannot express")
