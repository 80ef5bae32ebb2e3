r"""Fast exact encoding for `data prepare`: a document's byte-level BPE ids are the concatenation of
the ids of its chunks (runs of the tokenizer's pieces, cut where it always cuts), so each distinct
chunk is encoded once and looked up after.

Why: profiling `data prepare` on jsonl (cProfile, 16 MB of the benchmark corpus, one process)
puts 96% of the time in `tokenizers`' `encode_batch_fast`, at about 2-3 MB per CPU second: the
Rust pipeline builds an aligned `NormalizedString` per document and per piece, runs the Oniguruma
split and the byte-level map on every one, and the BPE merges behind a cache of only 10,000
words. Text is Zipfian: in 64 MB of English, about 1% of the 13 million chunks are distinct. A
chunk not seen before is encoded by the tokenizer itself, normaliser, split, byte map and merges,
so the cache holds exactly its ids.

How, without a Python object per chunk (a first version split documents with a regular expression
and looked each chunk up in a dict: 5 MB per CPU second, nine tenths of it in those two per-chunk
steps): a batch of documents becomes one UTF-8 byte array; numpy masks of its bytes give every
chunk's start (`chunk_bounds`); a chunk of at most 15 bytes is its own key, two little-endian
uint64 words read straight from the bytes, with its length in the top byte, looked up in an
open-addressing table of numpy arrays that compares both words, so a hash collision can only cost a
probe, never a wrong id. Longer chunks (0.2% of English) go through a dict of their bytes. The ids
of a batch are gathered by one numpy indexing and split per document.

Exactness: the tokenizer's split (GPT-2's pattern `'s|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`)
always ends a piece where a non-space character is followed by a space (no alternative matches
across that point), before the last character of a run of whitespace that non-whitespace follows
(`\s+(?!\S)`), after such a run when its last character is not a plain space (only ` ?` joins
whitespace to what follows), and where a letter or digit is followed by punctuation; `chunk_bounds`
cuts only there. Byte-level BPE never merges across pieces; the normalisers allowed here (Unicode
forms, lowercasing) never act across those points; special tokens are not split out of text
(`Tokenizer.encode` sets `encode_special_tokens`). So a chunk encodes alone exactly as inside its
document. `supports` admits only tokenizers built that way (budgetlm's own byte-level BPE);
anything else is encoded whole. Whitespace is Unicode's White_Space (`WHITESPACE`), as in the
tokenizer's regular expressions. Tests check every cut against the tokenizer's own pieces, and
byte-identical shards against the tokenizer itself on real text and on a sample of scripts,
symbols and emoji.

Memory is bounded: the cache is emptied when it reaches `max_chunks` distinct chunks.
"""

from __future__ import annotations

import json

import numpy as np

MAX_CHUNKS = 1 << 18  # distinct chunks kept: ~40 MB of cache at most
LOCAL_NORMALIZERS = ("NFC", "NFKC", "NFD", "NFKD", "Lowercase")
# Unicode's White_Space, the tokenizer's `\s`: str.isspace() but for U+001C-U+001F (a test checks both)
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
KEY_BYTES = 15  # chunks up to this long are their own key (two uint64 words, with the length)

_ASCII_WS = np.zeros(256, dtype=bool)
_ASCII_WS[[ord(c) for c in WHITESPACE if ord(c) < 0x80]] = True
_ASCII_ALNUM = np.zeros(256, dtype=bool)
_ASCII_ALNUM[[ord(c) for c in "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"]] = True
_ASCII_PUNCT = np.zeros(256, dtype=bool)
_ASCII_PUNCT[[c for c in range(0x21, 0x7F) if not _ASCII_ALNUM[c]]] = True
# multi-byte whitespace as integers of its UTF-8 bytes, by length; every one starts with 0xC2, 0xE1, 0xE2 or 0xE3
_WS2 = np.array([int.from_bytes(c.encode(), "big") for c in WHITESPACE if len(c.encode()) == 2], dtype=np.int64)
_WS3 = np.array([int.from_bytes(c.encode(), "big") for c in WHITESPACE if len(c.encode()) == 3], dtype=np.int64)
# the low `n` bytes of a little-endian uint64 word, for n = 0..8
_LOW_BYTES = np.array([(1 << (8 * n)) - 1 for n in range(9)], dtype=np.uint64)


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


def whitespace_mask(buf: np.ndarray) -> np.ndarray:
    """For each byte of UTF-8 text, whether it belongs to a whitespace character (`WHITESPACE`)."""
    ws = _ASCII_WS[buf]
    lead = np.flatnonzero((buf == 0xC2) | ((buf >= 0xE1) & (buf <= 0xE3)))
    if len(lead):
        pad = np.concatenate([buf, np.zeros(2, dtype=np.uint8)]).astype(np.int64)
        three = (pad[lead] << 16) | (pad[lead + 1] << 8) | pad[lead + 2]
        for width, table, key in ((2, _WS2, three >> 8), (3, _WS3, three)):
            at = lead[np.isin(key, table)]
            for j in range(width):
                ws[at + j] = True
    return ws


def chunk_bounds(buf: np.ndarray, doc_starts: np.ndarray) -> np.ndarray:
    r"""Start offsets of the chunks of the documents laid end to end in `buf` (each starting at one of
    `doc_starts`). Every start is also a start of one of the tokenizer's pieces, so chunks encode
    independently (see the module doc). A chunk starts:
    - at a document's start, and wherever whitespace follows non-whitespace;
    - inside a run of whitespace followed by non-whitespace, at its last character (the split's
      `\s+(?!\S)` ends a piece just before it), and after the run when that character is not
      a plain space (only a plain space joins the word after it), so "\n\n    Word" is cached as
      "\n\n   " and " Word";
    - at ASCII punctuation after an ASCII letter or digit (a letter or number piece ends there), so
      " word," is " word" and ",".
    The last two make far fewer distinct chunks to encode, for a few more to look up."""
    n = len(buf)
    ws = whitespace_mask(buf)
    start = np.empty(n, dtype=bool)
    start[0] = True
    np.greater(ws[1:], ws[:-1], out=start[1:])  # whitespace after non-whitespace
    # the ends of whitespace runs that non-whitespace of the same document follows
    same_doc = np.ones(n, dtype=bool)
    same_doc[doc_starts] = False
    run_end = np.flatnonzero(ws[:-1] & ~ws[1:] & same_doc[1:])
    cont = (buf & 0xC0) == 0x80  # UTF-8 continuation bytes: the last character starts at the run end or 1-2 bytes before
    back = cont[run_end].astype(np.int64)
    back += cont[run_end - back] & (back > 0)
    start[run_end - back] = True
    start[run_end[buf[run_end] != 0x20] + 1] = True
    punct_after_alnum = _ASCII_PUNCT[buf[1:]] & _ASCII_ALNUM[buf[:-1]]
    start[1:] |= punct_after_alnum
    start[doc_starts] = True
    return np.flatnonzero(start)


def _words(buf: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The key of each chunk of at most KEY_BYTES bytes: its bytes as two little-endian uint64 words
    (read unaligned through a strided view, then masked), the top byte holding its length, so a
    chunk and the same chunk with NUL bytes after it differ."""
    pad = np.concatenate([buf, np.zeros(16, dtype=np.uint8)])
    view = np.ndarray(shape=(len(buf) + 9,), dtype="<u8", buffer=pad, strides=(1,))
    lo = view[starts] & _LOW_BYTES[np.minimum(lens, 8)]
    hi = view[starts + 8] & _LOW_BYTES[np.clip(lens - 8, 0, 7)] | lens.astype(np.uint64) << np.uint64(56)
    return lo, hi


def _first_of_each(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Positions of the first occurrence of each distinct (lo, hi) key, in order."""
    mixed = lo * np.uint64(0x9E3779B97F4A7C15) ^ hi
    _, first, inverse = np.unique(mixed, return_index=True, return_inverse=True)
    if np.array_equal(lo[first][inverse], lo) and np.array_equal(hi[first][inverse], hi):
        return np.sort(first)
    # two distinct keys mixed to one number (astronomically rare): compare the keys themselves
    _, first = np.unique(np.stack([lo, hi], axis=1), axis=0, return_index=True)
    return np.sort(first)


class ChunkCache:
    """Encodes documents to numpy arrays of `dtype`, exactly as `tokenizer.encode_batch` would."""

    def __init__(self, tokenizer, dtype, max_chunks: int = MAX_CHUNKS):
        self._tok = tokenizer.hf
        self._encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        self.dtype = np.dtype(dtype)
        self.max_chunks = max_chunks
        self._clear()

    def __len__(self) -> int:
        return self._n

    def _clear(self) -> None:
        self._n = 0
        self._long: dict[bytes, int] = {}  # chunks longer than KEY_BYTES -> cache index
        self._new_table(1 << max(10, (2 * self.max_chunks - 1).bit_length()))
        # every cached chunk's ids one after another, and where each chunk's start and how many;
        # grown by doubling, so adding chunks costs amortised O(their ids)
        self._flat = np.zeros(1 << 16, dtype=self.dtype)
        self._starts = np.zeros(1 << 12, dtype=np.int64)
        self._lens = np.zeros(1 << 12, dtype=np.int64)
        self._n_flat = 0

    # --- the table of short chunks: open addressing, linear probing, at most half full -------
    def _new_table(self, size: int) -> None:
        self._shift = np.uint64(64 - (size.bit_length() - 1))
        self._t_lo = np.zeros(size, dtype=np.uint64)
        self._t_hi = np.zeros(size, dtype=np.uint64)
        self._t_idx = np.full(size, -1, dtype=np.int64)
        self._t_used = 0

    def _slots(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        # multiplicative hashing of both words (odd constants from splitmix64); the top bits pick the slot
        h = lo * np.uint64(0x9E3779B97F4A7C15) ^ hi * np.uint64(0xBF58476D1CE4E5B9)
        return (h >> self._shift).astype(np.int64)

    def _find(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Cache index of each key, -1 where absent."""
        out = np.full(len(lo), -1, dtype=np.int64)
        todo = np.arange(len(lo))
        slot = self._slots(lo, hi)
        mask = len(self._t_idx) - 1
        while len(todo):
            s = slot[todo]
            idx = self._t_idx[s]
            hit = (self._t_lo[s] == lo[todo]) & (self._t_hi[s] == hi[todo]) & (idx >= 0)
            out[todo[hit]] = idx[hit]
            todo = todo[~hit & (idx >= 0)]  # another key in that slot: look in the next one
            slot[todo] = (slot[todo] + 1) & mask
        return out

    def _insert(self, lo: np.ndarray, hi: np.ndarray, idx: np.ndarray) -> None:
        """Add keys not in the table (distinct), in rounds: each round, the first key aiming at each
        free slot takes it, and the others move on to the next slot."""
        if 2 * (self._t_used + len(lo)) > len(self._t_idx):  # keep probes short: grow and re-insert
            used = self._t_idx >= 0
            old = (self._t_lo[used], self._t_hi[used], self._t_idx[used])
            self._new_table(2 * len(self._t_idx))
            self._insert(*old)
        mask = len(self._t_idx) - 1
        slot = self._slots(lo, hi)
        todo = np.arange(len(lo))
        while len(todo):
            s = slot[todo]
            free = self._t_idx[s] < 0
            _, first = np.unique(s[free], return_index=True)
            won = np.flatnonzero(free)[first]
            k, at = todo[won], s[won]
            self._t_lo[at], self._t_hi[at], self._t_idx[at] = lo[k], hi[k], idx[k]
            todo = np.delete(todo, won)
            slot[todo] = (slot[todo] + 1) & mask
        self._t_used += len(lo)

    # --- cached ids ---------------------------------------------------------------------------
    @staticmethod
    def _grown(a: np.ndarray, need: int) -> np.ndarray:
        if need <= len(a):
            return a
        b = np.zeros(max(need, 2 * len(a)), dtype=a.dtype)
        b[: len(a)] = a
        return b

    def _add(self, new: list[str]) -> np.ndarray:
        """Encode new (distinct) chunks and cache their ids; returns their cache indices."""
        ids = [enc.ids for enc in self._encode(new, add_special_tokens=False)]
        first = self._n
        lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        self._starts = self._grown(self._starts, first + len(new))
        self._lens = self._grown(self._lens, first + len(new))
        self._starts[first : first + len(new)] = self._n_flat + np.cumsum(lens) - lens
        self._lens[first : first + len(new)] = lens
        total = int(lens.sum())
        self._flat = self._grown(self._flat, self._n_flat + total)
        self._flat[self._n_flat : self._n_flat + total] = np.fromiter((i for x in ids for i in x), dtype=self.dtype, count=total)
        self._n_flat += total
        self._n += len(new)
        return np.arange(first, first + len(new))

    def _lookup(self, data: bytes, buf: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray | None:
        """Cache index of every chunk, encoding the new ones of the whole batch in one call (in-process,
        the tokenizer's own threads share it); None when they would overflow the cache (emptied first)."""
        short = lens <= KEY_BYTES
        s_pos = np.flatnonzero(short)
        lo, hi = _words(buf, starts[s_pos], lens[s_pos])
        idx = np.full(len(starts), -1, dtype=np.int64)
        idx[s_pos] = self._find(lo, hi)
        long_pos = np.flatnonzero(~short).tolist()
        long_keys = [data[s : s + n] for s, n in zip(starts[long_pos].tolist(), lens[long_pos].tolist())]
        idx[long_pos] = [self._long.get(k, -1) for k in long_keys]
        missing = np.flatnonzero(idx < 0)
        if not len(missing):
            return idx
        # the distinct new chunks, in order of first appearance
        miss_short = missing[short[missing]]
        at = np.searchsorted(s_pos, miss_short)  # where each missing short chunk's key is in lo / hi
        m_lo, m_hi = lo[at], hi[at]
        first = _first_of_each(m_lo, m_hi)
        new_short = [data[s : s + n] for s, n in zip(starts[miss_short[first]].tolist(), lens[miss_short[first]].tolist())]
        new_long = list(dict.fromkeys(k for k, i in zip(long_keys, idx[long_pos].tolist()) if i < 0))
        if self._n and self._n + len(new_short) + len(new_long) > self.max_chunks:  # bounded memory: start over
            self._clear()
            return None
        added = self._add([b.decode("utf-8") for b in new_short + new_long])
        self._insert(m_lo[first], m_hi[first], added[: len(new_short)])
        self._long.update(zip(new_long, added[len(new_short) :].tolist()))
        idx[miss_short] = self._find(m_lo, m_hi)
        if new_long:
            idx[long_pos] = [self._long[k] for k in long_keys]
        return idx

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        n = self._lens[idx]
        total = int(n.sum())
        # position k of the output reads flat[starts[chunk] + offset within the chunk]
        ends = np.cumsum(n)
        offsets = np.repeat(self._starts[idx] - (ends - n), n) + np.arange(total)
        return self._flat[offsets]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encoded = [t.encode("utf-8") for t in texts]
        doc_bytes = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        nonempty = doc_bytes > 0
        if not nonempty.any():
            return [np.zeros(0, dtype=self.dtype) for _ in texts]
        data = b"".join(encoded)
        buf = np.frombuffer(data, dtype=np.uint8)
        doc_starts = (np.cumsum(doc_bytes) - doc_bytes)[nonempty]
        starts = chunk_bounds(buf, doc_starts)
        lens = np.diff(starts, append=len(buf))
        idx = self._lookup(data, buf, starts, lens)
        if idx is None:
            idx = self._lookup(data, buf, starts, lens)
        ids = self._gather(idx)
        # each document's token count: the sum over its chunks
        doc_tokens = np.zeros(len(texts), dtype=np.int64)
        doc_tokens[nonempty] = np.add.reduceat(self._lens[idx], np.searchsorted(starts, doc_starts))
        return np.split(ids, np.cumsum(doc_tokens)[:-1])
