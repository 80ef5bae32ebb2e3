"""The budget clock, driven by a fake time function."""

import pytest

from budgetlm.budget import Budget, Clock, format_seconds, parse_budget
from budgetlm.config import BudgetConfig
from budgetlm.errors import UserError


class FakeTime:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize(
    "text, kind, limit",
    [
        ("24h", "time", 86400),
        ("90m", "time", 5400),
        ("300s", "time", 300),
        ("1.5h", "time", 5400),
        ("2d", "time", 172800),
        ("300", "time", 300),
        (" 45 M ", "time", 2700),
        ("1h30m", "time", 5400),
        ("1h 0m 5s", "time", 3605),
        ("tokens:2e9", "tokens", 2e9),
        ("steps:5000", "steps", 5000),
        ("steps: 10", "steps", 10),
    ],
)
def test_parse_budget(text, kind, limit):
    assert parse_budget(text) == Budget(kind, limit)


@pytest.mark.parametrize("text", ["", "abc", "0", "0s", "-5m", "10x", "tokens:", "tokens:0", "steps:-3", "steps:2.5", "inf", "1e999h", "h"])
def test_parse_budget_errors(text):
    with pytest.raises(UserError):
        parse_budget(text)


def test_budget_str_round_trips():
    for text in ["24h", "1h30m", "45s", "tokens:2000000000", "steps:5000"]:
        assert str(parse_budget(text)) == text
    assert format_seconds(0) == "0s"


def test_time_progress_endpoints_and_reserve():
    ft = FakeTime()
    clock = Clock(Budget("time", 100.0), reserve=0.1, time_fn=ft)
    assert clock.progress() == 0.0
    ft.t += 50  # not started: not counted
    assert clock.elapsed() == 0.0
    clock.start()
    ft.t += 45
    assert clock.progress() == pytest.approx(0.5)  # 45 of the usable 90 seconds
    ft.t += 45
    assert clock.progress() == 1.0
    assert clock.should_stop()
    ft.t += 100
    assert clock.progress() == 1.0  # clamped
    assert clock.remaining() == 0.0


def test_count_budgets_ignore_reserve():
    clock = Clock(parse_budget("tokens:1000"), reserve=0.5, time_fn=FakeTime())
    assert clock.progress(tokens=500) == 0.5
    assert not clock.should_stop(tokens=999)
    assert clock.should_stop(tokens=1000)
    steps = Clock(parse_budget("steps:10"), reserve=0.5, time_fn=FakeTime())
    assert steps.progress(steps=0) == 0.0 and steps.progress(steps=10) == 1.0
    assert [steps.should_stop(steps=s) for s in (9, 10, 11)] == [False, True, True]


def test_a_wall_clock_budget_with_max_tokens_ends_at_whichever_comes_first():
    ft = FakeTime()
    clock = Clock(Budget("time", 100.0), time_fn=ft, max_tokens=1000)
    clock.start()
    ft.t += 10
    assert clock.progress(tokens=500) == 0.5  # tokens lead: the schedule follows them
    assert not clock.should_stop(tokens=999) and clock.should_stop(tokens=1000)
    ft.t += 70
    assert clock.progress(tokens=500) == pytest.approx(0.8)  # the clock leads
    ft.t += 20
    assert clock.should_stop(tokens=10)  # the deadline still holds
    assert Clock(parse_budget("tokens:50"), max_tokens=10).max_tokens == 0  # only for wall-clock budgets
    with pytest.raises(UserError, match="max_tokens"):
        Clock(Budget("time", 10.0), max_tokens=-1)


def _run(clock: Clock, ft: FakeTime, step_seconds: list[float]) -> int:
    """A training loop on the fake clock; returns how many steps ran."""
    clock.start()
    steps = 0
    while not clock.should_stop(steps=steps):
        ft.t += step_seconds[min(steps, len(step_seconds) - 1)]
        clock.step_done()
        steps += 1
    return steps


def test_stops_before_the_step_that_would_overrun():
    ft = FakeTime()
    clock = Clock(Budget("time", 10.0), time_fn=ft)
    # Steps of 1.5 s: after 6 steps (9 s) a seventh would end at 10.5 s > 10 s.
    assert _run(clock, ft, [1.5]) == 6
    assert clock.elapsed() == pytest.approx(9.0)


def test_stops_exactly_when_steps_fit():
    ft = FakeTime()
    clock = Clock(Budget("time", 10.0), time_fn=ft)
    assert _run(clock, ft, [2.0]) == 5
    assert clock.elapsed() == pytest.approx(10.0)


def test_warmup_step_does_not_skew_the_estimate():
    ft = FakeTime()
    clock = Clock(Budget("time", 100.0), time_fn=ft)
    # A 30 s compile warm-up, then 1 s steps: the run must still use the budget to within a step.
    n = _run(clock, ft, [30.0, 1.0])
    assert n == 71
    assert clock.elapsed() == pytest.approx(100.0)
    assert clock.step_time == pytest.approx(1.0)


def test_overhead_counts_but_is_not_a_step():
    ft = FakeTime()
    clock = Clock(Budget("time", 100.0), time_fn=ft)
    clock.start()
    for _ in range(3):
        ft.t += 1.0
        clock.step_done()
    with clock.overhead():
        ft.t += 20.0  # a slow evaluation
    ft.t += 1.0
    assert clock.step_done() == pytest.approx(1.0)
    assert clock.step_time == pytest.approx(1.0)
    assert clock.elapsed() == pytest.approx(24.0)


def test_paused_time_is_excluded():
    ft = FakeTime()
    clock = Clock(Budget("time", 100.0), time_fn=ft)
    clock.start()
    ft.t += 10
    with clock.paused():
        ft.t += 50
        with clock.paused():
            ft.t += 5
        ft.t += 5
        assert clock.elapsed() == pytest.approx(10.0)
    ft.t += 10
    assert clock.elapsed() == pytest.approx(20.0)
    assert clock.step_done() == pytest.approx(20.0)


def test_resume_continues_elapsed():
    ft = FakeTime()
    clock = Clock(Budget("time", 100.0), time_fn=ft)
    clock.start()
    for _ in range(40):
        ft.t += 1.0
        clock.step_done()
    state = clock.state_dict()
    assert state["elapsed"] == pytest.approx(40.0)
    ft.t += 1234.0  # killed, restarted much later: the gap is not counted

    ft2 = FakeTime(5.0)
    resumed = Clock(Budget("time", 100.0), time_fn=ft2)
    resumed.load_state_dict(state)
    assert resumed.progress() == pytest.approx(0.4)
    assert resumed.step_time == pytest.approx(1.0)
    n = _run(resumed, ft2, [10.0, 1.0])  # the warm-up after resume is slow again
    assert resumed.step_time == pytest.approx(1.0)
    assert n == 51
    assert resumed.elapsed() == pytest.approx(100.0)


def test_bad_reserve():
    with pytest.raises(UserError):
        Clock(Budget("time", 10.0), reserve=1.0)


def test_measured_tail_replaces_a_too_small_reserve():
    """A final evaluation + save measured at 2.5 s is kept free even though 5% of 10 s is 0.5 s."""
    ft = FakeTime()
    clock = Clock(Budget("time", 10.0), reserve=0.05, time_fn=ft)
    assert clock.usable_seconds == pytest.approx(9.5)
    clock.expect_tail(2.5)
    assert clock.usable_seconds == pytest.approx(7.5)
    assert _run(clock, ft, [1.0]) == 7
    clock.expect_tail(0.1)  # smaller than the reserve: the reserve wins
    assert clock.usable_seconds == pytest.approx(9.5)
    clock.expect_tail(1e9)  # never more than half the budget
    assert clock.usable_seconds == pytest.approx(5.0)


def test_tail_survives_resume():
    ft = FakeTime()
    clock = Clock(Budget("time", 10.0), time_fn=ft)
    clock.expect_tail(3.0)
    resumed = Clock(Budget("time", 10.0), time_fn=ft)
    resumed.load_state_dict(clock.state_dict())
    assert resumed.usable_seconds == pytest.approx(7.0)


def test_default_reserve_keeps_the_measured_tail_not_a_share_of_the_budget():
    """A 20-minute run whose final evaluation and save measure 3 s trains until about 4 s before the
    deadline: a fixed 3% share would have left 36 s of the budget unused (0.97 of it trained)."""
    clock = Clock(Budget("time", 1200.0), reserve=BudgetConfig().reserve, time_fn=FakeTime())
    clock.expect_tail(1.25 * 3.0)
    assert clock.usable_seconds >= 1190.0
    clock.expect_tail(1.25 * 40.0)  # a big model's save: the measured tail still wins
    assert clock.usable_seconds == pytest.approx(1150.0)
