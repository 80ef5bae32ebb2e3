"""The Python API: what the command line does, as functions returning plain results.

    import budgetlm
    budgetlm.prepare(["corpus.txt"], "data", vocab_size=2048)
    result = budgetlm.pretrain(data="data", out="run", budget="90s", n_layer=2, learning_rate=3e-3)
    model = budgetlm.load("run")
    model.generate("ROMEO:", max_new_tokens=50, temperature=0)["completion"]
    model.evaluate()["val_bpb"]
    budgetlm.finetune("run", train="train.csv", out="ft", epochs=1)
    budgetlm.predict("ft", ["a fine film", "a dull film"])

Settings are keyword arguments under the same names as the command line's flags (aliases such as
`learning_rate` included), or a config object from `budgetlm.config`; pretraining settings may
name the leaf (`lr`, `n_layer`) when only one section has it, or a section (`train={"lr": 3e-4}`).
Errors a user can fix raise `budgetlm.UserError` with the message the CLI prints.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from budgetlm.config import (
    EvalConfig,
    FinetuneConfig,
    GenerateConfig,
    PrepareConfig,
    RunConfig,
    SuiteConfig,
    apply_settings,
    check_type,
    load_recipe,
)
from budgetlm.errors import UserError

__all__ = ["Model", "finetune", "load", "predict", "prepare", "pretrain", "suite"]


def _settings(cls: type, config: Any, settings: dict) -> tuple[Any, set[str]]:
    """`config` (a copy; default: the defaults) with `settings` applied; and the keys they set."""
    cfg = copy.deepcopy(config) if config is not None else cls()
    check_type(cfg, cls)
    return cfg, apply_settings(cfg, settings)


def prepare(inputs: str | Path | list, out: str | Path, *, config: PrepareConfig | None = None, force: bool = False,
            progress: bool = False, **settings) -> dict:  # fmt: skip
    """`budgetlm data prepare`: clean, train a tokenizer, tokenize, pack and split `inputs` into `out`.
    Returns the summary (documents, tokens and bytes per split, the tokenizer, speed)."""
    from budgetlm.data.prepare import prepare as _prepare

    cfg, _ = _settings(PrepareConfig, config, settings)
    inputs = [str(inputs)] if isinstance(inputs, (str, Path)) else [str(i) for i in inputs]
    return _prepare(inputs, out, cfg, force=force, show_progress=progress)


def pretrain(data: str | Path | None = None, out: str | Path | None = None, *, budget: str | None = None, recipe: str | None = None,
             config: RunConfig | None = None, resume: str | Path | None = None, **settings) -> dict:  # fmt: skip
    """`budgetlm pretrain`: train under `budget` into the run directory `out`; returns the final metrics.

    Defaults <- `recipe` <- `config` <- `budget` <- `settings` <- `data`. With `auto` (the default
    without a recipe) every model and train key you did not set is chosen for the budget and this
    machine. `resume=RUN` continues a killed run (a longer `budget` extends a finished one)."""
    from budgetlm.pretrain import check_config, resume_config, start_run
    from budgetlm.pretrain import pretrain as run_pretrain
    from budgetlm.tracking import set_command

    given = dict(data=data, out=out, budget=budget, recipe=recipe, resume=resume, **settings)
    shown = [f"{k}={v!r}" for k, v in given.items() if v is not None] + (["config=RunConfig(...)"] if config is not None else [])
    set_command(f"budgetlm.pretrain({', '.join(shown)})")

    if resume is not None:
        if data or out or recipe or config is not None:
            raise UserError("--resume continues a run with its own config; only --budget (a longer one) and parallel.* (another layout) may change")
        cfg = resume_config(resume, budget, [])
        keys = apply_settings(cfg, settings)
        if any(not k.startswith("parallel.") for k in keys):
            raise UserError("--resume continues a run with its own config; only --budget (a longer one) and parallel.* (another layout) may change")
        check_config(cfg)
        return run_pretrain(cfg, Path(resume), resume=True)
    if recipe is not None and config is not None:
        raise UserError("pass a recipe or a config, not both")
    cfg = load_recipe(recipe) if recipe else config
    cfg, keys = _settings(RunConfig, cfg, settings)
    if budget:
        cfg.budget.limit = budget
    if data:
        cfg.data = str(Path(data).resolve())
    check_config(cfg)
    user_keys = keys | ({k for k in _changed(cfg, RunConfig())} if config is not None else set())
    return start_run(cfg, out, user_keys=user_keys)


def _changed(cfg: Any, default: Any, prefix: str = "") -> set[str]:
    """Dotted keys where a config object differs from the defaults: what a caller's config object sets."""
    import dataclasses

    out = set()
    for f in dataclasses.fields(cfg):
        a, b = getattr(cfg, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(a):
            out |= _changed(a, b, prefix + f.name + ".")
        elif a != b:
            out.add(prefix + f.name)
    return out


@dataclass
class Model:
    """A trained run, loaded: its config, tokenizer and model (a `torch.nn.Module`), ready to use."""

    dir: Path
    run: Any  # budgetlm.run.Run

    @property
    def config(self) -> RunConfig:
        return self.run.config

    @property
    def tokenizer(self):
        return self.run.tokenizer

    @property
    def module(self):
        """The `torch.nn.Module` (in eval mode)."""
        return self.run.model

    def generate(self, prompt: str, *, config: GenerateConfig | None = None, on_text=None, **settings) -> dict:
        """`budgetlm generate`: {prompt, completion, tokens, tokens_per_s}; `on_text(piece)` streams the text."""
        from budgetlm.generate import generate_text

        cfg, _ = _settings(GenerateConfig, config, settings)
        return generate_text(self.run, prompt, cfg, on_text=on_text)

    def evaluate(self, data: str | Path | None = None, *, config: EvalConfig | None = None, **settings) -> dict:
        """`budgetlm eval`: val_loss, val_ppl, val_bpb (causal), val_tokens on the run's data or `data`."""
        from budgetlm.evaluate.lm import evaluate_run

        cfg, _ = _settings(EvalConfig, config, settings)
        if data is not None:
            cfg.data = str(data)
        return evaluate_run(self.run, cfg)

    def finetune(self, train: str | Path, out: str | Path, **kwargs) -> dict:
        """`budgetlm finetune` from this run (see `budgetlm.finetune`)."""
        return finetune(self.dir, train, out, **kwargs)


def load(run_dir: str | Path, device: str = "auto") -> Model:
    """A run directory, loaded (weights, tokenizer, config) on `device` (auto: the GPU if there is one)."""
    from budgetlm.run import load_run, resolve_device

    return Model(Path(run_dir), load_run(run_dir, resolve_device(device)))


def finetune(run: str | Path, train: str | Path, out: str | Path, *, valid: str | Path | None = None, config: FinetuneConfig | None = None,
             log=None, **settings) -> dict:  # fmt: skip
    """`budgetlm finetune`: adapt run `run` to the task in `train` (classify, pair, regress, tag), saved in
    `out`; returns the summary (best validation metrics, steps, time). Progress goes to `log` (default: none)."""
    from budgetlm.finetune.train import finetune_run

    cfg, _ = _settings(FinetuneConfig, config, settings)
    return finetune_run(run, train, out, cfg, valid_file=valid, log=log or (lambda *a, **k: None))


def predict(model_dir: str | Path, inputs: str | Path | list, *, device: str = "cpu") -> list:
    """`budgetlm predict`: one prediction per example of a file (a path) or of texts given as a list
    (strings; lists of words for tagging; (text, text2) pairs for pair models)."""
    from budgetlm.finetune.predict import predict_file, predict_texts

    if isinstance(inputs, (str, Path)):
        return predict_file(model_dir, inputs, device=device)[1]
    return predict_texts(model_dir, list(inputs), device=device)


def suite(run: str | Path, *, config: SuiteConfig | None = None, log=None, **settings) -> dict:
    """`budgetlm suite`: the downstream suite's results (also written to RUN/suite.json and suite.md)."""
    from budgetlm.evaluate.suite import TASKS, run_suite, write_results

    cfg, _ = _settings(SuiteConfig, config, settings)
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()] or list(TASKS)
    results = run_suite(Path(run), tasks, cfg.seeds, method=cfg.method, baseline=cfg.baseline, budget=cfg.budget or "60s",
                        max_train=cfg.max_train, max_test=cfg.max_test, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                        device=cfg.device, log=log or (lambda *a, **k: None))  # fmt: skip
    write_results(Path(run), results)
    return results
