"""The clock: what a budget is, how far along a run is, and when to stop.

Everything that changes over a run (learning rate, batch ramp, evaluation times, stopping) is a
function of *budget progress* in [0, 1], not of a step count fixed in advance, so the schedule
ends exactly at the deadline whatever the throughput turns out to be (Geiping & Goldstein 2022,
"Cramming", section 3).

What the clock counts (wall-clock budgets):
- It starts when the loop calls `Clock.start()`, just before the first training step. Model
  construction, data set-up and process-group start-up before that are not counted.
- From then on it counts *everything*: data loading, the compile warm-up of the first steps,
  periodic evaluation and checkpointing. The user waits for all of it, so a "1h" run finishes
  about an hour after training starts.
- Time inside `with clock.paused():` is not counted. The training loop does not use it for
  evaluation; it exists for callers that deliberately exclude work (a benchmark harness,
  modded-nanogpt-style untimed validation).
- The measured cost of the final evaluation and save (`expect_tail`: the loop times a save at step 0
  and every evaluation) is kept back for them, or `reserve` (a small fraction of the limit, for
  the jitter of the last steps) when that is more: progress reaches 1.0 at
  `limit - max(limit * reserve, tail)` of counted time. The tail, not a fixed share, is what
  matters: a 20-minute run's final evaluation and save take about 3 seconds, where a 3% share
  would idle 36.
- On resume, counting continues from the elapsed time stored in the last checkpoint. Time
  between that checkpoint and the kill is lost: it is neither counted nor trained on again
  (the loop re-trains those steps from the checkpoint, on the clock).

Stopping ahead of time: a wall-clock run stops when the *next* step would end past the usable
budget, predicted from an exponential moving average of step time, so the run ends within one
step of its budget instead of one step after it. Time spent inside `with clock.overhead():`
(evaluation, checkpointing) counts toward the budget but is kept out of the step-time average,
and the first step after `start()` (compile warm-up) is kept out too unless it is the only one.

Token and step budgets are exact counts: `steps:N` stops after N optimizer steps, `tokens:N`
after the first step that brings the token count to N or more.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from budgetlm.errors import UserError

KINDS = ("time", "tokens", "steps")

_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_PART_RE = re.compile(rf"({_NUMBER})\s*([smhd])")
_TIME_RE = re.compile(rf"^{_NUMBER}$|^(?:{_NUMBER}\s*[smhd]\s*)+$")
_COUNT_RE = re.compile(rf"^(tokens|steps)\s*:\s*({_NUMBER})$")


@dataclass(frozen=True)
class Budget:
    """A limit on a run: `kind` is time (seconds), tokens or steps; `limit` is how many."""

    kind: str
    limit: float

    def __str__(self) -> str:
        if self.kind == "time":
            return format_seconds(self.limit)
        return f"{self.kind}:{int(self.limit)}"


def format_seconds(seconds: float) -> str:
    """A short human form: 90 -> '1m30s', 86400 -> '24h'."""
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    parts = [f"{h}h" if h else "", f"{m}m" if m else "", f"{s}s" if s or not (h or m) else ""]
    return "".join(parts)


def parse_budget(text: str) -> Budget:
    """Parse `24h`, `90m`, `300s`, `1.5h`, `2d`, `1h30m`, plain seconds `300`, `tokens:2e9` or `steps:5000`."""
    raw = str(text).strip().lower()
    hint = "use e.g. 24h, 90m, 300s, 2d, tokens:2e9 or steps:5000"
    m = _COUNT_RE.match(raw)
    if m:
        kind, value = m.group(1), float(m.group(2))
        if not math.isfinite(value) or value < 1:
            raise UserError(f"budget '{text}': {kind} must be at least 1")
        if not value.is_integer():
            raise UserError(f"budget '{text}': {kind} must be a whole number")
        return Budget(kind, value)
    m = _TIME_RE.match(raw)
    if not m:
        raise UserError(f"cannot read budget '{text}': {hint}")
    parts = _PART_RE.findall(raw) or [(raw, "s")]
    seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise UserError(f"budget '{text}' must be a positive duration: {hint}")
    return Budget("time", seconds)


class Clock:
    """Tracks counted time and turns (time, tokens, steps) into budget progress.

    `time_fn` is injectable so tests can drive a fake clock. See the module docstring for what
    is counted. Not thread-safe; one clock per process (every rank runs its own and the loop
    agrees on stopping with `all_reduce_max`, since ranks' clocks drift slightly).
    """

    def __init__(
        self, budget: Budget, reserve: float = 0.0, time_fn: Callable[[], float] = time.monotonic, ema: float = 0.9, max_tokens: int = 0
    ):
        if budget.kind not in KINDS:
            raise ValueError(f"unknown budget kind {budget.kind!r}")
        if not 0.0 <= reserve < 1.0:
            raise UserError(f"budget.reserve must be in [0, 1), got {reserve}")
        if max_tokens < 0:
            raise UserError(f"budget.max_tokens must be 0 (none) or positive, got {max_tokens}")
        self.budget = budget
        # a wall-clock budget that also ends when the training text is used up (the plan's data limit):
        # progress is the further along of the two, so the schedule ends at whichever comes first
        self.max_tokens = max_tokens if budget.kind == "time" else 0
        # The reserve only applies to wall-clock budgets: token and step counts have no
        # final-evaluation cost to set aside.
        self.reserve = reserve if budget.kind == "time" else 0.0
        self._time = time_fn
        self._ema_decay = ema
        self._banked = 0.0  # counted seconds up to _since (or in total, while stopped/paused)
        self._since: float | None = None  # start of the current counted stretch; None = not counting
        self._started = False
        self._pause_depth = 0
        self._step_mark: float | None = None  # counted time at the end of the previous step
        self._overhead = 0.0  # counted time inside overhead() since the previous step
        self._overhead_depth = 0
        self._overhead_since = 0.0
        self.step_time: float | None = None  # EMA of seconds per optimizer step
        self._steps_seen = 0  # steps measured since start() (the first one is warm-up)
        self._provisional = False  # step_time holds only the warm-up step's duration
        self.tail_seconds = 0.0  # measured cost of the final evaluation and save (expect_tail)

    # -- counting ---------------------------------------------------------------------------

    def start(self) -> None:
        """Begin counting (call just before the first training step). Idempotent."""
        if self._started:
            return
        self._started = True
        if self._pause_depth == 0:
            self._since = self._time()
        self._step_mark = self.elapsed()

    def elapsed(self) -> float:
        """Counted seconds so far, including those restored from a checkpoint."""
        if self._since is None:
            return self._banked
        return self._banked + max(0.0, self._time() - self._since)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside is not counted toward the budget at all (nests)."""
        if self._pause_depth == 0 and self._since is not None:
            self._banked = self.elapsed()
            self._since = None
        self._pause_depth += 1
        try:
            yield
        finally:
            self._pause_depth -= 1
            if self._pause_depth == 0 and self._started:
                self._since = self._time()

    @contextmanager
    def overhead(self) -> Iterator[None]:
        """Time inside counts toward the budget but not toward the step-time estimate (nests).

        Wrap periodic evaluation and checkpointing in it so a slow evaluation does not make
        the clock believe steps got slower and stop the run early.
        """
        if self._overhead_depth == 0:
            self._overhead_since = self.elapsed()
        self._overhead_depth += 1
        try:
            yield
        finally:
            self._overhead_depth -= 1
            if self._overhead_depth == 0:
                self._overhead += self.elapsed() - self._overhead_since

    def step_done(self) -> float:
        """Record the end of one optimizer step; returns its duration in counted seconds.

        A step's duration is counted time since the previous `step_done()` (or `start()`),
        minus time spent in `overhead()`. It feeds the EMA used to predict the next step.
        """
        if not self._started:
            self.start()
        now = self.elapsed()
        dt = max(0.0, now - self._step_mark - self._overhead)
        self._step_mark = now
        self._overhead = 0.0
        self._steps_seen += 1
        if self._steps_seen == 1:
            # The first step after start() includes compile warm-up and cache fills: it seeds
            # the estimate only when there is none (a fresh run), and only until the next step.
            if self.step_time is None:
                self.step_time = dt
                self._provisional = True
        elif self._provisional:
            self.step_time = dt
            self._provisional = False
        else:
            self.step_time = self._ema_decay * self.step_time + (1.0 - self._ema_decay) * dt
        return dt

    # -- progress -------------------------------------------------------------------------

    @property
    def usable_seconds(self) -> float:
        """Seconds of training a wall-clock budget allows: the limit minus what the run must
        keep for its end, the larger of `reserve` and the measured `tail_seconds`."""
        return self.budget.limit - max(self.budget.limit * self.reserve, self.tail_seconds)

    def expect_tail(self, seconds: float) -> None:
        """Set the measured cost of what follows the last step (final evaluation and save).

        A fixed reserve is either wasteful on long budgets or too small on short ones; the loop
        measures an evaluation and a checkpoint save and tells the clock, so the run ends on
        time (it can never claim more than half the budget).
        """
        if self.budget.kind == "time":
            self.tail_seconds = min(max(0.0, float(seconds)), 0.5 * self.budget.limit)

    def progress(self, tokens: int = 0, steps: int = 0) -> float:
        """Budget progress in [0, 1]: elapsed/usable time (or tokens/max_tokens, if further), tokens/limit or steps/limit."""
        if self.budget.kind == "time":
            value = self.elapsed() / self.usable_seconds
            if self.max_tokens:
                value = max(value, tokens / self.max_tokens)
        elif self.budget.kind == "tokens":
            value = tokens / self.budget.limit
        else:
            value = steps / self.budget.limit
        return min(1.0, max(0.0, value))

    def should_stop(self, tokens: int = 0, steps: int = 0) -> bool:
        """True when no further optimizer step should start.

        Wall clock: when the next step, at the estimated step time, would end past the usable
        budget (or it is already past), or `max_tokens` have been trained. Tokens/steps: when the
        count has reached the limit.
        """
        if self.budget.kind == "tokens":
            return tokens >= self.budget.limit
        if self.budget.kind == "steps":
            return steps >= self.budget.limit
        if self.max_tokens and tokens >= self.max_tokens:
            return True
        predicted = self.elapsed() + (self.step_time or 0.0)
        return predicted > self.usable_seconds or self.elapsed() >= self.usable_seconds

    def remaining(self) -> float:
        """Usable counted seconds left of a wall-clock budget (inf for token/step budgets)."""
        if self.budget.kind != "time":
            return math.inf
        return max(0.0, self.usable_seconds - self.elapsed())

    # -- resume ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """JSON-ready state for a checkpoint: counted seconds so far and the step-time estimate."""
        return {
            "elapsed": self.elapsed(),
            "step_time": self.step_time,
            "tail": self.tail_seconds,
            "budget": str(self.budget),
            "reserve": self.reserve,
            "max_tokens": self.max_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint: counted time resumes from the stored elapsed seconds.

        Call it before `start()`. The budget itself comes from the constructor (a resumed run
        may be given a longer one).
        The stored step-time estimate is kept, and the first step after resuming is treated as
        warm-up again.
        """
        self._banked = float(state["elapsed"])
        if self._since is not None:
            self._since = self._time()
        self._step_mark = self._banked
        self._overhead = 0.0
        self.step_time = state.get("step_time")
        self.tail_seconds = float(state.get("tail", 0.0))
        self._steps_seen = 0
        self._provisional = False


def hms(seconds: float) -> str:
    """`H:MM:SS` for progress lines."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
