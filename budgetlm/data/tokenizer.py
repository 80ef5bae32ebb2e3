"""`Tokenizer`: a thin wrapper over Hugging Face `tokenizers` with exact round trips.

Two kinds, matching the two model objectives:

* ``bpe`` (causal): GPT-2 style byte-level BPE. Every byte sequence is representable, so
  ``decode(encode(text)) == text`` for any text. Special tokens: ``<|endoftext|>`` (the
  document separator and end-of-sequence), ``<|pad|>``, ``<|mask|>``.
* ``wordpiece`` (masked, BERT/Cramming): WordPiece with [PAD] [UNK] [CLS] [SEP] [MASK]. BERT's
  own set-up throws whitespace away; ours keeps it so the round trip is exact: spaces are
  attached to the next word as ``▁`` (Metaspace, as in SentencePiece), other whitespace
  characters (newline, tab) and punctuation are single-character words, and the decoder
  glues pieces back without inserting spaces. What does not round-trip: characters never seen
  when training (printable ASCII is always in the alphabet) and "words" longer than 1000
  characters (a base64 blob) become [UNK], and a literal ``▁`` (U+2581) decodes as a space.

The normaliser (Unicode form, lowercasing) is stored inside tokenizer.json, so text that did
not go through `budgetlm data prepare` (a prompt, a fine-tuning file) is normalised the same way.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from budgetlm.errors import UserError
from budgetlm.files import write_text_atomic

BPE_SPECIALS = ("<|endoftext|>", "<|pad|>", "<|mask|>")
WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
KINDS = ("bpe", "wordpiece")
METASPACE = "\u2581"
# printable ASCII and the common whitespace are always in the WordPiece alphabet, so code,
# markup and numbers never become [UNK] merely because the training sample lacked them
BASE_ALPHABET = [chr(c) for c in range(0x20, 0x7F)] + ["\n", "\t"]


def _tk():
    import tokenizers  # imported lazily: `budgetlm --help` must not pay for it

    return tokenizers


def build_normalizer(normalization: str = "NFC", lowercase: bool = False):
    """The tokenizer-side normaliser: same Unicode form and case as `clean.clean_text`."""
    norm = _tk().normalizers
    steps = {"NFC": [norm.NFC()], "NFKC": [norm.NFKC()], "none": []}[normalization]
    if lowercase:
        steps.append(norm.Lowercase())
    return norm.Sequence(steps) if steps else None


class Tokenizer:
    """A trained tokenizer; `encode` adds no special tokens, the caller places separators."""

    def __init__(self, hf_tokenizer, json_text: str | None = None, eos_token: str | None = None):
        self._tok = hf_tokenizer
        self._json = json_text if json_text is not None else hf_tokenizer.to_str()
        # text that happens to contain "<|endoftext|>" or "[SEP]" is encoded as those characters,
        # never as the special token: a document must not be able to forge a separator
        hf_tokenizer.encode_special_tokens = True
        vocab = hf_tokenizer.get_vocab(with_added_tokens=True)
        self._vocab = vocab
        spec = json.loads(self._json)
        self._specials = {t["content"] for t in spec.get("added_tokens") or [] if t.get("special")}
        own = next((t for t in ("<|endoftext|>", "[SEP]") if t in vocab), None)
        if own and eos_token and eos_token != own:
            raise UserError(f"this tokenizer has its own separator {own}; --eos-token is for tokenizers without <|endoftext|> or [SEP]")
        if own:
            self.kind, self.eos_token = ("bpe" if own == "<|endoftext|>" else "wordpiece"), own
            return
        # another tokenizer (Llama's, T5's, ...): the separator is the one named, or the one its
        # post-processor appends to a sequence (which `with_eos` records)
        eos = eos_token or declared_end_token(spec)
        if not eos:
            raise UserError("tokenizer has neither <|endoftext|> nor [SEP] nor a declared end token; name its separator with --eos-token (e.g. </s>)")
        if eos not in vocab:
            raise UserError(f"the separator {eos!r} is not in the tokenizer's vocabulary")
        self.kind = "wordpiece" if (spec.get("model") or {}).get("type") == "WordPiece" else "bpe"
        self.eos_token = eos

    # --- special tokens -----------------------------------------------------------------------
    def _id(self, token: str) -> int | None:
        return self._vocab.get(token)

    @property
    def eos_id(self) -> int:
        """The document separator (and end of sequence): <|endoftext|>, [SEP], or another tokenizer's end token."""
        return self._id(self.eos_token)

    @property
    def own(self) -> bool:
        """Trained by budgetlm (its special tokens), not brought from elsewhere."""
        return self.eos_token in ("<|endoftext|>", "[SEP]")

    def with_eos(self, token: str) -> Tokenizer:
        """This tokenizer with `token` as its separator, recorded in tokenizer.json as the token its
        post-processor appends (budgetlm encodes without post-processing, so encoding is unchanged)."""
        tok = Tokenizer(self._tok, self._json, eos_token=token)
        if declared_end_token(json.loads(self._json)) == token or tok.own:
            return tok
        hf = _tk().Tokenizer.from_str(self._json)
        eos_id = self._vocab[token]
        hf.post_processor = _tk().processors.TemplateProcessing(single=f"$A {token}", pair=f"$A {token} $B {token}", special_tokens=[(token, eos_id)])
        return Tokenizer(hf, eos_token=token)

    @property
    def sep_id(self) -> int:
        return self.eos_id

    @property
    def pad_id(self) -> int | None:
        return self._id("<|pad|>" if self.kind == "bpe" else "[PAD]")

    @property
    def mask_id(self) -> int | None:
        return self._id("<|mask|>" if self.kind == "bpe" else "[MASK]")

    @property
    def cls_id(self) -> int | None:
        return None if self.kind == "bpe" else self._id("[CLS]")

    @property
    def unk_id(self) -> int | None:
        return None if self.kind == "bpe" else self._id("[UNK]")

    @property
    def special_ids(self) -> set[int]:
        names = BPE_SPECIALS if self.kind == "bpe" else WORDPIECE_SPECIALS
        return {self._vocab[n] for n in (*names, *self._specials) if n in self._vocab}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def sha256(self) -> str:
        """Of the tokenizer.json bytes, so a run can check it uses the tokenizer of its data."""
        return hashlib.sha256(self._json.encode("utf-8")).hexdigest()

    @property
    def hf(self):
        """The underlying `tokenizers.Tokenizer` (for export)."""
        return self._tok

    # --- encode / decode ----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.21) skips computing offsets: ~20% faster
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def encode_words(self, words: list[str]) -> tuple[list[int], list[int]]:
        """Subword ids of `words` joined by single spaces, and for each id the index of its word.

        Words after the first get a leading space, so ids match `encode(" ".join(words))` and the
        way words look inside pretraining text (byte-level BPE has distinct ' word' tokens).
        """
        texts = [w if i == 0 else " " + w for i, w in enumerate(words)]
        ids: list[int] = []
        word_ids: list[int] = []
        for i, enc in enumerate(self._tok.encode_batch(texts, add_special_tokens=False)):
            ids.extend(enc.ids)
            word_ids.extend([i] * len(enc.ids))
        return ids, word_ids

    # --- files --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json (atomically); `path` is the file or a directory to hold it."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        return write_text_atomic(path, self._json)

    @classmethod
    def load(cls, path: str | os.PathLike, eos_token: str | None = None) -> Tokenizer:
        """Load tokenizer.json from a file, or from a directory that holds one."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"tokenizer file not found: {path}") from None
        except (UnicodeDecodeError, OSError) as e:
            raise UserError(f"cannot read tokenizer file {path}: {e}") from None
        try:
            json.loads(text)
            hf = _tk().Tokenizer.from_str(text)
        except Exception as e:  # the Rust parser raises a bare Exception on bad files
            raise UserError(f"{path} is not a valid tokenizer.json: {str(e).splitlines()[0][:200]}") from None
        return cls(hf, text, eos_token=eos_token or None)

    @classmethod
    def from_str(cls, text: str) -> Tokenizer:
        return cls(_tk().Tokenizer.from_str(text), text)

    def to_str(self) -> str:
        return self._json


def declared_end_token(spec: dict) -> str | None:
    """The token a tokenizer.json's post-processor appends to a single sequence (its end of sequence), if any."""
    pp = spec.get("post_processor") or {}
    for p in pp.get("processors", [pp]) if pp.get("type") == "Sequence" else [pp]:
        if p.get("type") in ("RobertaProcessing", "BertProcessing") and p.get("sep"):
            return p["sep"][0]
        if p.get("type") == "TemplateProcessing" and p.get("single"):
            last = p["single"][-1]
            if "SpecialToken" in last:
                return last["SpecialToken"]["id"]
    return None


def _bpe_tokenizer(normalizer):
    tk = _tk()
    tok = tk.Tokenizer(tk.models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    # add_prefix_space=False keeps the first word of a document byte-identical on decode
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tk.decoders.ByteLevel()
    return tok


def _wordpiece_tokenizer(normalizer):
    tk = _tk()
    pre, dec = tk.pre_tokenizers, tk.decoders
    tok = tk.Tokenizer(tk.models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=1000))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre.Sequence(
        [
            pre.Metaspace(replacement=METASPACE, prepend_scheme="never", split=True),  # ' word' -> '▁word'
            pre.Split(tk.Regex(r"[^\S ]"), behavior="isolated"),  # newline, tab, ... are words of their own
            pre.Punctuation(behavior="isolated"),
        ]
    )
    # '##' only ever starts a continuation piece (punctuation is isolated, so '#' is always a
    # one-character word), so deleting it and fusing the pieces is the exact inverse
    tok.decoder = dec.Sequence([dec.Replace("##", ""), dec.Fuse(), dec.Metaspace(replacement=METASPACE, prepend_scheme="never", split=True)])
    return tok


def default_vocab_size(corpus_bytes: int) -> int:
    """A vocabulary for the corpus size: small corpora cannot fill (or train) a large one.

    Roughly: a vocabulary should be seen often enough per entry to learn its embedding; the
    steps follow common practice (GPT-2 50k on 40 GB, Cramming 32k on ~20 GB, char-ish
    vocabularies for megabyte corpora as in nanoGPT's Shakespeare).
    """
    if corpus_bytes < 1 << 20:
        return 4096
    if corpus_bytes < 64 << 20:
        return 8192
    if corpus_bytes < 1 << 30:
        return 16384
    return 32768


def train_tokenizer(
    kind: str,
    texts: Iterable[str],
    vocab_size: int,
    normalization: str = "NFC",
    lowercase: bool = False,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a `kind` tokenizer from a stream of texts (consumed once, never held in full)."""
    if kind not in KINDS:
        raise UserError(f"unknown tokenizer kind '{kind}' (choose {' or '.join(KINDS)})")
    tk = _tk()
    normalizer = build_normalizer(normalization, lowercase)
    if kind == "bpe":
        tok = _bpe_tokenizer(normalizer)
        alphabet = tk.pre_tokenizers.ByteLevel.alphabet()
        specials = list(BPE_SPECIALS)
        floor = len(alphabet) + len(specials)
        trainer = tk.trainers.BpeTrainer(
            vocab_size=max(vocab_size, floor), min_frequency=min_frequency, special_tokens=specials,
            initial_alphabet=alphabet, show_progress=show_progress,
        )  # fmt: skip
    else:
        tok = _wordpiece_tokenizer(normalizer)
        specials = list(WORDPIECE_SPECIALS)
        trainer = tk.trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
            initial_alphabet=BASE_ALPHABET, continuing_subword_prefix="##", show_progress=show_progress,
        )  # fmt: skip
        texts = itertools.chain([_WORDPIECE_ALPHABET_TEXT], texts)
    tok.train_from_iterator(_nonempty(texts), trainer=trainer)
    return Tokenizer(tok)


# WordPiece needs each letter twice: as a word start ("a") and as a continuation ("##a"); the
# trainer only creates the forms it sees, so the base alphabet alone would leave "ASCII" as
# [UNK] after training on lowercase text. One-character words give the start forms and "▁x"
# words (a space, then x) the continuation forms, without adding any pair that repeats.
_ALNUM = [c for c in BASE_ALPHABET if c.isalnum()]
_WORDPIECE_ALPHABET_TEXT = "\n".join(_ALNUM) + "\n " + " ".join(_ALNUM)


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if t:
            yield t
