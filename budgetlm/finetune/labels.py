"""What a fine-tuned directory's head predicts (`LabelSpace`) and the names of its files.

Shared by `train` (which writes them) and `predict` (which reads them), so neither imports the other.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
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

    def check_known(self, examples: list[Example], where: str) -> Counter:
        """Labels of `examples` the head cannot predict. For classification that is refused (most often a
        wrong label column or another label set); for tagging the counts come back (a rare tag is common)."""
        if self.labels is None:
            return Counter()
        known = set(self.labels)
        flat = (t for e in examples for t in (e.label if self.task == "tag" else [e.label]))
        unseen = Counter(t for t in flat if t not in known)
        if unseen and self.task != "tag":
            names = sorted(unseen, key=_natural_key)
            raise UserError(f"{where} has label(s) not seen in training: {', '.join(map(repr, names[:5]))} "
                            f"(training labels: {len(known)}); check the label column, or add examples of them to the training file")  # fmt: skip
        return unseen


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
