"""What a fine-tuned directory's head predicts (`LabelSpace`) and the names of its files.

Shared by `train` (which writes them) and `predict` (which reads them), so neither imports the other.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from budgetlm.errors import UserError
from budgetlm.finetune.tasks import Example

FINETUNE_FILE = "finetune.json"
WEIGHTS_FILE = "head_and_method.safetensors"


@dataclass
class LabelSpace:
    """What the head predicts: class/tag names (by index), or the regression target's scale."""

    task: str
    labels: list[str] | None = None
    stats: dict | None = None  # regress: mean, std of the training targets
    fallback: object = None  # the majority label: for words cut off by truncation

    @classmethod
    def from_examples(cls, task: str, examples: list[Example]) -> LabelSpace:
        if task == "regress":
            ys = [float(e.label) for e in examples]
            mean = sum(ys) / len(ys)
            std = math.sqrt(sum((y - mean) ** 2 for y in ys) / len(ys)) or 1.0
            return cls(task, None, {"mean": mean, "std": std}, mean)
        flat = [t for e in examples for t in e.label] if task == "tag" else [e.label for e in examples]
        counts: dict[str, int] = {}
        for t in flat:
            counts[t] = counts.get(t, 0) + 1
        labels = sorted(counts, key=_natural_key)
        if task != "tag" and len(labels) < 2:
            raise UserError(f"the training data has a single label ({labels[0]!r}); classification needs at least two")
        return cls(task, labels, None, max(counts, key=counts.get))

    @property
    def index(self) -> dict[str, int] | None:
        return {name: i for i, name in enumerate(self.labels)} if self.labels is not None else None

    def num_labels(self) -> int:
        return len(self.labels) if self.labels is not None else 1

    def check_known(self, examples: list[Example], where: str) -> None:
        if self.labels is None:
            return
        known = set(self.labels)
        seen = {t for e in examples for t in (e.label if self.task == "tag" else [e.label])}
        unseen = sorted(seen - known, key=_natural_key)
        if unseen:
            raise UserError(f"{where} has label(s) not seen in training: {', '.join(map(repr, unseen[:5]))} (training labels: {len(known)})")


def _natural_key(label: str):
    try:
        return (0, float(label), "")
    except ValueError:
        return (1, 0.0, label)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
