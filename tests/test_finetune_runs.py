"""A tiny pretrained-run directory for the fine-tuning tests (config.yaml, tokenizer.json, model.safetensors).

The body is random (a few milliseconds to build), which is enough to test plumbing, parameter
freezing and save/reload; learning on real data is the suite's job.
"""

from pathlib import Path

import torch

from budgetlm.checkpoint import save_weights
from budgetlm.config import ModelConfig, RunConfig, save_config
from budgetlm.data.tokenizer import train_tokenizer
from budgetlm.model import Transformer
from budgetlm.run import load_run

WORDS = "the a good bad film movie great awful plot actor boring fun dull fine I you we run runs ran dog cat sat on mat".split()


def make_tiny_run(path: Path, objective: str = "causal", tokenizer_kind: str | None = None, seed: int = 0) -> Path:
    """Write a 2-layer, 64-wide run of `objective` at `path` and return it."""
    path.mkdir(parents=True, exist_ok=True)
    kind = tokenizer_kind or ("bpe" if objective == "causal" else "wordpiece")
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
    tok = train_tokenizer(kind, texts, vocab_size=300, min_frequency=1)
    cfg = RunConfig(model=ModelConfig(objective=objective, n_layer=2, n_head=2, n_embd=64, vocab_size=tok.vocab_size, seq_len=64,
                                      mlp="swiglu" if objective == "causal" else "geglu",
                                      norm="rmsnorm" if objective == "causal" else "layernorm"))  # fmt: skip
    torch.manual_seed(seed)
    model = Transformer.build(cfg.model)
    save_config(cfg, path / "config.yaml")
    tok.save(path / "tokenizer.json")
    save_weights(path / "model.safetensors", model)
    return path


def test_tiny_run_loads(tmp_path):
    run = load_run(make_tiny_run(tmp_path / "run"))
    assert run.model.cfg.n_layer == 2 and run.tokenizer.encode("the film")
