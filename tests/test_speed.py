"""Timing candidate models: undisturbed steps are cached, steps disturbed by other work are
retimed, corrected for their wait and never cached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from budgetlm import plan as P
from budgetlm import speed
from budgetlm.speed import CLEAN_WAIT, TIMED_STEPS, Timing, cpu_wait_seconds, summarise, waited_between


def test_undisturbed_steps_give_their_median_and_disturbed_ones_their_time_less_the_wait():
    idle = summarise([(0.10, 0.0), (0.12, 0.001), (0.11, 0.0)], threads=1)
    assert idle.clean and idle.seconds == 0.11 and idle.waited < CLEAN_WAIT
    # one disturbed step among them is left out, once enough others are undisturbed
    mixed = summarise([(0.10, 0.0), (0.30, 0.15), (0.12, 0.0), (0.11, 0.0)], threads=1)
    assert mixed.clean and mixed.seconds == 0.11
    # a busy machine throughout: each step less its wait, not cached
    busy = summarise([(0.20, 0.10), (0.24, 0.13), (0.22, 0.11)], threads=1)
    assert not busy.clean and busy.seconds == pytest.approx(0.11) and busy.waited == pytest.approx(0.5)
    # with two threads, the wait spreads over both: half of it is taken off
    assert summarise([(0.20, 0.10)] * TIMED_STEPS, threads=2).seconds == pytest.approx(0.15)
    # a GPU's step is paced by the GPU: flagged and not cached, but its time is kept
    gpu = summarise([(0.20, 0.10)] * TIMED_STEPS, threads=1, correct=False)
    assert not gpu.clean and gpu.seconds == pytest.approx(0.20)


def test_waits_are_counted_per_thread_and_never_negative():
    assert waited_between({"1": 1.0, "2": 5.0}, {"1": 1.5, "3": 0.2}) == pytest.approx(0.5)  # 2 ended, 3 began: neither counts
    assert waited_between({"1": 1.0}, {"1": 0.5}) == 0.0
    assert waited_between(None, {"1": 1.0}) == 0.0  # where the kernel does not say, nothing is taken off
    reading = cpu_wait_seconds()
    assert reading is None or (reading and all(w >= 0 for w in reading.values()))


def test_a_plan_from_disturbed_timings_says_so(monkeypatch, capsys):
    def fake(cfg, micro, **kw):  # 2 ms per layer and sequence; the deeper candidates timed beside other work
        return Timing(0.002 * cfg.n_layer * micro, 0.4 if cfg.n_layer > 1 else 0.0, cfg.n_layer == 1)

    monkeypatch.setattr(speed, "step_seconds", fake)
    lines = []
    plan = P.make_plan("5m", P.Planner(torch.device("cpu"), memory=8e9, log=lines.append), fixed_train={"precision": "fp32"})
    assert plan.cpu_wait == 0.4 and sum("other work shared the CPUs" in line for line in lines) == 1  # said once, not per timing
    assert "note    other work shared the CPUs" in P.format_plan(plan)
    monkeypatch.setattr(speed, "step_seconds", lambda cfg, micro, **kw: Timing(0.002 * cfg.n_layer * micro, 0.0, True))
    assert "other work" not in P.format_plan(P.make_plan("5m", P.Planner(torch.device("cpu"), memory=8e9)))


def test_runs_calibrate_later_plans_of_their_model_by_the_median_of_their_last_ratios(tmp_path, monkeypatch):
    monkeypatch.setenv("BUDGETLM_CACHE", str(tmp_path))
    cpu = torch.device("cpu")
    assert speed.calibration(cpu, "a") == speed.Calibration(1.0, 0, False)  # before any run
    for ratio in (0.9, 0.5, 0.8):
        assert speed.record_run_speed(cpu, 1, "a", ratio * 1000, 1000) == pytest.approx(ratio)
    assert speed.calibration(cpu, "a") == speed.Calibration(pytest.approx(0.8), 3, True)
    assert speed.record_run_speed(cpu, 1, "a", 50, 1000) is None  # 0.05x: a broken measurement, not kept
    assert speed.calibration(cpu, "a", processes=2).runs == 0  # two processes run at their own pace
    for _ in range(speed.RUN_RATIOS_KEPT):
        speed.record_run_speed(cpu, 1, "b", 1200, 1000)
    assert speed.calibration(cpu, "b") == speed.Calibration(pytest.approx(1.2), speed.RUN_RATIOS_KEPT, True)  # the oldest forgotten
    # a model never run here: every model's ratios, pooled
    assert speed.calibration(cpu, "c") == speed.Calibration(pytest.approx(1.2), 3 + speed.RUN_RATIOS_KEPT, False)

    monkeypatch.setattr(speed, "step_seconds", lambda cfg, micro, **kw: Timing(0.002 * cfg.n_layer * micro, 0.0, True))
    plain = P.make_plan("5m", P.Planner(cpu, memory=8e9), fixed_train={"precision": "fp32"})
    for _ in range(speed.RUN_RATIOS_KEPT):
        speed.record_run_speed(cpu, 1, plain.speed_key, 500, 1000)
    scaled = P.make_plan("5m", P.Planner(cpu, memory=8e9), fixed_train={"precision": "fp32"})
    assert scaled.model == plain.model and scaled.candidates == plain.candidates  # the choice stays with the timings
    assert scaled.speed_calibration == pytest.approx(0.5) and scaled.tokens_per_s == pytest.approx(0.5 * plain.tokens_per_s / plain.speed_calibration)
    assert scaled.tokens == pytest.approx(0.5 * plain.tokens / plain.speed_calibration, rel=1e-6)
    assert "the timed speed x 0.50: the median of what the last 9 runs of this model on this device sustained" in P.format_plan(scaled)


CHILD = textwrap.dedent(
    """
    import json, os, sys, torch
    from budgetlm.config import ModelConfig
    from budgetlm.speed import matmul_peak, step_seconds
    os.sched_setaffinity(0, {int(sys.argv[1])})
    torch.set_num_threads(1)
    cfg = ModelConfig(n_layer=2, n_embd=64, n_head=1, seq_len=128, vocab_size=512)
    t = step_seconds(cfg, 8, precision="fp32", optimizer="adamw", device=torch.device("cpu"))
    peak, peak_clean = matmul_peak(torch.device("cpu"), torch.float32)
    print(json.dumps({"seconds": t.seconds, "waited": t.waited, "clean": t.clean, "peak": peak, "peak_clean": peak_clean}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(cpu_wait_seconds() is None, reason="needs Linux's per-thread schedstat")
def test_timings_made_beside_a_busy_program_are_corrected_and_not_cached(tmp_path):
    cpu = max(os.sched_getaffinity(0))
    env = {**os.environ, "BUDGETLM_CACHE": str(tmp_path / "cache")}

    def timed() -> dict:
        out = subprocess.run([sys.executable, "-c", CHILD, str(cpu)], env=env, capture_output=True, text=True, check=True, timeout=120)
        return json.loads(out.stdout.splitlines()[-1])

    hog_code = f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
    hog = subprocess.Popen([sys.executable, "-c", hog_code])
    try:
        busy = timed()
    finally:
        hog.kill()
        hog.wait()
    assert not busy["clean"] and busy["waited"] > 0.3  # it shared its core half the time
    assert not busy["peak_clean"]
    assert not (tmp_path / "cache" / "speed.json").exists()
    idle = next((t for t in (timed() for _ in range(3)) if t["clean"] and t["peak_clean"]), None)
    if idle is None:
        pytest.skip("this machine stayed too busy to time an undisturbed step")
    assert idle["waited"] < CLEAN_WAIT
    assert json.loads((tmp_path / "cache" / "speed.json").read_text())  # an undisturbed timing is kept
    # the wait taken off, the busy timing is close to the idle one, where the wall clock said twice it
    assert 0.6 < busy["seconds"] / idle["seconds"] < 1.5
    # and so is the matmul peak MFU divides by (measured plainly beside the busy program, it halved)
    assert 0.6 < busy["peak"] / idle["peak"] < 1.5
