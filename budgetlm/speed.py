"""Measured training speed of a model configuration on this device, cached per machine.

The budget-derived defaults need to know how many tokens a candidate model would see in the
budget. FLOP counts alone mislead at the sizes a short budget calls for: a 0.5M-parameter
model on a CPU spends most of its step in per-operation overhead, not in matrix units, so a
model half the size is far less than twice as fast. So we time it: a few real optimizer steps
(forward, backward, clipping, optimizer) of the candidate at its micro-batch, on random tokens,
after two warm-up steps, keeping the median of three.

Other work on the machine distorts such a timing, and unevenly: a candidate timed while another
program held the core looks slower than the next larger one, and the plan picks the wrong model
(seen: a demo started beside the test suite chose 3 x 192 over 2 x 128 and lost 0.3 bits per byte).
On Linux the kernel counts, per thread, the time it was ready to run but waited for a CPU
(`/proc/self/task/*/schedstat`); a step whose threads waited is timed again, a few times at most.
When the machine stays busy, the result is flagged and not cached, so a later run on an idle
machine times it afresh; on a CPU each step's wait is also taken off its time (a GPU's step is
paced by the GPU, so its time is kept).

Results are cached in `$BUDGETLM_CACHE/speed.json` (default `~/.cache/budgetlm`), keyed by the
device (CPU model and thread count, or GPU name), the torch and budgetlm versions and the
configuration, so the second run of a budget on the same machine plans in milliseconds.

A timing is a snapshot of a few steps, and a whole run can go slower or faster than it: a loop
does more per step than the timed step (data, logging, the clock), a compile gains more or less
than the plan assumes, and some machines drift. On a shared host whose other tenants come and
go, four back-to-back timings of one model gave 36.5K to 59.2K tokens/s, and a 60-second run
planned from a fast moment's timing made 0.78x the tokens planned. So each run that planned its
own model records what it sustained over what was timed for it (`record_run_speed`), and a plan
on the same device expects the timed speed of its chosen model times the median of the last
RUN_RATIOS_KEPT such ratios of that model, or of all models timed there when that one has none
yet (`calibration`). The choice between candidates stays with the timings, which the plan's
rules were fit to rank.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import torch

from budgetlm import __version__
from budgetlm.config import ModelConfig, TrainConfig
from budgetlm.files import write_json
from budgetlm.hardware import cpu_name

CACHE_FILE = "speed.json"
METHOD = 8  # part of the cache key: a change in how steps are timed, or in what a step costs, invalidates old timings
WARMUP_STEPS = 2  # oneDNN creates its kernels (and autocast its weight copies) on the first steps
TIMED_STEPS = 3  # the median is kept: what a long run sustains, noise included
MAX_TIMED_STEPS = 9  # steps disturbed by other work are retimed up to this many steps in all
CLEAN_WAIT = 0.05  # a step is undisturbed when its threads waited for a CPU less than this share of its time
PEAK_N = 1024  # the matmul whose FLOP/s stands for a CPU's peak (MFU's denominator)
PEAK_BURSTS = 5  # timed bursts of that matmul; the fastest undisturbed one is kept
PEAK_BURST_S = 0.1
RUN_RATIOS_KEPT = 9  # per timed model, device and process count: the last runs' sustained over timed speed
RUN_MIN_SECONDS, RUN_MIN_STEPS = 10.0, 20  # shorter runs say little about what a run sustains
CALIBRATION_RANGE = (0.25, 4.0)  # a ratio outside this is a broken measurement, not a slow machine


@dataclasses.dataclass
class Timing:
    seconds: float  # one optimizer step (disturbed on a CPU: the time its threads waited for one taken off)
    waited: float  # the median step's share of its threads' time spent waiting for a CPU (0 = an idle machine)
    clean: bool  # enough undisturbed steps were timed: the result is cached


def cache_path() -> Path:
    from budgetlm.data.fetch import cache_dir

    return cache_dir() / CACHE_FILE


def device_name(device: torch.device) -> str:
    """What the speed depends on: the GPU's name, or the CPU's model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def _hash(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def timing_key(model_cfg: ModelConfig, micro: int, *, precision: str, optimizer: str, device: torch.device) -> str:
    """What a timing of this step is cached under (and its runs' speed ratios recorded by)."""
    return _hash(
        {
            "device": device_name(device),
            "torch": torch.__version__,
            "budgetlm": __version__,
            "method": METHOD,
            "model": dataclasses.asdict(model_cfg),
            "micro": micro,
            "precision": precision,
            "optimizer": optimizer,
        }
    )


def _peak_key(device: torch.device, dtype: torch.dtype) -> str:
    return _hash({"device": device_name(device), "torch": torch.__version__, "peak": str(dtype), "n": PEAK_N})


def _calibration_key(device: torch.device, processes: int) -> str:
    return _hash({"device": device_name(device), "torch": torch.__version__, "budgetlm": __version__, "method": METHOD, "processes": processes})


def _read_cache() -> dict:
    try:
        data = json.loads(cache_path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _cached(key: str) -> float | None:
    value = _read_cache().get(key)
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _write_cache(key: str, value: float | dict) -> None:
    data = _read_cache()
    data[key] = value
    try:
        cache_path().parent.mkdir(parents=True, exist_ok=True)
        write_json(cache_path(), data)
    except OSError:
        pass  # a read-only home only costs the next run a re-measurement


def step_seconds(
    model_cfg: ModelConfig,
    micro: int,
    *,
    precision: str,
    optimizer: str,
    device: torch.device,
    use_cache: bool = True,
) -> Timing:
    """The time of one optimizer step of `model_cfg` on `micro` sequences (no accumulation).

    Raises torch.OutOfMemoryError when it does not fit (the caller tries something smaller)."""
    key = timing_key(model_cfg, micro, precision=precision, optimizer=optimizer, device=device)
    if use_cache and (cached := _cached(key)) is not None:
        return Timing(cached, 0.0, True)
    timing = _measure(model_cfg, micro, precision, optimizer, device)
    if use_cache and timing.clean:
        _write_cache(key, timing.seconds)
    return timing


def matmul_peak(device: torch.device, dtype: torch.dtype, use_cache: bool = True) -> tuple[float, bool]:
    """(FLOP/s, undisturbed) of a PEAK_N-cubed matmul in `dtype` on this CPU: the practical peak that
    MFU divides by. The fastest of a few short bursts, each timed like a step: a burst whose threads
    waited for a CPU does not count where enough others did not, else its wait is taken off. Measured
    plainly beside another program, the peak came out low enough for a plan to print an MFU of 140%
    from an undisturbed (cached) step time. Cached per machine when undisturbed, like step timings."""
    key = _peak_key(device, dtype)
    if use_cache and (cached := _cached(key)) is not None:
        return cached, True
    a = torch.randn(PEAK_N, PEAK_N, device=device, dtype=dtype)
    b = torch.randn(PEAK_N, PEAK_N, device=device, dtype=dtype)
    for _ in range(2):  # warm up kernels and thread pools
        a @ b
    threads = torch.get_num_threads()
    bursts: list[tuple[int, float, float]] = []  # (matmuls, wall seconds, seconds waited for a CPU)
    for _ in range(3 * PEAK_BURSTS):
        before, start, iters = cpu_wait_seconds(), time.perf_counter(), 0
        while True:
            a @ b
            iters += 1
            wall = time.perf_counter() - start
            if wall >= PEAK_BURST_S and iters >= 2:
                break
        bursts.append((iters, wall, waited_between(before, cpu_wait_seconds())))
        clean = [(n, w) for n, w, waited in bursts if wait_share(w, waited, threads) < CLEAN_WAIT]
        if len(clean) >= PEAK_BURSTS:
            break
    flops = 2 * PEAK_N**3
    if len(clean) >= PEAK_BURSTS:
        peak = max(flops * n / w for n, w in clean)
        if use_cache:
            _write_cache(key, peak)
        return peak, True
    return max(flops * n / without_wait(w, waited, threads) for n, w, waited in bursts), False


@dataclasses.dataclass
class Calibration:
    factor: float = 1.0  # expect the timed speed times this
    runs: int = 0  # the runs it is the median ratio of (0: none yet, factor 1)
    same_model: bool = False  # runs of the model asked about, not of others on this device


def _ratios(device: torch.device, processes: int) -> dict[str, list[float]]:
    kept = _read_cache().get(_calibration_key(device, processes))
    lo, hi = CALIBRATION_RANGE
    if not isinstance(kept, dict):
        return {}
    return {k: [float(r) for r in v if isinstance(r, (int, float)) and lo <= r <= hi] for k, v in kept.items() if isinstance(v, list)}


def calibration(device: torch.device, key: str, processes: int = 1) -> Calibration:
    """How fast runs of `processes` processes on this device went against their timings: the median
    ratio of the model timed under `key`, else of every model timed here; factor 1 before any run."""
    ratios = _ratios(device, processes)
    own = ratios.get(key, [])
    pooled = own or [r for rs in ratios.values() for r in rs]
    return Calibration(statistics.median(pooled), len(pooled), bool(own)) if pooled else Calibration()


def record_run_speed(device: torch.device, processes: int, key: str, sustained: float, timed: float) -> float | None:
    """Record a finished run's sustained tokens/s over the uncalibrated tokens/s its plan timed for its
    model (`key`: `timing_key`); returns the ratio, or None where it is outside CALIBRATION_RANGE."""
    ratio = sustained / timed if timed > 0 else 0.0
    lo, hi = CALIBRATION_RANGE
    if not lo <= ratio <= hi:
        return None
    ratios = _ratios(device, processes)
    ratios[key] = [*ratios.get(key, []), round(ratio, 4)][-RUN_RATIOS_KEPT:]
    _write_cache(_calibration_key(device, processes), ratios)
    return ratio


def cpu_wait_seconds() -> dict[str, float] | None:
    """Seconds each of this process's threads has spent ready to run but waiting for a CPU, by
    thread id (Linux's schedstat); None where the kernel does not say (no /proc, schedstat files
    missing, or sched_info compiled out, which reports zero time on CPU)."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    waits, ran = {}, 0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat", encoding="ascii") as f:
                on_cpu, waited = (int(x) for x in f.read().split()[:2])
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        except (OSError, ValueError):
            return None
        waits[tid], ran = waited / 1e9, ran + on_cpu
    return waits if ran else None


def waited_between(before: dict[str, float] | None, after: dict[str, float] | None) -> float:
    """Seconds waited for a CPU between two `cpu_wait_seconds` readings, by the threads in both."""
    if before is None or after is None:
        return 0.0
    return sum(max(0.0, after[tid] - before[tid]) for tid in before.keys() & after.keys())


def wait_share(wall: float, waited: float, threads: int) -> float:
    """The share of `threads` threads' time over `wall` seconds spent waiting for a CPU."""
    return waited / (wall * threads)


def without_wait(wall: float, waited: float, threads: int) -> float:
    """`wall` with the wait spread over the threads taken off: exact for one thread, an estimate for several."""
    return max(wall - waited / threads, 0.1 * wall)


def summarise(steps: list[tuple[float, float]], threads: int, correct: bool = True) -> Timing:
    """One timing from timed steps' (wall seconds, seconds their threads waited for a CPU): the
    median undisturbed step where there are enough. Otherwise, with `correct`, the median step with
    its wait, spread over the threads, taken off: exact for one thread, an estimate for several
    (a worker's wait delays the step only where the others have to wait for it); without, the
    median step as it was (a GPU's step is paced by the GPU, so a host thread's wait costs it little)."""
    shares = [wait_share(wall, wait, threads) for wall, wait in steps]
    clean = [wall for (wall, _), share in zip(steps, shares) if share < CLEAN_WAIT]
    if len(clean) >= TIMED_STEPS:
        return Timing(statistics.median(clean), statistics.median(shares), True)
    corrected = [without_wait(wall, wait, threads) if correct else wall for wall, wait in steps]
    return Timing(statistics.median(corrected), statistics.median(shares), False)


def _measure(model_cfg: ModelConfig, micro: int, precision: str, optimizer: str, device: torch.device) -> Timing:
    from budgetlm.model import Transformer, compute_loss
    from budgetlm.optim import build_optimizer

    rng_state = torch.get_rng_state()  # planning must not change the run's seeded initialisation
    try:
        model = Transformer.build(model_cfg, device=device)
        opt = build_optimizer(model, TrainConfig(optimizer=optimizer, precision=precision), device.type)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        x = torch.randint(0, model_cfg.vocab_size, (micro, model_cfg.seq_len + 1), device=device)
        threads = torch.get_num_threads() if device.type == "cpu" else 1
        steps: list[tuple[float, float]] = []  # (wall seconds, seconds waited for a CPU) of each timed step
        for i in range(WARMUP_STEPS + MAX_TIMED_STEPS):
            waited = cpu_wait_seconds()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = compute_loss(model, x[:, :-1], x[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()  # the loop reads the loss every step too
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall = time.perf_counter() - start
            after = cpu_wait_seconds()
            if i < WARMUP_STEPS:
                continue
            steps.append((wall, waited_between(waited, after)))
            if summarise(steps, threads).clean:
                break
        return summarise(steps, threads, correct=device.type == "cpu")
    finally:
        torch.set_rng_state(rng_state)
        if device.type == "cuda":
            torch.cuda.empty_cache()
