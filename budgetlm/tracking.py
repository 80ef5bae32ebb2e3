"""What a run records as it goes: a JSONL metrics log (also sent to the chosen trackers), and its environment.

The JSONL file is the source of truth (plots, the report and `budgetlm runs` are drawn from it);
TensorBoard, W&B and MLflow (`budgetlm.trackers`) are conveniences, skipped with a note when their
library is not installed.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from budgetlm import __version__
from budgetlm.files import write_text_atomic

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Append-only metrics: one JSON object per line, `kind` = train | eval | event; numeric values
    also go to the trackers named in `trackers` (`budgetlm.trackers`: TensorBoard, W&B, MLflow)."""

    def __init__(self, run_dir: Path, enabled: bool = True, trackers: str = "tensorboard", settings: dict | None = None):
        from budgetlm.trackers import open_trackers, parse_trackers

        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        names = parse_trackers(trackers)  # a typo is an error on every rank, before any work
        self._trackers = open_trackers(names, Path(run_dir), settings or {}) if enabled else []

    def log(self, kind: str, step: int, **values) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "wall": round(time.time(), 3), **values}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers:
            for tracker in self._trackers:
                tracker.scalars(kind, numbers, step)

    def text(self, tag: str, text: str, step: int) -> None:
        """A text for the trackers (metrics.jsonl keeps numbers and events): samples, the plan."""
        for tracker in self._trackers:
            tracker.text(tag, text, step)

    def finish(self, final: dict) -> None:
        """The run's final numbers, beside its settings in the trackers' summaries."""
        numbers = {k: v for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self._trackers:
            tracker.finish(numbers)

    def truncate_after(self, step: int) -> None:
        """Drop records past `step`: a resumed run re-does those steps from its checkpoint."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def close(self) -> None:
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []


def read_metrics(path: Path) -> list[dict]:
    """All records of a metrics log; a torn last line (killed mid-write) is ignored."""
    records = []
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


_COMMAND: str | None = None  # set by the command line and the Python API as they start a verb


def set_command(text: str) -> None:
    """Record what this process was asked to do, for env.json and the report."""
    global _COMMAND
    _COMMAND = text


def command_line() -> str:
    """The command a user would retype: `budgetlm pretrain ...` from the program, `budgetlm.pretrain(...)`
    from the Python API, else this process's own arguments."""
    return _COMMAND or shlex.join(sys.argv)


def environment(device: str | None = None) -> dict:
    """Code version and environment, written at the start of every run (modded-nanogpt habit)."""
    import numpy
    import tokenizers
    import torch

    from budgetlm.hardware import cpu_name

    env = {
        "budgetlm": __version__,
        "git": git_revision(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "tokenizers": tokenizers.__version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "command": command_line(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device,
    }
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_count"] = torch.cuda.device_count()
    return env
