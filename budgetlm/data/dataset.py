"""`PreparedData`: a prepared directory, validated, with its tokenizer and token arrays.

Opening checks what is cheap (the manifest's format, every shard present with exactly the
size the manifest promises, so a truncated copy is caught at once); `verify()` also hashes
every shard against its sha256. Tokens are read through one `np.memmap` per shard, so a
data set larger than memory costs nothing to open.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from budgetlm.data import shards
from budgetlm.data.tokenizer import Tokenizer
from budgetlm.errors import UserError


class TokenArray:
    """The concatenated tokens of one split's shards, indexable across shard boundaries."""

    def __init__(self, paths: list[Path], counts: list[int], dtype: str):
        self._maps = [np.memmap(p, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype=dtype) for p, n in zip(paths, counts)]
        self._starts = np.cumsum([0] + list(counts))  # shard i holds tokens [starts[i], starts[i+1])
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def get(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) out of range (the split has {len(self)})")
        out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        while done < length:
            offset = start + done - int(self._starts[shard])
            take = min(length - done, len(self._maps[shard]) - offset)
            out[done : done + take] = self._maps[shard][offset : offset + take]
            done += take
            shard += 1
        return out

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("TokenArray slices must be contiguous")
            return self.get(start, max(0, stop - start))
        if idx < 0:
            idx += len(self)
        return int(self.get(idx, 1)[0])


class PreparedData:
    """A directory written by `budgetlm data prepare`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"prepared data directory not found: {self.path}")
        manifest_path = self.path / shards.MANIFEST
        if not manifest_path.exists():
            raise UserError(f"{self.path} is not a prepared data directory (no {shards.MANIFEST}; run `budgetlm data prepare`)")
        try:
            m = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{manifest_path} is damaged (not valid JSON); prepare the data again") from None
        if not isinstance(m, dict) or m.get("format") != shards.FORMAT:
            found = m.get("format") if isinstance(m, dict) else None
            raise UserError(f"{self.path} holds data format {found!r}; this budgetlm reads {shards.FORMAT!r} (prepare the data again)")
        try:
            self.dtype = str(np.dtype(m["dtype"]))
            for split in shards.SPLITS:
                for s in m["splits"][split]["shards"]:
                    s["file"], s["tokens"], s["sha256"]  # noqa: B018 (presence check)
            m["tokenizer"]["file"], m["separator_id"]  # noqa: B018
        except (KeyError, TypeError):
            raise UserError(f"{manifest_path} is incomplete; prepare the data again") from None
        self.manifest = m
        itemsize = np.dtype(self.dtype).itemsize
        for split in shards.SPLITS:
            for s in m["splits"][split]["shards"]:
                p = self.path / s["file"]
                if not p.exists():
                    raise UserError(f"{self.path}: shard {s['file']} is missing; prepare the data again")
                if p.stat().st_size != s["tokens"] * itemsize:
                    size, expected = p.stat().st_size, s["tokens"] * itemsize
                    raise UserError(f"{self.path}: shard {s['file']} is truncated or altered ({size} bytes, expected {expected})")
        self._tokenizer: Tokenizer | None = None
        self._arrays: dict[str, TokenArray] = {}

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            tok = Tokenizer.load(self.path / self.manifest["tokenizer"]["file"])
            if tok.sha256 != self.manifest["tokenizer"].get("sha256", tok.sha256):
                raise UserError(f"{self.path}: tokenizer.json does not match the manifest (it was changed after preparing)")
            self._tokenizer = tok
        return self._tokenizer

    @property
    def separator_id(self) -> int:
        return int(self.manifest["separator_id"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    def split(self, split: str) -> dict:
        if split not in self.manifest["splits"]:
            raise UserError(f"no split '{split}' in {self.path} (splits: {', '.join(self.manifest['splits'])})")
        return self.manifest["splits"][split]

    def tokens(self, split: str) -> TokenArray:
        if split not in self._arrays:
            info = self.split(split)
            self._arrays[split] = TokenArray([self.path / s["file"] for s in info["shards"]], [s["tokens"] for s in info["shards"]], self.dtype)
        return self._arrays[split]

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes of text per token (separators included), to turn nats/token into bits/byte."""
        info = self.split(split)
        return info["bytes"] / max(1, info["tokens"])

    def verify(self) -> None:
        """Hash every shard and the tokenizer against the manifest; UserError on a mismatch."""
        for split in shards.SPLITS:
            for s in self.split(split)["shards"]:
                if shards.sha256_file(self.path / s["file"]) != s["sha256"]:
                    raise UserError(f"{self.path}: shard {s['file']} fails its sha256 check (corrupted); prepare the data again")
        self.tokenizer  # noqa: B018 (loading checks its sha256)

    def __repr__(self) -> str:
        t = self.manifest["splits"]
        return f"PreparedData({str(self.path)!r}, train={t['train']['tokens']} tokens, val={t['val']['tokens']} tokens)"
