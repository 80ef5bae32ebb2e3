"""Continued training: a run given a new budget (`--resume RUN --budget LONGER`), and a new run
that starts from another run's weights (`--init-from RUN`).

Extending a run. A resumed run keeps everything that makes it the same run: weights, optimizer
state, step and token counts, the data stream's position and the counted time. What changes is
the deadline, so budget progress (elapsed / budget) drops, and every schedule that follows
progress would jump. The learning rate therefore follows one rule instead
(`budgetlm.optim.extended_multiplier`): from the extension point to the new deadline the
configured schedule runs again, its warm-up climbing from the rate the run last used rather than
from zero: a finished run re-warms to the peak and decays again to the new deadline; a run
stopped in the stable phase of warmup-stable-decay stays at the peak and decays at the end. The
batch ramp and sequence warm-up never go back (`budgetlm.optim.ramp_progress`). Periodic
evaluations continue every `eval_every` of the new budget.

Starting from another run. `--init-from RUN` builds RUN's model (its config, whatever the
budget would choose), loads RUN's latest weights and trains them as a new run: new directory,
fresh optimizer and schedule, any budget, and other prepared data if it was tokenized with RUN's
tokenizer (or the same prepared tokenizer, cut to RUN's vocabulary). Keys that would change the
model's shapes or function are refused; train keys may change.
"""

from __future__ import annotations

from pathlib import Path

from budgetlm.budget import Clock, parse_budget
from budgetlm.config import RunConfig, apply_overrides
from budgetlm.data.dataset import PreparedData
from budgetlm.data.tokenizer import Tokenizer
from budgetlm.errors import UserError
from budgetlm.optim import extended_multiplier, lr_multiplier, ramp_progress
from budgetlm.run import CHECKPOINT_DIR, TOKENIZER_FILE, WEIGHTS_FILE, run_config

# model keys that change neither parameter shapes nor what the trained weights compute
INIT_FROM_MODEL_KEYS = ("model.dropout", "model.attention", "model.seq_len")
INIT_FILE = "init_from.json"


# ---------------------------------------------------------------------------------------------
# extending a run


def budget_changed(saved_clock: dict, limit: str) -> bool:
    return saved_clock.get("budget") not in (None, str(parse_budget(limit)))


def begin_extension(state, clock: Clock, saved_clock: dict, train_cfg) -> dict:
    """Record where a resumed run meets its new budget and return the extension (stored in the
    loop state; `lr_at` and `ramp_progress` read it). `clock` already holds the new budget and
    the restored counted time; `saved_clock` is the checkpoint's, with the old budget."""
    old_budget = saved_clock["budget"]
    if clock.should_stop(tokens=state.tokens, steps=state.step):
        used = {"time": f"{clock.elapsed():.0f}s", "tokens": f"{state.tokens:,} tokens", "steps": f"{state.step} steps"}[clock.budget.kind]
        raise UserError(f"budget {clock.budget} leaves nothing to train: the run has used {used} of it already; give a longer one")
    old = Clock(parse_budget(old_budget), reserve=float(saved_clock.get("reserve", 0.0)), max_tokens=int(saved_clock.get("max_tokens", 0)))
    old.load_state_dict(saved_clock)
    old_progress = old.progress(tokens=state.tokens, steps=state.step)
    previous = state.extension
    if previous:
        multiplier = extended_multiplier(old_progress, train_cfg, previous["progress"], previous["multiplier"])
    else:
        multiplier = lr_multiplier(old_progress, train_cfg)
    extension = {
        "step": state.step,
        "from_budget": old_budget,
        "budget": str(clock.budget),
        "progress": clock.progress(tokens=state.tokens, steps=state.step),  # where the new schedule starts
        "multiplier": multiplier,  # the rate (over the peak) the run stood at
        "ramp_progress": ramp_progress(old_progress, previous),
    }
    state.extension = extension
    state.extensions = [*state.extensions, extension]
    every = train_cfg.eval_every
    if every > 0:
        p = extension["progress"]
        state.next_eval = p + every * (1.0 - p)  # evaluations keep their spacing over what is left
    return extension


def describe_extension(ext: dict) -> str:
    return (
        f"budget {ext['from_budget']} -> {ext['budget']} at step {ext['step']}: the learning rate re-warms from "
        f"{ext['multiplier']:.3g} of the peak and decays again to the new deadline (progress {ext['progress']:.3f} of it used)"
    )


# ---------------------------------------------------------------------------------------------
# starting from another run


def init_from_config(source: Path, data: str | None, budget: str | None, overrides: list[str]) -> RunConfig:
    """The config of a new run that starts from `source`'s weights: `source`'s model and train
    settings, the new budget and data, and the overrides (no shape-changing model keys)."""
    source = Path(source)
    cfg = run_config(source)
    if not (source / CHECKPOINT_DIR).is_dir() and not (source / WEIGHTS_FILE).is_file():
        raise UserError(f"run {source} has no checkpoint or final weights ({WEIGHTS_FILE}) to start from")
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.startswith("model.") and key not in INIT_FROM_MODEL_KEYS:
            allowed = ", ".join(INIT_FROM_MODEL_KEYS)
            raise UserError(f"--init-from keeps {source}'s model: {key} would change it (only {allowed} may be set)")
        if key in ("auto", "recipe", "data"):
            raise UserError(f"--init-from takes the model from {source}; {key} cannot be set (use --data for the data)")
    cfg.auto = False  # the model is the source's; nothing is planned
    cfg.budget.max_tokens = 0  # the source's data limit counted the source's tokens, on its data
    if budget:
        cfg.budget.limit = budget
    apply_overrides(cfg, overrides)
    cfg.data = str(Path(data).resolve()) if data else cfg.data
    cfg.data = str(matching_data(source, cfg.data).path)
    return cfg


def matching_data(source: Path, data_dir: str) -> PreparedData:
    """`data_dir`, or the vocabulary derived from it, whose tokenizer is `source`'s: a model's
    embedding rows mean the tokens of its own tokenizer, nothing else."""
    from budgetlm.data.vocab import can_derive, derive_vocabulary, find_derived, truncate_bpe

    want = Tokenizer.load(source / TOKENIZER_FILE)
    data = PreparedData(data_dir)
    if data.tokenizer.sha256 == want.sha256:
        return data
    found = find_derived(data, want.sha256)
    if found is not None:
        return found
    if can_derive(data.tokenizer) and want.vocab_size < data.vocab_size:
        try:
            same = truncate_bpe(data.tokenizer, want.vocab_size).sha256 == want.sha256
        except UserError:
            same = False
        if same:
            return derive_vocabulary(data, want.vocab_size)
    raise UserError(
        f"{data_dir} was tokenized with another tokenizer than run {source} ({data.tokenizer.kind} {data.vocab_size:,} vs "
        f"{want.kind} {want.vocab_size:,}); prepare it with --tokenizer-file {source / TOKENIZER_FILE}"
    )
