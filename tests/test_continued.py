"""Continued training: a finished run extended with a longer budget (same steps, data stream and
optimizer state; the documented re-warm-and-decay schedule), and a new run started from another
run's weights (new budget and data; the tokenizer and model shapes must match)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_pretrain import tiny_args, train_losses

from budgetlm.cli import main
from budgetlm.config import TrainConfig
from budgetlm.data.prepare import prepare
from budgetlm.optim import extended_multiplier, lr_multiplier, ramp_progress
from budgetlm.run import load_run
from budgetlm.tracking import read_metrics


def _train_records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run) if r["kind"] == "train"}


def _state(run: Path) -> dict:
    return json.loads((run / "checkpoint" / "state.json").read_text())


@pytest.fixture(scope="module")
def short_run(prepared_bpe, tmp_path_factory):
    run = tmp_path_factory.mktemp("continued") / "short"
    assert main(tiny_args(prepared_bpe, run, "steps:6")) == 0
    return run


def test_extend_finished_run_keeps_steps_data_and_optimizer_and_rewarms(short_run, prepared_bpe, tmp_path, capsys):
    before = train_losses(short_run)
    reference = tmp_path / "reference"  # the same run trained for 12 steps at once: where the data stream should stand
    assert main(tiny_args(prepared_bpe, reference, "steps:12")) == 0

    assert main(["pretrain", "--resume", str(short_run), "--budget", "steps:12"]) == 0
    assert "extending: budget steps:6 -> steps:12 at step 6" in capsys.readouterr().out
    records = _train_records(short_run)
    assert sorted(records) == list(range(1, 13))  # the step count continues
    assert {s: records[s]["loss"] for s in range(1, 7)} == before  # history untouched
    assert {r["tokens"] - 512 * s for s, r in records.items()} == {0}
    # the data stream continued where it stood, exactly where an uninterrupted 12-step run is
    assert _state(short_run)["loader"] == _state(reference)["loader"]
    # the optimizer state was restored, not rebuilt: AdamW (beside Muon) has counted all 12 steps
    opt = torch.load(short_run / "checkpoint" / "optimizer.pt", weights_only=False)
    assert {float(s["step"]) for s in opt["state"].values() if "step" in s} == {12.0}

    # schedule: the finished run stood at 0 (linear decay, min_lr_ratio 0); the extension
    # (progress 0.5 -> 1 of steps:12) re-warms over its first 10% and decays linearly to 0 again
    def expected(step: int) -> float:
        q = ((step - 1) / 12 - 0.5) / 0.5
        return 3e-3 * (q / 0.1 if q < 0.1 else 1 - (q - 0.1) / 0.9)

    for s in range(7, 13):
        assert records[s]["lr"] == pytest.approx(expected(s), abs=1e-12), s
    assert max(records[s]["lr"] for s in range(7, 13)) > 2.5e-3  # really back near the peak
    summary = json.loads((short_run / "checkpoint" / "state.json").read_text())["loop"]
    assert summary["extensions"][0]["from_budget"] == "steps:6" and summary["extensions"][0]["multiplier"] == 0.0
    assert "steps:6 -> steps:12" in (short_run / "report.md").read_text()

    # a budget the run has already used up is refused with one line
    assert main(["pretrain", "--resume", str(short_run), "--budget", "steps:10"]) == 2
    assert "leaves nothing to train" in capsys.readouterr().err


def test_init_from_starts_a_new_run_from_the_weights(short_run, prepared_bpe, prepared_wordpiece, sample_text_dir, tmp_path, capsys):
    # learning rate 0: one step leaves the weights exactly as loaded
    frozen = tmp_path / "frozen"
    args = ["pretrain", "--init-from", str(short_run), "--out", str(frozen), "--budget", "steps:1", "--set", "train.lr=0"]
    assert main(args) == 0
    src, new = load_run(short_run).model.state_dict(), load_run(frozen).model.state_dict()
    assert all(torch.equal(src[k], new[k]) for k in src)
    assert json.loads((frozen / "init_from.json").read_text())["step"] == _state(short_run)["loop"]["step"]
    assert load_run(frozen).config.model == load_run(short_run).config.model

    # new data prepared with the run's tokenizer, a new budget: a fresh schedule from step 1
    other = tmp_path / "other-data"
    prepare([str(sample_text_dir)], other, _settings(short_run), show_progress=False)
    cont = tmp_path / "cont"
    assert main(["pretrain", "--init-from", str(short_run), "--data", str(other), "--out", str(cont), "--budget", "steps:3"]) == 0
    records = _train_records(cont)
    assert sorted(records) == [1, 2, 3]
    source = _train_records(short_run)
    first, last = source[1]["loss"], source[max(source)]["loss"]
    assert records[1]["loss"] < first - 0.5 * (first - last), (first, last, records[1]["loss"])  # it starts where the source ended

    def fails(argv: list[str], message: str) -> None:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err

    base = ["pretrain", "--init-from", str(short_run), "--budget", "steps:2"]
    fails([*base, "--out", str(tmp_path / "x1"), "--data", str(prepared_wordpiece)], "was tokenized with another tokenizer than run")
    fails([*base, "--out", str(tmp_path / "x2"), "--set", "model.n_layer=3"], "--init-from keeps")
    fails([*base, "--out", str(tmp_path / "x3"), "--resume", str(short_run)], "give no --resume or --recipe")
    fails([*base, "--out", str(frozen)], "exists and is not empty")
    fails(["pretrain", "--init-from", str(tmp_path / "missing"), "--out", str(tmp_path / "x4")], "not a budgetlm run directory")


def _settings(run: Path):
    from budgetlm.config import PrepareConfig

    return PrepareConfig(tokenizer_file=str(run / "tokenizer.json"))


# ---------------------------------------------------------------------------------------------
# the rule itself, on every schedule


@pytest.mark.parametrize("schedule", ["linear", "wsd", "cosine", "constant", "one-cycle"])
def test_extension_is_continuous_and_ends_at_the_minimum(schedule):
    cfg = TrainConfig(schedule=schedule, warmup=0.1, cooldown=0.2, min_lr_ratio=0.1)
    for start, m0 in [(0.3, 1.0), (0.5, 0.1), (0.8, 0.55)]:
        assert extended_multiplier(start, cfg, start, m0) == pytest.approx(m0)  # no jump at the resume point
        end = extended_multiplier(1.0, cfg, start, m0)
        assert end == pytest.approx(lr_multiplier(1.0, cfg))
        # after the re-warm the extension follows the schedule's own shape, squeezed into what is left
        q = 0.6
        assert extended_multiplier(start + q * (1 - start), cfg, start, m0) == pytest.approx(lr_multiplier(q, cfg))


def test_wsd_stopped_in_its_stable_phase_stays_at_the_peak_until_the_new_cooldown():
    cfg = TrainConfig(schedule="wsd", warmup=0.05, cooldown=0.2)
    # killed at 40% of a 1h budget (stable: multiplier 1), extended to 2h: progress 0.2 of the new one
    start = 0.2
    assert lr_multiplier(0.4, cfg) == 1.0
    for p in (0.2, 0.25, 0.5, 0.8):
        assert extended_multiplier(p, cfg, start, 1.0) == 1.0
    assert extended_multiplier(0.9, cfg, start, 1.0) < 1.0  # the decay now ends at the new deadline


def test_ramps_never_go_back_after_an_extension():
    assert ramp_progress(0.3, None) == 0.3
    finished = {"progress": 0.5, "multiplier": 0.0, "ramp_progress": 1.0}
    assert ramp_progress(0.5, finished) == 1.0
    midway = {"progress": 0.1, "multiplier": 0.5, "ramp_progress": 0.2}  # stopped at 20% of its old ramp
    assert ramp_progress(0.1, midway) == 0.2 and ramp_progress(0.55, midway) == pytest.approx(0.5)
