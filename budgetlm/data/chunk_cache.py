r"""Fast exact encoding for `data prepare`: a document's byte-level BPE ids are the concatenation of
the ids of its whitespace-led chunks, so each distinct chunk is encoded once and looked up after.

Why: profiling `data prepare` on jsonl (cProfile, 16 MB of the benchmark corpus, one process)
puts 96% of the time in `tokenizers`' `encode_batch_fast`, at about 2-3 MB per CPU second: the
Rust pipeline builds an aligned `NormalizedString` per document and per piece, runs the Oniguruma
split and the byte-level map on every one, and the BPE merges behind a cache of only 10,000
words. Text is Zipfian: in 2 MB of it, 6% of GPT-2 pieces are distinct. Here a document is cut
into chunks (a run of whitespace, then a run of anything else) by one simple regular expression,
each chunk is mapped to a cache index by one dict lookup, and the ids are gathered with numpy.
A chunk not seen before is encoded by the tokenizer itself, normaliser, split, byte map and
merges, so the cache holds exactly its ids.

Exactness: the tokenizer's split (GPT-2's pattern `'s|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`)
always ends a piece where a non-space character is followed by a space (no alternative matches
across that point), which is where chunks begin; byte-level BPE never merges across pieces; the
normalisers allowed here (Unicode forms, lowercasing) never act across a space; special tokens
are not split out of text (`Tokenizer.encode` sets `encode_special_tokens`). So a chunk encodes
alone exactly as inside its document. `supports` admits only tokenizers built that way (budgetlm's
own byte-level BPE); anything else is encoded whole. Whitespace is Unicode's White_Space in both
engines; the characters where Python's `str.isspace` differs (U+001C-U+001F, U+0085) are control
characters that cleaning has already removed. Tests check byte-identical shards against the
tokenizer itself on real text and on a sample of scripts, symbols and emoji.

Memory is bounded: the cache is emptied when it reaches `max_chunks` distinct chunks.
"""

from __future__ import annotations

import json
import re

import numpy as np

CHUNK = re.compile(r"\s*\S+|\s+")  # whitespace, then non-whitespace (only a text's end can be all whitespace)
MAX_CHUNKS = 1 << 18  # distinct chunks kept: ~40 MB of cache at most
LOCAL_NORMALIZERS = ("NFC", "NFKC", "NFD", "NFKD", "Lowercase")


def _local(normalizer: dict | None) -> bool:
    if normalizer is None:
        return True
    if normalizer.get("type") == "Sequence":
        return all(_local(n) for n in normalizer.get("normalizers", []))
    return normalizer.get("type") in LOCAL_NORMALIZERS


def supports(tokenizer) -> bool:
    """Whether `tokenizer` encodes chunks independently (see the module doc): budgetlm's byte-level BPE."""
    spec = json.loads(tokenizer.to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    return (
        tokenizer.kind == "bpe"
        and _local(spec.get("normalizer"))
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
        and model.get("type") == "BPE"
        and not model.get("dropout")
        and all(t.get("special") for t in spec.get("added_tokens", []))
    )


class _Index(dict):
    """chunk -> cache index, -1 when absent (a plain `__getitem__` is the fastest lookup `map` can make)."""

    def __missing__(self, key: str) -> int:
        return -1


class ChunkCache:
    """Encodes documents to numpy arrays of `dtype`, exactly as `tokenizer.encode_batch` would."""

    def __init__(self, tokenizer, dtype, max_chunks: int = MAX_CHUNKS):
        self._tok = tokenizer.hf
        self._encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        self.dtype = np.dtype(dtype)
        self.max_chunks = max_chunks
        self._clear()

    def _clear(self) -> None:
        self._index = _Index()
        # every cached chunk's ids one after another, and where each chunk's start and how many;
        # grown by doubling, so adding chunks costs amortised O(their ids)
        self._flat = np.zeros(1 << 16, dtype=self.dtype)
        self._starts = np.zeros(1 << 12, dtype=np.int64)
        self._lens = np.zeros(1 << 12, dtype=np.int64)
        self._n_flat = 0

    @staticmethod
    def _grown(a: np.ndarray, need: int) -> np.ndarray:
        if need <= len(a):
            return a
        b = np.zeros(max(need, 2 * len(a)), dtype=a.dtype)
        b[: len(a)] = a
        return b

    def _add(self, new: list[str]) -> None:
        """Encode and cache new (distinct) chunks."""
        ids = [enc.ids for enc in self._encode(new, add_special_tokens=False)]
        first = len(self._index)
        lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        self._starts = self._grown(self._starts, first + len(new))
        self._lens = self._grown(self._lens, first + len(new))
        self._starts[first : first + len(new)] = self._n_flat + np.cumsum(lens) - lens
        self._lens[first : first + len(new)] = lens
        total = int(lens.sum())
        self._flat = self._grown(self._flat, self._n_flat + total)
        self._flat[self._n_flat : self._n_flat + total] = np.fromiter((i for x in ids for i in x), dtype=self.dtype, count=total)
        self._n_flat += total
        for k, w in enumerate(new):
            self._index[w] = first + k

    def _lookup(self, batch: list[list[str]]) -> list[np.ndarray]:
        """Cache indices of every document's chunks; the new chunks of the whole batch are encoded
        in one call (in-process, the tokenizer's own threads share it)."""
        get = self._index.__getitem__
        idxs = [np.fromiter(map(get, chunks), dtype=np.int64, count=len(chunks)) for chunks in batch]
        missing = [np.flatnonzero(idx < 0) for idx in idxs]
        new = list(dict.fromkeys(c[i] for c, m in zip(batch, missing) for i in m.tolist()))
        if not new:
            return idxs
        if self._index and len(self._index) + len(new) > self.max_chunks:  # bounded memory: start over
            self._clear()
            return self._lookup(batch)
        self._add(new)
        for chunks, idx, m in zip(batch, idxs, missing):
            if len(m):
                idx[m] = np.fromiter((get(chunks[i]) for i in m.tolist()), dtype=np.int64, count=len(m))
        return idxs

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        flat, starts, lens = self._flat, self._starts, self._lens
        n = lens[idx]
        total = int(n.sum())
        if total == 0:
            return np.zeros(0, dtype=self.dtype)
        # position k of the output reads flat[starts[chunk] + offset within the chunk]
        ends = np.cumsum(n)
        offsets = np.repeat(starts[idx] - (ends - n), n) + np.arange(total)
        return flat[offsets]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self._gather(idx) for idx in self._lookup([CHUNK.findall(text) for text in texts])]
