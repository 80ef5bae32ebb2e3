"""Deriving a smaller vocabulary from prepared data: the cut tokenizer equals one trained to that
size, the re-encoded data equals data prepared with it, and the result is cached."""

from __future__ import annotations

import json

import pytest

from budgetlm.config import PrepareConfig
from budgetlm.data.dataset import PreparedData
from budgetlm.data.prepare import prepare
from budgetlm.data.vocab import derive_vocabulary, derived_path, truncate_bpe
from budgetlm.errors import UserError


@pytest.fixture(scope="module")
def prepared_400(sample_text_dir, tmp_path_factory):
    """The sample prepared directly with a 400-token BPE, with the same settings as `prepared_bpe` (512)."""
    out = tmp_path_factory.mktemp("prepared_400") / "data"
    cfg = PrepareConfig(vocab_size=400, txt_document_chars=4096, val_fraction=0.05, workers=1, min_val_tokens=0)
    prepare([str(sample_text_dir)], out, cfg, show_progress=False)
    return PreparedData(out)


def test_cut_tokenizer_is_the_one_trained_to_that_size(prepared_bpe, prepared_400):
    cut = truncate_bpe(PreparedData(prepared_bpe).tokenizer, 400)
    direct = prepared_400.tokenizer
    assert cut.vocab_size == direct.vocab_size == 400
    assert json.loads(cut.to_str())["model"]["merges"] == json.loads(direct.to_str())["model"]["merges"]
    text = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate."
    assert cut.encode(text) == direct.encode(text) and cut.decode(cut.encode(text)) == text


def test_derived_data_equals_data_prepared_with_the_small_vocabulary(prepared_bpe, prepared_400):
    derived = derive_vocabulary(PreparedData(prepared_bpe), 400)
    assert derived.path == derived_path(PreparedData(prepared_bpe), 400)
    for split in ("train", "val"):
        a, b = derived.tokens(split), prepared_400.tokens(split)
        assert len(a) == len(b) and (a.get(0, len(a)) == b.get(0, len(b))).all()
        assert derived.split(split)["bytes"] == prepared_400.split(split)["bytes"]
        assert derived.split(split)["documents"] == prepared_400.split(split)["documents"]
    derived.verify()  # shard hashes and tokenizer match the manifest
    mtime = (derived.path / "manifest.json").stat().st_mtime_ns
    assert derive_vocabulary(PreparedData(prepared_bpe), 400).path == derived.path
    assert (derived.path / "manifest.json").stat().st_mtime_ns == mtime  # cached, not rebuilt


def test_partial_derivation_samples_the_whole_corpus_and_grows_on_demand(prepared_bpe, tmp_path, monkeypatch):
    import shutil

    from budgetlm.data import vocab

    monkeypatch.setattr(vocab, "MIN_PARTIAL_TOKENS", 0)
    data = PreparedData(shutil.copytree(prepared_bpe, tmp_path / "data", ignore=shutil.ignore_patterns("vocab-*")))
    total = len(data.tokens("train"))
    part = derive_vocabulary(data, 300, max_train_tokens=total // 3)
    covered = len(part.tokens("train"))
    assert 0 < covered < total  # fewer train tokens, but whole documents from across the split
    assert len(part.tokens("val")) > 0 and part.split("val")["bytes"] == data.split("val")["bytes"]
    more = derive_vocabulary(data, 300, max_train_tokens=total)
    assert len(more.tokens("train")) > covered


def test_wordpiece_and_out_of_range_sizes_are_refused(prepared_bpe, prepared_wordpiece):
    with pytest.raises(UserError, match="cannot be cut"):
        truncate_bpe(PreparedData(prepared_wordpiece).tokenizer, 300)
    with pytest.raises(UserError, match="must have 259..512 tokens"):
        truncate_bpe(PreparedData(prepared_bpe).tokenizer, 600)
