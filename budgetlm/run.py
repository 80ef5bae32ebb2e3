"""A run directory, and rebuilding everything from it alone.

    RUN/
      config.yaml        resolved RunConfig (vocab size filled in)
      tokenizer.json     the tokenizer the data was prepared with
      env.json           code version and environment at the start
      data.json          which prepared data, its tokenizer hash and token counts
      checkpoint/        latest resumable state (weights, optimizer, loop state, RNG)
      model.safetensors  final weights (written when the run ends)
      metrics.jsonl      train / eval records; tb/ TensorBoard events
      eval.json, plots/*.png, report.md
      compression.json   only in a `budgetlm compress` output: how loading rebuilds its model
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from budgetlm.config import RunConfig, load_config
from budgetlm.errors import UserError

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_DIR = "checkpoint"


@dataclass
class Run:
    dir: Path
    config: RunConfig
    tokenizer: object  # budgetlm.data.tokenizer.Tokenizer
    model: torch.nn.Module


def run_config(run_dir: Path) -> RunConfig:
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"{run_dir} is not a budgetlm run directory (no {CONFIG_FILE})")
    return load_config(RunConfig, run_dir / CONFIG_FILE)


def weights_path(run_dir: Path) -> Path:
    """Final weights if the run ended, else the latest checkpoint's."""
    run_dir = Path(run_dir)
    for path in (run_dir / WEIGHTS_FILE, run_dir / CHECKPOINT_DIR / WEIGHTS_FILE):
        if path.is_file():
            return path
    raise UserError(f"run {run_dir} has no weights yet (neither {WEIGHTS_FILE} nor {CHECKPOINT_DIR}/{WEIGHTS_FILE})")


def load_run(run_dir: Path, device: str | torch.device = "cpu") -> Run:
    """Config, tokenizer and model (weights loaded, eval mode) from a run directory alone."""
    from budgetlm.checkpoint import load_weights
    from budgetlm.compress import compression_info, load_model
    from budgetlm.data.tokenizer import Tokenizer
    from budgetlm.model import Transformer

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    tokenizer = Tokenizer.load(run_dir / TOKENIZER_FILE)
    info = compression_info(run_dir)
    if info is not None:  # a `budgetlm compress` output: quantized tensors, sparse formats
        model = load_model(run_dir, cfg.model, weights_path(run_dir), info, torch.device(device))
    else:
        model = Transformer.build(cfg.model, device=torch.device(device))
        load_weights(weights_path(run_dir), model)
    model.eval()
    return Run(dir=run_dir, config=cfg, tokenizer=tokenizer, model=model)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is available")
    return torch.device(name)
