"""The fast encoding path of `data prepare` (`budgetlm.data.chunk_cache`) gives exactly the
tokenizer's own ids: shards and manifest byte-identical to encoding every document whole."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from test_data_prepare import DOCS

from budgetlm.config import PrepareConfig
from budgetlm.data import chunk_cache
from budgetlm.data import prepare as prepare_module
from budgetlm.data.chunk_cache import KEY_BYTES, WHITESPACE, ChunkCache, chunk_bounds
from budgetlm.data.prepare import prepare
from budgetlm.data.tokenizer import Tokenizer, train_tokenizer

# scripts, marks, symbols and spacing that a regular-expression split can get wrong
TRICKY = [
    "नमस्ते दुनिया, हिन्दी में मात्राएँ और संयुक्ताक्षर",
    "مرحبا بالعالم ١٢٣ والأرقام العربية",
    "ภาษาไทยไม่มีช่องว่างระหว่างคำ",
    "한국어 텍스트와 숫자 123",
    "Family: 👨‍👩‍👧‍👦, flags 🇫🇷🇩🇪, skin 👍🏽 and keycaps 1️⃣",
    "non\u00a0breaking\u2009thin\u3000ideographic\u2028line\u2029para spaces",
    "double  space   triple    and\ttab\t\tand trailing dots...",
    "It's we're they've I'm you'll he'd O'Neil's 'quoted' ''",
    "x\u0301\u0327 combining marks stacked ǅ Ǆ ﬁ ligature ２ fullwidth",
    "numbers 3.14159 1,000,000 ½ ² ⅷ 〇 and 𝟙𝟚𝟛",
    "code: def f(x):\n    return x**2  # comment\n\n\tif a<b>c: pass",
    "mixed\r\nline\rendings\nand \n \n spaces around newlines \n",
]


def test_chunk_cache_equals_the_tokenizer_on_tricky_text():
    texts = TRICKY + DOCS
    tok = train_tokenizer("bpe", texts * 3, 400)
    assert chunk_cache.supports(tok)
    cache = ChunkCache(tok, "uint16", max_chunks=40)  # small: it empties itself many times on the way
    want = [np.asarray(ids, dtype=np.uint16) for ids in tok.encode_batch(texts)]
    batches = [texts[i : i + 4] for i in range(0, len(texts), 4)]
    for _ in range(2):  # cold, then warm
        got = [ids for batch in batches for ids in cache.encode_batch(batch)]
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
    # memory: at most max_chunks, or the distinct chunks of one batch when a batch alone holds more
    per_batch = max(len(set(chunks(batch))) for batch in batches)
    assert len(cache) <= max(40, per_batch)
    assert not chunk_cache.supports(train_tokenizer("wordpiece", texts, 400))


def chunks(texts: list[str]) -> list[str]:
    data = [t.encode("utf-8") for t in texts]
    buf = np.frombuffer(b"".join(data), dtype=np.uint8)
    starts = chunk_bounds(buf, np.cumsum([0] + [len(d) for d in data[:-1]]))
    return [bytes(buf[a:b]).decode("utf-8") for a, b in zip(starts, np.append(starts[1:], len(buf)))]


def test_whitespace_is_unicode_white_space_as_the_tokenizer_splits_it():
    assert set(WHITESPACE) == {chr(c) for c in range(0x110000) if chr(c).isspace()} - set("\x1c\x1d\x1e\x1f")
    pieces = train_tokenizer("bpe", ["a b"] * 3, 300).hf.pre_tokenizer
    for c in map(chr, range(0x3001)):  # every White_Space character is below U+3001
        text = f"a{c}{c}b"
        second = [text[a:b] for _, (a, b) in pieces.pre_tokenize_str(text)][1:2]
        assert (second == [c]) == (c in WHITESPACE), repr(c)  # `\s+(?!\S)` leaves the last whitespace to the next piece


def test_chunks_are_cut_where_the_tokenizer_cuts_pieces():
    # every whitespace character (and Python's others, U+001C-U+001F) after, before and between
    # others, doubled, at the ends, next to punctuation, digits, contractions and multi-byte
    # letters whose UTF-8 bytes resemble whitespace's (U+2080, U+00C2, U+3001)
    rng = random.Random(0)
    alphabet = list(WHITESPACE) + list("\x1c\x1fab9.,'-\u2080\u00c2\u3001\u1681\u0301x") + ["\U0001f600", "'s", "'ll"]
    texts = TRICKY + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(400)]
    data = [t.encode("utf-8") for t in texts]
    buf = np.frombuffer(b"".join(data), dtype=np.uint8)
    doc_starts = np.cumsum([0] + [len(d) for d in data[:-1]])
    starts = set(chunk_bounds(buf, doc_starts).tolist())
    pieces = train_tokenizer("bpe", texts, 300).hf.pre_tokenizer
    for text, at in zip(texts, doc_starts.tolist()):
        piece_starts = {at + len(text[:o].encode("utf-8")) for _, (o, _) in pieces.pre_tokenize_str(text)}
        mine = {s for s in starts if at <= s < at + len(text.encode("utf-8"))}
        assert mine <= piece_starts, text  # every chunk is whole pieces
    assert len(starts) > 0.7 * sum(len(pieces.pre_tokenize_str(t)) for t in texts)  # and most pieces are chunks


def test_chunk_cache_keys_at_the_word_boundaries_and_long_chunks():
    # chunks of 7-9 and 15-17 bytes straddle the two key words and the short/long split; a long chunk
    # must not be confused with a short one sharing its first 16 bytes, nor two short ones sharing 8
    words = ["a" * n for n in range(1, 3 * KEY_BYTES)] + ["ab" * n + "c" for n in range(3, 12)] + ["é" * n for n in range(1, 12)]
    words += ["a" + "\x00" * n for n in range(1, 3 * KEY_BYTES)]  # NUL bytes after a chunk are part of its key
    texts = [" ".join(words[i:] + words[:i]) for i in range(0, len(words), 5)] + ["", " ", "x"]
    tok = train_tokenizer("bpe", texts * 3, 300)
    want = [np.asarray(ids, dtype=np.uint16) for ids in tok.encode_batch(texts)]
    for max_chunks in (8, 10_000):
        cache = ChunkCache(tok, "uint16", max_chunks=max_chunks)
        for _ in range(2):
            got = [ids for i in range(0, len(texts), 3) for ids in cache.encode_batch(texts[i : i + 3])]
            assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("settings", [{}, {"lowercase": True, "normalization": "NFKC"}], ids=["default", "lower-nfkc"])
def test_prepare_output_is_byte_identical_to_encoding_whole_documents(sample_text_dir, tmp_path, monkeypatch, settings):
    jsonl = tmp_path / "tricky.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in TRICKY * 2 + DOCS), encoding="utf-8")
    cfg = PrepareConfig(vocab_size=512, workers=1, txt_document_chars=4096, val_fraction=0.05, **settings)
    outs = {}
    for fast in (True, False):
        monkeypatch.setattr(prepare_module, "FAST_ENCODE", fast)
        outs[fast] = tmp_path / f"fast-{fast}"
        prepare([str(sample_text_dir), str(jsonl)], outs[fast], cfg, show_progress=False)
    for name in sorted(p.name for p in outs[False].iterdir()):
        a, b = (outs[True] / name).read_bytes(), (outs[False] / name).read_bytes()
        if name == "manifest.json":  # identical but for the timings of the summary
            a, b = (json.loads(x) for x in (a, b))
            for m in (a, b):
                m["summary"] = {k: v for k, v in m["summary"].items() if k not in ("out", "seconds", "mb_per_s")}
        assert a == b, name
    assert Tokenizer.load(outs[True]).sha256 == Tokenizer.load(outs[False]).sha256
    assert sum(1 for p in Path(outs[True]).glob("*.bin")) >= 2
