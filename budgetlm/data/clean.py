"""Per-document cleaning: the exact text the model is trained on, and its content hash.

`clean_text` is the definition of "the normalised document": the round-trip guarantee of
`budgetlm data prepare` is that decoding a document's tokens gives back `clean_text(raw)`.
Steps, in order (each is idempotent, so cleaning twice changes nothing):

1. line endings: CRLF and lone CR become LF (Windows and old Mac files look alike afterwards);
2. control characters (Unicode category Cc) are removed except newline and tab, and so is
   the byte-order mark U+FEFF (Gutenberg files start with one);
3. Unicode normal form (NFC by default: composed accents, what most text already is; NFKC
   also folds compatibility forms such as ligatures and full-width letters);
4. optional lowercasing;
5. leading and trailing whitespace of the document is stripped.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

# C0 and C1 control characters except \t (0x09) and \n (0x0A), DEL, and the BOM
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")
_NEWLINES = re.compile("\r\n?")
DIGEST_BYTES = 16  # 128-bit content hashes: collisions are not a practical concern


def clean_text(text: str, normalization: str = "NFC", lowercase: bool = False) -> str:
    """The normalised form of one document (see the module docstring)."""
    if "\r" in text:
        text = _NEWLINES.sub("\n", text)
    text = _CONTROL.sub("", text)
    if normalization != "none" and not text.isascii():  # ASCII is already in every normal form
        text = unicodedata.normalize(normalization, text)
    if lowercase:
        text = text.lower()
    return text.strip()


def digest(text: str) -> bytes:
    """A 16-byte content hash of a cleaned document (dedup key and split key)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=DIGEST_BYTES).digest()


def split_score(doc_digest: bytes, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the document's content and the seed.

    A document goes to validation when its score is below `val_fraction`, so the split does
    not depend on input order, worker count or which other documents exist, and duplicates
    always land on the same side (no train/val leak through copies).
    """
    h = hashlib.blake2b(doc_digest, digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") / 2**64
