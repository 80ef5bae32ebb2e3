"""bench/scoring.py: the held-out bits-per-byte scorer shared by budgetlm and the Hugging Face baseline."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from scoring import bits_per_byte, token_stream, utf8_bytes  # noqa: E402


def test_uniform_model_scores_log2_vocab_per_token():
    V, T = 300, 16
    ids = [7] * 101  # 100 predicted tokens: 6 full windows of 16 and a last one of 4
    seen = []

    def uniform(x):
        seen.append(tuple(x.shape))
        return torch.zeros(*x.shape, V)

    out = bits_per_byte(uniform, ids, n_bytes=250, seq_len=T, batch_size=4)
    assert out["tokens"] == 100 and out["windows"] == 7
    assert out["bpb"] == pytest.approx(math.log2(V) * 100 / 250, rel=1e-6)
    assert seen == [(4, T), (2, T), (1, 4)]  # batched full windows, then the short last one


def test_every_token_is_predicted_once_from_its_own_window():
    V, T = 10, 5
    ids = [i % V for i in range(23)]
    targets = []

    def next_token_oracle(x):  # certain that token t is followed by t+1: loss ~0 wherever it is right
        assert x.shape[1] <= T
        logits = torch.full((*x.shape, V), -1e4)
        logits.scatter_(2, ((x + 1) % V).unsqueeze(-1), 1e4)
        targets.extend(((x + 1) % V).flatten().tolist())
        return logits

    out = bits_per_byte(next_token_oracle, ids, n_bytes=30, seq_len=T)
    assert out["bpb"] == pytest.approx(0.0, abs=1e-6)
    assert targets == ids[1:]


def test_wrong_certain_predictions_cost_what_they_should():
    V, T = 4, 3
    ids = [0, 1, 2, 3, 0]

    def always_zero(x):  # log-probability 0 on token 0, -inf elsewhere (but finite)
        logits = torch.full((*x.shape, V), -30.0)
        logits[..., 0] = 0.0
        return logits

    out = bits_per_byte(always_zero, ids, n_bytes=4, seq_len=T)
    nll_wrong = -torch.log_softmax(torch.tensor([0.0, -30.0, -30.0, -30.0]), 0)[1].item()
    nll_right = -torch.log_softmax(torch.tensor([0.0, -30.0, -30.0, -30.0]), 0)[0].item()
    assert out["bpb"] == pytest.approx((3 * nll_wrong + nll_right) / math.log(2) / 4, rel=1e-5)


def test_token_stream_encodes_documents_whole_with_separators():
    calls = []

    def encode_batch(texts):
        calls.append(list(texts))
        return [[ord(c) for c in t] for t in texts]

    docs = ["ab\n\ncd", "é"]
    assert token_stream(docs, encode_batch, eos_id=0, chunk=1) == [0, 97, 98, 10, 10, 99, 100, 0, 233, 0]
    assert calls == [["ab\n\ncd"], ["é"]]  # whole documents, never lines
    assert utf8_bytes(docs) == 6 + 2


def test_bad_inputs():
    with pytest.raises(ValueError):
        bits_per_byte(lambda x: torch.zeros(*x.shape, 2), [1], n_bytes=1, seq_len=4)
    with pytest.raises(ValueError):
        bits_per_byte(lambda x: torch.zeros(*x.shape, 2), [1, 1], n_bytes=0, seq_len=4)
