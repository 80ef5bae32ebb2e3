"""Tokenizer: exact round trips for both kinds, special tokens, word alignment, files."""

from __future__ import annotations

import pytest

from budgetlm.data.clean import clean_text
from budgetlm.data.tokenizer import Tokenizer, default_vocab_size, train_tokenizer
from budgetlm.errors import UserError

TRICKY = [
    "Hello  world,\n\tthe end.",
    "  leading spaces and trailing   ",
    "a ## b #### c ##d",
    "café naïve — “quoted” … ½",
    "日本語のテキスト and emoji 🎉🎉",
    "line one\n\n\nline four\n",
    "x" * 300 + " long word",
    "tabs\t\tand\u00a0non-breaking\u2009thin spaces",
    "numbers 3.14159, 2,718; code: def f(x): return x**2  # comment",
    "a document that mentions <|endoftext|>, [SEP] and [MASK] as plain text",
]


@pytest.fixture(scope="module")
def corpus(sample_text_dir):
    texts = [p.read_text(encoding="utf-8-sig") for p in sorted(sample_text_dir.rglob("*.txt"))]
    return [clean_text(t) for t in texts] + TRICKY


@pytest.fixture(scope="module", params=["bpe", "wordpiece"])
def tok(request, corpus):
    return train_tokenizer(request.param, iter(corpus), vocab_size=600)


def test_round_trip_is_exact_on_real_and_tricky_text(tok, corpus):
    for text in corpus:
        assert tok.decode(tok.encode(text)) == text


def test_bpe_round_trips_characters_never_seen_in_training(corpus):
    bpe = train_tokenizer("bpe", iter(corpus[:2]), vocab_size=400)
    unseen = "Ωμέγα ∀x∈ℝ 🦀 \u0000-free ǅ"
    assert bpe.decode(bpe.encode(unseen)) == unseen


def test_wordpiece_unseen_characters_become_unk_and_ascii_is_always_covered(corpus):
    wp = train_tokenizer("wordpiece", iter(["only lowercase letters here"]), vocab_size=200)
    ascii_text = "ASCII {like} code[0] = 42; ~`|\\"
    assert wp.decode(wp.encode(ascii_text)) == ascii_text  # printable ASCII is in the base alphabet
    assert wp.unk_id in wp.encode("🦀")


def test_special_tokens(tok):
    assert tok.eos_id == tok.sep_id
    assert {tok.eos_id, tok.pad_id, tok.mask_id} <= tok.special_ids
    assert len({tok.eos_id, tok.pad_id, tok.mask_id}) == 3
    if tok.kind == "bpe":
        assert tok.hf.id_to_token(tok.eos_id) == "<|endoftext|>" and tok.cls_id is None and tok.unk_id is None
    else:
        assert tok.hf.id_to_token(tok.eos_id) == "[SEP]"
        assert tok.cls_id is not None and tok.unk_id is not None and {tok.cls_id, tok.unk_id} <= tok.special_ids
    # encode never adds specials; the text form of a special token is still one token
    assert not set(tok.encode("plain words")) & tok.special_ids
    assert tok.vocab_size <= 600


def test_encode_words_aligns_subwords_to_words(tok):
    words = ["Prospero", "commands", "the", "tempest", "!"]
    ids, word_ids = tok.encode_words(words)
    assert len(ids) == len(word_ids) and len(ids) >= len(words)
    assert sorted(set(word_ids)) == list(range(len(words))) and word_ids == sorted(word_ids)
    assert ids == tok.encode(" ".join(words))
    first = [i for i, w in zip(ids, word_ids) if w == 1]
    assert tok.decode(first) == " commands"  # words after the first carry their leading space


def test_save_load_and_sha256(tok, tmp_path):
    path = tok.save(tmp_path)
    assert path.name == "tokenizer.json"
    again = Tokenizer.load(tmp_path)
    assert again.sha256 == tok.sha256 and again.kind == tok.kind and again.vocab_size == tok.vocab_size
    assert again.encode("To be, or not to be") == tok.encode("To be, or not to be")
    assert Tokenizer.load(path).sha256 == tok.sha256


def test_load_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Tokenizer.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="not a valid tokenizer"):
        Tokenizer.load(bad)
    bad.write_text('{"version": "1.0"}', encoding="utf-8")
    with pytest.raises(UserError, match="not a valid tokenizer"):
        Tokenizer.load(bad)


def test_normaliser_travels_with_the_tokenizer():
    tok = train_tokenizer("bpe", iter(["Some Text to train on"] * 5), vocab_size=300, normalization="NFC", lowercase=True)
    assert tok.encode("CAFE\u0301") == tok.encode("café")  # lowercased and composed inside the tokenizer


def test_default_vocab_grows_with_corpus():
    sizes = [default_vocab_size(b) for b in (10_000, 10 << 20, 500 << 20, 20 << 30)]
    assert sizes == sorted(sizes) and sizes[0] <= 8192 and sizes[-1] == 32768


def test_unknown_kind():
    with pytest.raises(UserError, match="unknown tokenizer kind"):
        train_tokenizer("unigram", iter(["x"]), 100)


def test_special_token_text_inside_a_document_is_not_a_special_token(tok):
    ids = tok.encode("before <|endoftext|> [SEP] [MASK] after")
    assert not set(ids) & tok.special_ids
