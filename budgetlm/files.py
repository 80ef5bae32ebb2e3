"""Atomic small-file writes: a reader (or a run killed mid-write) sees the old file or the new one,
never half of one. Written to a sibling `NAME.tmp`, then renamed over the target."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text_atomic(path: str | Path, text: str, fsync: bool = False) -> Path:
    """fsync=True also forces the bytes to disk before the rename, for a file whose presence
    marks finished work (a crash right after must not leave an empty file under the final name)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    tmp.replace(path)
    return path


def write_json(path: str | Path, obj, fsync: bool = False) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n", fsync=fsync)
