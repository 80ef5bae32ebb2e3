"""Compression: transforms of a trained run into a smaller or faster one (never flags in model.py).

`budgetlm compress RUN --method M --out DIR` writes DIR as a run directory that every command that
reads runs (`eval`, `generate`, `finetune`, `suite`) loads through `budgetlm.run.load_run`:

    DIR/
      config.yaml         the model as it now is (a pruned model lists each block's heads and width)
      tokenizer.json, data.json, env.json
      model.safetensors   the weights (quantized ones in torchao's flattened form)
      compression.json    what was done: method, settings, source run, sizes and parameters before/after
      pruned.safetensors  prune only: the weights right after pruning, before the recovery training
      + a pretraining run's files (checkpoint/, metrics.jsonl, report.md) when there was training
        (prune's recovery, distill)

Methods: int8, int8-dyn, int4 (`quantize.py`); sparse (`sparsity.py`: unstructured magnitude or
2:4); prune (`prune.py`: heads, neurons, blocks, then recovery); distill (`distill.py`).
`load_model` applies what loading needs: quantized tensors put back as saved, and on a GPU with
sparse tensor cores a 2:4 run's weights in the semi-structured format.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from budgetlm.config import COMPRESS_METHODS
from budgetlm.errors import UserError

COMPRESSION_FILE = "compression.json"
FORMAT = "budgetlm-compressed/1"
METHODS = COMPRESS_METHODS
QUANTIZED = ("int8", "int8-dyn", "int4")


def compression_info(run_dir: Path) -> dict | None:
    """The run's compression.json, or None for an uncompressed run."""
    path = Path(run_dir) / COMPRESSION_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is damaged (not valid JSON)") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("method") not in METHODS:
        raise UserError(f"{path} is not a compression record this budgetlm reads (format {FORMAT})")
    return info


def load_model(run_dir: Path, model_cfg, weights: Path, info: dict, device: torch.device) -> torch.nn.Module:
    """The model of a compressed run, as it was saved."""
    from budgetlm.checkpoint import load_weights
    from budgetlm.model import Transformer

    method = info["method"]
    if method == "int4" and device.type != "cuda":
        raise UserError(f"{run_dir} holds int4 weights, which torchao runs on CUDA GPUs only")
    model = Transformer.build(model_cfg, device=device, seed=0)
    if method in QUANTIZED:
        from budgetlm.compress.quantize import load_quantized

        return load_quantized(model, weights, device)
    load_weights(weights, model)
    if method == "sparse" and info.get("pattern") == "2:4":
        from budgetlm.compress.sparsity import has_semi_structured, to_semi_structured

        if has_semi_structured(device):
            model.to(torch.bfloat16)
            to_semi_structured(model)
    return model.eval()
