"""Held-out bits per byte, computed the same way for every system `bench/quality.py` compares.

A system hands over two things: how it turns the held-out documents into one token stream (the
way it tokenizes its training text: each document encoded whole and followed by its end-of-text
token) and a `logits = f(ids)` callable. The stream starts with one end-of-text token, so the
first document is predicted after a separator exactly like every other one. The stream is cut
into non-overlapping windows of the model's context length; every token after the leading
separator is predicted exactly once, from the tokens before it in its window. The summed
next-token negative log-likelihood is divided by ln 2 x the UTF-8 bytes of the held-out
documents, so systems with different tokenizers compare (each pays for its own separators).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F


def token_stream(docs: Iterable[str], encode_batch: Callable[[list[str]], list[list[int]]], eos_id: int, chunk: int = 256) -> list[int]:
    """[eos] + ids(doc_1) + [eos] + ids(doc_2) + [eos] + ...: documents encoded whole."""
    docs = list(docs)
    ids = [eos_id]
    for i in range(0, len(docs), chunk):
        for doc_ids in encode_batch(docs[i : i + chunk]):
            ids.extend(doc_ids)
            ids.append(eos_id)
    return ids


def utf8_bytes(docs: Iterable[str]) -> int:
    return sum(len(d.encode("utf-8")) for d in docs)


@torch.no_grad()
def bits_per_byte(logits_fn: Callable[[torch.Tensor], torch.Tensor], ids: Sequence[int], n_bytes: int, seq_len: int, batch_size: int = 16) -> dict:
    """Sum of next-token NLL over `ids[1:]`, windows of `seq_len` inputs, in bits per byte of `n_bytes`.

    `logits_fn` takes a (B, T) long tensor and returns (B, T, V) logits (V may exceed the
    tokenizer's vocabulary: padded rows are part of the model's softmax, as in training)."""
    if len(ids) < 2:
        raise ValueError("need at least two tokens to score")
    if n_bytes <= 0:
        raise ValueError("n_bytes must be positive")
    stream = torch.as_tensor(list(ids), dtype=torch.long)
    n_pred = len(stream) - 1
    n_full = n_pred // seq_len
    total = 0.0
    counted = 0

    def score(x: torch.Tensor, y: torch.Tensor) -> None:
        nonlocal total, counted
        logits = logits_fn(x).float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"))
        counted += y.numel()

    if n_full:
        windows = stream[: n_full * seq_len + 1]
        x_all = windows[:-1].view(n_full, seq_len)
        y_all = windows[1:].view(n_full, seq_len)
        for i in range(0, n_full, batch_size):
            score(x_all[i : i + batch_size], y_all[i : i + batch_size])
    start = n_full * seq_len
    if start < n_pred:  # the last, shorter window
        score(stream[start:n_pred].unsqueeze(0), stream[start + 1 :].unsqueeze(0))
    assert counted == n_pred
    return {
        "bpb": total / (math.log(2) * n_bytes),
        "nll_nats_per_token": total / n_pred,
        "tokens": n_pred,
        "bytes": n_bytes,
        "windows": n_full + (start < n_pred),
    }
