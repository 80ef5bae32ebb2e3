"""Atomic small-file writes: a reader (or a run killed mid-write) sees the old file or the new one,
never half of one. Written to a sibling `NAME.tmp`, then renamed over the target."""

from __future__ import annotations

import json
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def write_json(path: str | Path, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
