"""A smaller vocabulary from prepared data, chosen after the budget is known.

`data prepare` runs before anyone knows how long the model will train, yet the right vocabulary
depends on the budget: a 90-second run wants ~2k tokens, a day on a GPU ~32k (Tao et al. 2024).
Byte-level BPE makes the way out cheap. Its merges are learned greedily, one at a time, so the
first k merges of a tokenizer trained to vocabulary V are exactly the merges of the tokenizer
trained to 259 + k on the same sample (checked: 8192 truncated to 2048 equals 2048 trained
directly, merge for merge), and the ids stay in merge order. And byte-level BPE decodes exactly,
so the prepared shards give back the cleaned text without the original files.

`derive_vocabulary(data, V)` keeps the first V ids of the prepared tokenizer, re-encodes the
documents of the prepared shards with it, and writes a complete prepared directory at
`<data>/vocab-<V>/` (once; later runs reuse it). A run trained on it records that directory, so
`eval`, `generate` and `finetune` see its own tokenizer. WordPiece vocabularies have no such
order and are used as prepared.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from budgetlm.data import shards
from budgetlm.data.dataset import PreparedData
from budgetlm.data.tokenizer import BPE_SPECIALS, Tokenizer
from budgetlm.errors import UserError

DERIVED_PREFIX = "vocab-"
BYTE_ALPHABET = 256
DECODE_BATCH_TOKENS = 1 << 20  # tokens decoded and re-encoded per batch: bounded memory on any corpus
MIN_PARTIAL_TOKENS = 1 << 20  # below this, a partial derivation saves too little to be worth a second one later


def can_derive(tokenizer: Tokenizer) -> bool:
    """Only byte-level BPE vocabularies nest (see the module doc)."""
    return tokenizer.kind == "bpe" and tokenizer.own  # a BPE brought from elsewhere keeps no merge order we know


def min_vocab_size() -> int:
    return len(BPE_SPECIALS) + BYTE_ALPHABET


def truncate_bpe(tokenizer: Tokenizer, vocab_size: int) -> Tokenizer:
    """The byte-level BPE made of the first `vocab_size` ids of `tokenizer` (specials, the 256 bytes,
    then the first merges): identical to one trained to that size on the same sample."""
    if not can_derive(tokenizer):
        raise UserError(f"a {tokenizer.kind} vocabulary cannot be cut to a smaller one; prepare the data with --vocab-size {vocab_size}")
    if not min_vocab_size() <= vocab_size <= tokenizer.vocab_size:
        n = tokenizer.vocab_size
        raise UserError(f"model.vocab_size={vocab_size}: a vocabulary cut from the prepared {n} must have {min_vocab_size()}..{n} tokens")
    spec = json.loads(tokenizer.to_str())
    model = spec["model"]
    vocab, merges = model["vocab"], model["merges"]
    n_merges = vocab_size - (len(vocab) - len(merges))
    for merge in merges[:n_merges]:  # a kept merge must produce a kept id, else ids are not in merge order
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        if vocab.get(left + right, -1) >= vocab_size:
            raise UserError("this tokenizer's ids are not in merge order (not trained by budgetlm?); prepare the data with the vocabulary you want")
    model["merges"] = merges[:n_merges]
    model["vocab"] = {tok: i for tok, i in vocab.items() if i < vocab_size}
    spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t["id"] < vocab_size]
    return Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))


def derived_path(data: PreparedData, vocab_size: int) -> Path:
    return data.path / f"{DERIVED_PREFIX}{vocab_size}"


def find_derived(data: PreparedData, tokenizer_sha256: str) -> PreparedData | None:
    """The vocabulary already derived from `data` whose tokenizer has this hash, if any."""
    for path in sorted(data.path.glob(f"{DERIVED_PREFIX}*")):
        manifest = shards.read_manifest(path)
        if manifest and manifest["tokenizer"].get("sha256") == tokenizer_sha256:
            return PreparedData(path)
    return None


def derive_vocabulary(data: PreparedData, vocab_size: int, *, max_train_tokens: int = 0, log=None) -> PreparedData:
    """`data` re-tokenized with its first `vocab_size` ids, cached at `<data>/vocab-<V>/`.

    `max_train_tokens` > 0 re-encodes only about that many training tokens (of the prepared
    tokenizer), taken in 64 evenly spaced stretches so the sample covers the whole corpus; the
    validation split is always complete. A cached directory that covers fewer training tokens
    than asked is rebuilt.
    """
    if vocab_size == data.vocab_size:
        return data
    out = derived_path(data, vocab_size)
    total = len(data.tokens("train"))
    want = total if max_train_tokens <= 0 else min(total, max(max_train_tokens, MIN_PARTIAL_TOKENS))
    cached = shards.read_manifest(out)
    if cached and cached.get("derived_from", {}).get("tokenizer_sha256") == data.manifest["tokenizer"]["sha256"]:
        if cached["derived_from"]["train_tokens_covered"] >= want:
            return PreparedData(out)
    tok = truncate_bpe(data.tokenizer, vocab_size)
    start = time.perf_counter()
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tok.save(tmp / shards.TOKENIZER_FILE)
        dtype = shards.dtype_for_vocab(tok.vocab_size)
        splits = {}
        for split in shards.SPLITS:
            tokens = data.tokens(split)
            doc_tokens = len(tokens) / max(1, data.split(split)["documents"])
            pieces = int(min(64, max(1, want // (8 * doc_tokens))))
            ranges = [(0, len(tokens))] if split == "val" or want >= total else _spread(len(tokens), want, pieces)
            writer = shards.ShardWriter(tmp, split, dtype, tok.eos_id, data.manifest["settings"].get("shard_tokens", 1 << 26))
            for a, b in ranges:
                _reencode(tokens, a, _document_end(tokens, b, data.separator_id), data.tokenizer, tok, data.separator_id, writer)
            splits[split] = writer.close()
        manifest = {
            **{k: v for k, v in data.manifest.items() if k not in ("splits", "tokenizer", "dtype", "separator_id", "summary")},
            "tokenizer": {"file": shards.TOKENIZER_FILE, "kind": tok.kind, "sha256": tok.sha256, "vocab_size": tok.vocab_size},
            "dtype": dtype,
            "separator_id": tok.eos_id,
            "splits": splits,
            "derived_from": {
                "path": str(data.path),
                "tokenizer_sha256": data.manifest["tokenizer"]["sha256"],
                "vocab_size": data.vocab_size,
                "train_tokens_covered": want,
            },
            "summary": {"seconds": round(time.perf_counter() - start, 2)},
        }
        shards.write_manifest(tmp, manifest)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)  # the directory appears complete or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if log:
        log(f"derived a {vocab_size:,}-token vocabulary from the prepared {data.vocab_size:,} in {time.perf_counter() - start:.1f}s: {out}")
    return PreparedData(out)


def _spread(n: int, want: int, pieces: int) -> list[tuple[int, int]]:
    """`pieces` equal stretches of [0, n) adding up to about `want`, evenly spaced."""
    stride, length = n / pieces, max(1, want // pieces)
    return [(int(i * stride), min(n, int(i * stride) + length)) for i in range(pieces)]


def _document_end(tokens, b: int, sep: int, block: int = 1 << 16) -> int:
    """The end (past the separator) of the document that holds position b - 1, so a stretch ends whole."""
    pos = max(0, b - 1)
    while pos < len(tokens):
        chunk = tokens.get(pos, min(block, len(tokens) - pos))
        hits = np.flatnonzero(chunk == sep)
        if len(hits):
            return pos + int(hits[0]) + 1
        pos += len(chunk)
    return len(tokens)


def _reencode(tokens, a: int, b: int, source: Tokenizer, target: Tokenizer, sep: int, writer: shards.ShardWriter) -> None:
    """Documents of tokens[a:b] (cut at separators; a partial first document is dropped unless the
    range starts at the split's edge, and b ends a document) decoded with `source` and encoded with `target`."""
    pos = a
    while pos < b:
        chunk = tokens.get(pos, min(DECODE_BATCH_TOKENS, b - pos))
        seps = np.flatnonzero(chunk == sep)
        if pos == a and a > 0:  # the range starts inside a document: skip to the first whole one
            if not len(seps):
                pos += len(chunk)
                continue
            chunk, seps, pos = chunk[seps[0] + 1 :], seps[1:] - seps[0] - 1, pos + seps[0] + 1
        if not len(seps):
            if pos + len(chunk) >= len(tokens):  # the split's last document without a separator
                seps = np.array([len(chunk)])
            elif len(chunk) == DECODE_BATCH_TOKENS:
                raise UserError("a document longer than a million tokens; prepare the data with the vocabulary you want")
            else:
                break  # a partial last document of this stretch
        docs = np.split(chunk[: seps[-1]], seps[:-1] + 1) if len(seps) else []
        texts = source.hf.decode_batch([d[d != sep].tolist() for d in docs], skip_special_tokens=False)
        for ids, text in zip(target.encode_batch(texts), texts):
            writer.add(np.asarray(ids), len(text.encode("utf-8")))
        pos += int(seps[-1]) + 1
