"""The on-disk format of prepared data: token shards and the manifest.

A prepared directory holds ``tokenizer.json``, shards ``train-00000.bin`` ... and
``val-00000.bin`` ... (flat little-endian ``uint16``, or ``uint32`` when the vocabulary does not
fit, each document followed by the separator token) and ``manifest.json``:

    {"format": "budgetlm-data/1", "settings": {...}, "settings_hash": "...",
     "tokenizer": {"file", "kind", "sha256", "vocab_size"}, "dtype", "separator_id",
     "splits": {"train"|"val": {"documents", "tokens", "bytes", "shards": [{"file", "tokens", "sha256"}]}},
     "skipped": {...}, "inputs": [...], "summary": {...}}

``bytes`` counts the UTF-8 bytes of the normalised documents (separators excluded) so that
bits per byte can be computed from a per-token loss. Shards are written under ``.tmp`` names and
renamed when full; the manifest is written last and atomically, so a directory without
``manifest.json`` is never a finished data set, whatever else it holds.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from budgetlm.files import write_json

FORMAT = "budgetlm-data/1"
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
WRITE_BUFFER_TOKENS = 1 << 20  # tokens gathered in memory before a write (4 MB at uint32)


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def is_own_file(name: str) -> bool:
    """Files that `data prepare` writes (and may therefore delete when rebuilding)."""
    if name in (MANIFEST, TOKENIZER_FILE) or name.endswith(".tmp"):
        return True
    return any(name.startswith(s + "-") and name.endswith(".bin") for s in SPLITS)


class ShardWriter:
    """Append documents' tokens to numbered shards of one split, with sha256 per shard."""

    def __init__(self, out_dir: Path, split: str, dtype: str, separator_id: int, shard_tokens: int):
        self.out_dir = Path(out_dir)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.separator = np.array([separator_id], dtype=self.dtype)
        self.shard_tokens = max(1, int(shard_tokens))
        self.shards: list[dict] = []
        self.documents = 0
        self.tokens = 0
        self.bytes = 0
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self._file = None
        self._hash = None
        self._in_shard = 0

    def add(self, ids: np.ndarray, n_bytes: int) -> None:
        """One document: its token ids, then the separator."""
        self._pending.append(ids.astype(self.dtype, copy=False))
        self._pending.append(self.separator)
        self._pending_tokens += len(ids) + 1
        self.documents += 1
        self.tokens += len(ids) + 1
        self.bytes += n_bytes
        if self._pending_tokens >= WRITE_BUFFER_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        data = np.concatenate(self._pending)
        self._pending, self._pending_tokens = [], 0
        while len(data):
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._in_shard
            part, data = data[:room], data[room:]
            buf = part.tobytes()
            self._file.write(buf)
            self._hash.update(buf)
            self._in_shard += len(part)
            if self._in_shard >= self.shard_tokens:
                self._close_shard()

    def _open(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._file = open(self.out_dir / (name + ".tmp"), "wb")  # noqa: SIM115 (closed in _close_shard)
        self._hash = hashlib.sha256()
        self._in_shard = 0

    def _close_shard(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.out_dir / (name + ".tmp"), self.out_dir / name)
        self.shards.append({"file": name, "tokens": self._in_shard, "sha256": self._hash.hexdigest()})
        self._file = None

    def close(self) -> dict:
        """Finish the last shard; return this split's manifest entry."""
        self._flush()
        if self._file is not None:
            self._close_shard()
        return {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes, "shards": self.shards}

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# settings added after the format was fixed: at their defaults they leave the hash as it was, so
# data prepared before them stays up to date
LATER_SETTINGS = {"eos_token": "", "min_val_tokens": 65536}


def settings_hash(settings: dict, tokenizer_file_sha: str = "") -> str:
    """Identity of the settings that shape the output (not `workers`, which does not)."""
    relevant = {k: v for k, v in settings.items() if k != "workers" and not (k in LATER_SETTINGS and v == LATER_SETTINGS[k])}
    blob = json.dumps({"format": FORMAT, "settings": relevant, "tokenizer_file_sha256": tokenizer_file_sha}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """Atomically: the manifest is the marker of a finished directory."""
    write_json(Path(out_dir) / MANIFEST, manifest, fsync=True)


def read_manifest(out_dir: Path) -> dict | None:
    """The manifest of `out_dir`, or None when there is none or it is not ours."""
    try:
        data = json.loads((Path(out_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
