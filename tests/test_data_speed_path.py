"""The fast encoding path of `data prepare` (`budgetlm.data.chunk_cache`) gives exactly the
tokenizer's own ids: shards and manifest byte-identical to encoding every document whole."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_data_prepare import DOCS

from budgetlm.config import PrepareConfig
from budgetlm.data import chunk_cache
from budgetlm.data import prepare as prepare_module
from budgetlm.data.chunk_cache import CHUNK, ChunkCache
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
    per_batch = max(len({c for t in batch for c in CHUNK.findall(t)}) for batch in batches)
    assert len(cache._index) <= max(40, per_batch)
    assert not chunk_cache.supports(train_tokenizer("wordpiece", texts, 400))


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
