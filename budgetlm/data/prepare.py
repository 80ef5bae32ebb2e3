"""`budgetlm data prepare`: inputs -> cleaned documents -> tokenizer -> packed, split shards.

The pipeline streams; memory does not grow with the corpus (only the dedup set does, by 16
bytes of hash plus set overhead per unique document):

1. discover and check inputs (every user error is raised here, before minutes of work);
2. train the tokenizer on an even sample of about ``tokenizer_sample_bytes`` of training
   documents (validation documents are left out so the tokenizer never saw them), or reuse
   ``tokenizer_file``;
3. tokenize in ``workers`` processes, in order (so the output does not depend on the worker
   count), drop exact duplicates and filtered documents, send each document to train or val
   by a seeded hash of its content, and pack it, followed by the separator, into shards
   (byte-level BPE through `budgetlm.data.chunk_cache`: the same ids, several times faster);
4. top validation up to ``min_val_documents`` documents and ``min_val_tokens`` tokens (at most
   a tenth of the corpus) from the train-bound documents with the lowest split scores, kept
   aside in memory for it: whole documents while they fit, then the end of one, cut at a line
   or word start (a small corpus, or a few long documents, would otherwise leave validation a
   document or two, or nothing). A document longer than ``min_val_tokens`` is never held out
   whole. The summary says how many tokens are held out, and warns when it is fewer;
5. write the manifest last, atomically.

An output directory that already holds data prepared with other settings is an error unless
``--force``; with the same settings and the same input files (path, size, modification time)
the command does nothing and prints the stored summary; with the same settings but changed
input files it rebuilds. Only files this command writes are ever deleted.
"""

from __future__ import annotations

import heapq
import json
import os
import sys
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np

from budgetlm.config import PrepareConfig, to_dict
from budgetlm.data import chunk_cache, clean, shards
from budgetlm.data.chunk_cache import ChunkCache
from budgetlm.data.sources import ReadStats, check_file, discover, iter_documents
from budgetlm.data.tokenizer import Tokenizer, default_vocab_size, train_tokenizer
from budgetlm.errors import UserError

BATCH_CHARS = 1 << 20  # characters per tokenization task: big enough to amortise inter-process pickling
BATCH_DOCS = 2048
AUTO_BYTES_PER_WORKER = 8 << 20  # below this, process start-up costs more than it saves
COMPRESSED_RATIO = 4  # rough text/compressed ratio, only for estimates (vocab default, progress total)
SAMPLE_SEED_SALT = 0x5A17  # the tokenizer sample must be independent of the val split
MAX_VAL_SHARE = 0.1  # min_val_tokens never takes more than this share of the corpus's tokens
MIN_CUT_TOKENS = 64  # the smallest piece of a document held out when one is cut
FAST_ENCODE = True  # False: every document through the tokenizer itself (the reference the chunk cache is tested against)


# ---------------------------------------------------------------------------------------------
# worker side: clean + hash + tokenize a batch of raw documents

_W: dict = {}


def _init_worker(tokenizer_json: str, cfg_dict: dict, dtype: str, in_pool: bool = True, fast: bool = True) -> None:
    if in_pool:  # one thread per process, the pool is the parallelism; in-process, the Rust threads are
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = Tokenizer.from_str(tokenizer_json)
    _W["tok"] = tok
    _W["cfg"] = cfg_dict
    _W["dtype"] = np.dtype(dtype)
    # the chunk cache gives the tokenizer's ids several times faster (budgetlm.data.chunk_cache); other tokenizers encode whole
    _W["encode"] = ChunkCache(tok, dtype).encode_batch if fast and chunk_cache.supports(tok) else _encode_whole


def _process_batch(raw_docs: list[str]) -> list[tuple]:
    """(digest, utf-8 bytes, ids or None, skip reason or None) per document, in order."""
    cfg = _W["cfg"]
    out: list[tuple] = []
    kept_texts: list[str] = []
    kept_slots: list[int] = []
    for raw in raw_docs:
        text = clean.clean_text(raw, cfg["normalization"], cfg["lowercase"])
        if len(text) < max(1, cfg["min_chars"]):
            out.append((None, 0, None, "too_short"))
            continue
        kept_slots.append(len(out))
        kept_texts.append(text)
        out.append((clean.digest(text), len(text.encode("utf-8")), None, None))
    max_tpc = cfg["max_tokens_per_char"]
    for slot, text, ids in zip(kept_slots, kept_texts, _W["encode"](kept_texts)):
        digest, n_bytes, _, _ = out[slot]
        if max_tpc > 0 and len(ids) > max_tpc * len(text):
            out[slot] = (digest, n_bytes, None, "tokens_per_char")
        else:
            out[slot] = (digest, n_bytes, ids, None)
    return out


def _encode_whole(texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=_W["dtype"]) for ids in _W["tok"].encode_batch(texts)]


def _batches(docs, max_chars: int = BATCH_CHARS, max_docs: int = BATCH_DOCS):
    batch, chars = [], 0
    for d in docs:
        batch.append(d)
        chars += len(d)
        if chars >= max_chars or len(batch) >= max_docs:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------
# main side


class _ValReserve:
    """Keeps the train-bound documents with the lowest split scores in memory, as few as hold
    `min_documents` documents and `min_tokens` tokens, so that validation can be topped up to
    those minimums at the end when the hash split picked too little (a small corpus, or few long
    documents). Memory: about `min_tokens` tokens plus one document."""

    def __init__(self, min_documents: int, min_tokens: int):
        self.min_documents, self.min_tokens = min_documents, min_tokens
        self._heap: list[tuple[float, int, np.ndarray, int]] = []  # (-score, seq, ids, bytes): a max-heap
        self._seq = 0
        self._tokens = 0

    def offer(self, score: float, ids: np.ndarray, n_bytes: int) -> list[tuple[np.ndarray, int]]:
        """Keep this document; return those that must go to train now (the highest scores not needed)."""
        self._seq += 1
        heapq.heappush(self._heap, (-score, self._seq, ids, n_bytes))
        self._tokens += len(ids) + 1
        out = []
        while self._heap:
            worst = self._heap[0]
            if len(self._heap) <= self.min_documents or self._tokens - (len(worst[2]) + 1) < self.min_tokens:
                break
            heapq.heappop(self._heap)
            self._tokens -= len(worst[2]) + 1
            out.append((worst[2], worst[3]))
        return out

    def drain(self) -> list[tuple[np.ndarray, int]]:
        """Kept documents, lowest score first."""
        return [(ids, nb) for _, _, ids, nb in sorted(self._heap, key=lambda t: (-t[0], t[1]))]


def _top_up_validation(reserve: _ValReserve, writers: dict, cfg: PrepareConfig, tok: Tokenizer) -> int:
    """Move reserved documents to validation until it holds `min_val_documents` documents and
    `min_val_tokens` tokens (at most MAX_VAL_SHARE of the corpus), cutting the last one if a whole
    one would be too much; the rest go to train. Returns how many documents were cut."""
    val, train = writers["val"], writers["train"]
    kept = reserve.drain()
    total = train.tokens + val.tokens + sum(len(ids) + 1 for ids, _ in kept)
    target = min(cfg.min_val_tokens, int(MAX_VAL_SHARE * total))
    cut = 0
    for ids, n_bytes in kept:
        need_docs = val.documents < cfg.min_val_documents
        need = target - val.tokens
        if not need_docs and need <= 0:
            train.add(ids, n_bytes)
        elif len(ids) + 1 <= max(need, 0) or (need_docs and len(ids) + 1 <= max(need, MIN_CUT_TOKENS)):
            val.add(ids, n_bytes)
        else:  # too long to hold out whole: its end goes to validation, the rest stays in train
            head, tail = _cut(ids, max(need - 1, MIN_CUT_TOKENS), tok)
            tail_bytes = min(n_bytes, len(tok.decode(tail).encode("utf-8")))
            val.add(tail, tail_bytes)
            if len(head):
                train.add(head, n_bytes - tail_bytes)
            cut += 1
    return cut


def _cut(ids: np.ndarray, n: int, tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """`ids` cut into a head and a tail of at least `n` tokens, at a token that starts a line or a word
    (looked for within 256 tokens before the exact point), so both parts decode to whole characters."""
    start = max(1, len(ids) - n)
    for c in range(start, max(0, start - 256), -1):
        piece = tok.decode(ids[c : c + 1])
        if piece[:1].isspace() and "\ufffd" not in piece:
            return ids[:c], ids[c:]
    return ids[:start], ids[start:]


def _log(show: bool, msg: str) -> None:
    if show:
        print(msg, file=sys.stderr, flush=True)


def _bar(show: bool, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, disable=not show, mininterval=0.5)


def _check_config(cfg: PrepareConfig) -> None:
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    for key in ("min_val_documents", "min_val_tokens", "vocab_size", "min_chars", "workers", "txt_document_chars"):
        if getattr(cfg, key) < 0:
            raise UserError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.shard_tokens < 1024:
        raise UserError(f"shard_tokens must be >= 1024, got {cfg.shard_tokens}")
    if cfg.vocab_size and cfg.vocab_size < 300 and cfg.tokenizer == "bpe":
        raise UserError(f"vocab_size {cfg.vocab_size} is below the 256 bytes + specials a byte-level BPE needs")
    if cfg.eos_token and not cfg.tokenizer_file:
        raise UserError("eos_token names the separator of a tokenizer you bring (tokenizer_file); a trained one has its own")
    if cfg.tokenizer_sample_bytes < 1:
        raise UserError("tokenizer_sample_bytes must be positive")


def _prepare_out_dir(out: Path, settings_hash: str, inputs: list[dict], force: bool) -> dict | None:
    """Make `out` ready for writing; return the existing manifest if it is already up to date."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    names = [p.name for p in out.iterdir()]
    existing = shards.read_manifest(out)
    if not force:
        if existing is not None:
            if existing.get("settings_hash") != settings_hash:
                old = existing.get("settings_hash")
                raise UserError(f"{out} holds data prepared with other settings (settings hash {old}, now {settings_hash}); use --force to overwrite")
            if existing.get("inputs") == inputs:
                return existing
        foreign = sorted(n for n in names if not shards.is_own_file(n))
        if foreign:
            raise UserError(f"--out {out} is not empty and holds no budgetlm data (e.g. {foreign[0]}); use --force to write into it anyway")
    # the manifest goes first, so an interrupted rebuild can never look finished
    (out / shards.MANIFEST).unlink(missing_ok=True)
    for n in names:
        if shards.is_own_file(n) and (out / n).is_file():
            (out / n).unlink()
    return None


def _sample_texts(files, cfg: PrepareConfig, est_bytes: int, show: bool, include_val: bool):
    """An even sample of about `tokenizer_sample_bytes` of cleaned training documents."""
    keep_p = min(1.0, cfg.tokenizer_sample_bytes / max(1, est_bytes))
    stats = ReadStats()
    taken = 0
    with _bar(show, sum(f.size for f in files), "tokenizer sample") as bar:
        for raw in iter_documents(files, cfg, stats):
            bar.update(stats.bytes_read - bar.n)
            text = clean.clean_text(raw, cfg.normalization, cfg.lowercase)
            if len(text) < max(1, cfg.min_chars):
                continue
            d = clean.digest(text)
            if not include_val and clean.split_score(d, cfg.seed) < cfg.val_fraction:
                continue
            if keep_p < 1.0 and clean.split_score(d, cfg.seed ^ SAMPLE_SEED_SALT) >= keep_p:
                continue
            taken += len(text)
            yield text
            if taken >= cfg.tokenizer_sample_bytes:
                return


def _get_tokenizer(files, cfg: PrepareConfig, est_bytes: int, show: bool) -> Tokenizer:
    if cfg.tokenizer_file:
        tok = Tokenizer.load(cfg.tokenizer_file, eos_token=cfg.eos_token)
        return tok.with_eos(cfg.eos_token) if cfg.eos_token else tok
    vocab = cfg.vocab_size or default_vocab_size(est_bytes)
    _log(show, f"training a {cfg.tokenizer} tokenizer (vocabulary {vocab}) on a sample of up to {cfg.tokenizer_sample_bytes / 1e6:.0f} MB")
    seen = [0]

    def counted(texts):
        for t in texts:
            seen[0] += 1
            yield t

    kw = dict(normalization=cfg.normalization, lowercase=cfg.lowercase, show_progress=show)
    tok = train_tokenizer(cfg.tokenizer, counted(_sample_texts(files, cfg, est_bytes, show, include_val=False)), vocab, **kw)
    if seen[0] == 0:  # every document fell in validation (a tiny corpus): train on all of them
        tok = train_tokenizer(cfg.tokenizer, counted(_sample_texts(files, cfg, est_bytes, show, include_val=True)), vocab, **kw)
    if seen[0] == 0:
        raise UserError("no usable documents in the inputs (all empty or shorter than min_chars)")
    return tok


def _n_workers(cfg: PrepareConfig, est_bytes: int) -> int:
    cores = os.cpu_count() or 1
    if cfg.workers:
        return cfg.workers
    return max(1, min(cores, est_bytes // AUTO_BYTES_PER_WORKER))


def _tokenized_documents(files, cfg: PrepareConfig, tok: Tokenizer, dtype: str, workers: int, stats: ReadStats):
    """Results of `_process_batch` over all documents, in input order, at most a few batches in flight."""
    init_args = (tok.to_str(), to_dict(cfg), dtype, workers > 1, FAST_ENCODE)
    batches = _batches(iter_documents(files, cfg, stats))
    if workers <= 1:
        _init_worker(*init_args)
        for batch in batches:
            yield from _process_batch(batch)
        return
    import multiprocessing as mp

    # spawn, not fork: the parent has already run Rust thread pools (tokenizer training), and
    # forking a process with live threads can deadlock the children
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_process_batch, (batch,)))
            if len(pending) >= 2 * workers:  # bounded: Pool.imap would read the whole corpus ahead
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def prepare(
    inputs: list[str], out: str | os.PathLike, cfg: PrepareConfig | None = None, force: bool = False, show_progress: bool | None = None
) -> dict:
    """Prepare `inputs` into `out`; returns the summary (also stored in the manifest)."""
    cfg = cfg or PrepareConfig()
    show = sys.stderr.isatty() if show_progress is None else show_progress
    t0 = time.perf_counter()
    _check_config(cfg)
    out = Path(out)
    stats = ReadStats()
    files = [f for f in discover(inputs, stats) if check_file(f, cfg, stats)]
    if not files:
        raise UserError(f"no usable input files (skipped: {_fmt_counts(stats.skipped())})")
    tokenizer_file_sha = Tokenizer.load(cfg.tokenizer_file, eos_token=cfg.eos_token).sha256 if cfg.tokenizer_file else ""
    settings = to_dict(cfg)
    settings_hash = shards.settings_hash(settings, tokenizer_file_sha)
    input_list = [dict(f.describe(), mtime_ns=f.path.stat().st_mtime_ns if f.format != "hf" else 0) for f in files]
    existing = _prepare_out_dir(out, settings_hash, input_list, force)
    if existing is not None:
        _log(show, f"{out} is up to date (same settings and inputs); nothing to do")
        return dict(existing["summary"], up_to_date=True)

    est_bytes = sum(f.size * (COMPRESSED_RATIO if f.compression else 1) for f in files)
    tok = _get_tokenizer(files, cfg, est_bytes, show)
    dtype = shards.dtype_for_vocab(tok.vocab_size)
    tok.save(out / shards.TOKENIZER_FILE)

    workers = _n_workers(cfg, est_bytes)
    _log(show, f"tokenizing with {workers} process{'es' if workers > 1 else ''}")
    writers = {s: shards.ShardWriter(out, s, dtype, tok.eos_id, cfg.shard_tokens) for s in shards.SPLITS}
    reserve = _ValReserve(cfg.min_val_documents, cfg.min_val_tokens)
    seen: set[bytes] = set()
    skipped: Counter = Counter()
    stats = ReadStats(unsupported_files=stats.unsupported_files, binary_files=stats.binary_files, unreadable_files=stats.unreadable_files)
    try:
        with _bar(show, sum(f.size for f in files), "tokenizing") as bar:
            for digest, n_bytes, ids, reason in _tokenized_documents(files, cfg, tok, dtype, workers, stats):
                if stats.bytes_read > bar.n:
                    bar.update(stats.bytes_read - bar.n)
                if reason is None and cfg.dedup:
                    if digest in seen:
                        reason = "duplicates"
                    else:
                        seen.add(digest)
                if reason is not None:
                    skipped[reason] += 1
                    continue
                score = clean.split_score(digest, cfg.seed)
                # a document longer than min_val_tokens is never held out whole: it waits in the
                # reserve (its low score first in line), and only its end goes to validation
                if score < cfg.val_fraction and not (cfg.min_val_tokens and len(ids) >= cfg.min_val_tokens):
                    writers["val"].add(ids, n_bytes)
                    continue
                for evicted in reserve.offer(score, ids, n_bytes):
                    writers["train"].add(*evicted)
        cut = _top_up_validation(reserve, writers, cfg, tok)
        splits = {s: w.close() for s, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        for p in out.glob("*.tmp"):
            p.unlink(missing_ok=True)
        raise

    total_docs = splits["train"]["documents"] + splits["val"]["documents"]
    skipped_all = {**stats.skipped(), "duplicates": 0, "too_short": 0, "tokens_per_char": 0, **skipped}
    if total_docs == 0:
        raise UserError(f"no usable documents in the inputs (skipped: {_fmt_counts(skipped_all)})")
    if splits["train"]["documents"] == 0:
        raise UserError(f"all {total_docs} documents went to validation; lower val_fraction / min_val_documents or add data")
    seconds = time.perf_counter() - t0
    input_bytes = sum(f.size for f in files)
    summary = {
        "out": str(out),
        "documents": {s: splits[s]["documents"] for s in shards.SPLITS},
        "tokens": {s: splits[s]["tokens"] for s in shards.SPLITS},
        "bytes": {s: splits[s]["bytes"] for s in shards.SPLITS},
        "skipped": skipped_all,
        "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "dtype": dtype},
        "input_files": len(files),
        "input_bytes": input_bytes,
        "seconds": round(seconds, 2),
        "mb_per_s": round(input_bytes / 1e6 / max(seconds, 1e-9), 2),
        "workers": workers,
        "up_to_date": False,
        "val_documents_cut": cut,
        "warnings": _val_warnings(splits, cfg),
    }
    manifest = {
        "format": shards.FORMAT,
        "settings": settings,
        "settings_hash": settings_hash,
        "tokenizer": {"file": shards.TOKENIZER_FILE, "kind": tok.kind, "sha256": tok.sha256, "vocab_size": tok.vocab_size},
        "dtype": dtype,
        "separator_id": tok.eos_id,
        "splits": splits,
        "skipped": skipped_all,
        "inputs": input_list,
        "summary": summary,
    }
    shards.write_manifest(out, manifest)
    return summary


def _val_warnings(splits: dict, cfg: PrepareConfig) -> list[str]:
    val, total = splits["val"]["tokens"], splits["val"]["tokens"] + splits["train"]["tokens"]
    if val >= cfg.min_val_tokens:
        return []
    return [
        f"validation holds only {val:,} tokens, fewer than min_val_tokens={cfg.min_val_tokens:,} (the corpus has {total:,}; "
        f"validation takes at most {MAX_VAL_SHARE:.0%} of it): evaluations score at most that many tokens, so their numbers are noisy"
    ]


def _fmt_counts(counts: dict) -> str:
    parts = [f"{v} {k.replace('_', ' ')}" for k, v in counts.items() if v]
    return ", ".join(parts) or "nothing"


def format_summary(s: dict) -> str:
    tr, va = "train", "val"
    lines = [
        f"prepared {s['out']}" + (" (already up to date)" if s.get("up_to_date") else ""),
        f"  train: {s['documents'][tr]:,} documents, {s['tokens'][tr]:,} tokens, {s['bytes'][tr]:,} bytes",
        f"  val:   {s['documents'][va]:,} documents, {s['tokens'][va]:,} tokens (held out), {s['bytes'][va]:,} bytes"
        + (f"; {s['val_documents_cut']} long document(s) cut to reach it" if s.get("val_documents_cut") else ""),
        f"  tokenizer: {s['tokenizer']['kind']}, vocabulary {s['tokenizer']['vocab_size']:,}, shards {s['tokenizer']['dtype']}",
        f"  skipped: {_fmt_counts(s['skipped'])}",
        f"  {s['input_bytes'] / 1e6:.1f} MB from {s['input_files']} files in {s['seconds']:.1f} s ({s['mb_per_s']:.2f} MB/s, {s['workers']} workers)",
    ]
    lines += [f"  warning: {w}" for w in s.get("warnings", [])]
    return "\n".join(lines)


def prepare_command(args) -> int:
    from budgetlm.flags import print_config, settings_from_args

    cfg = settings_from_args(PrepareConfig, args)
    if args.print_config:
        print_config(cfg, args.json)
        return 0
    summary = prepare(args.inputs, args.out, cfg, force=args.force)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0
