"""Shared fixtures: a small real corpus and data sets prepared from it, built once per session.

tests/data/shakespeare/ is a checked-in sample (about 290 KB, public domain) of the corpus that
`budgetlm data fetch shakespeare` downloads: five Shakespeare texts and one Milton text (the
Milton file keeps its original CRLF line endings, so cleaning is exercised on real input).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SAMPLE_DIR = Path(__file__).parent / "data" / "shakespeare"


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Tests neither read nor write the user's cache: timings and speed calibration recorded by real runs
    there would change what the tests' plans choose (tests that look at the cache set their own)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("BUDGETLM_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def sample_text_dir(tmp_path_factory) -> Path:
    """A private copy of the sample corpus (tests may add files to it without affecting others)."""
    dest = tmp_path_factory.mktemp("sample") / "shakespeare"
    shutil.copytree(SAMPLE_DIR, dest)
    return dest


def _prepare(sample_text_dir: Path, tmp_path_factory, name: str, **settings) -> Path:
    from budgetlm.config import PrepareConfig
    from budgetlm.data.prepare import prepare

    out = tmp_path_factory.mktemp(name) / "data"
    # small documents and a few percent held out, so the val split has several documents; split by
    # documents only (min_val_tokens=0): the token minimum has its own tests (test_data_validation)
    cfg = PrepareConfig(vocab_size=512, txt_document_chars=4096, val_fraction=0.05, workers=1, min_val_tokens=0, **settings)
    prepare([str(sample_text_dir)], out, cfg, show_progress=False)
    return out


@pytest.fixture(scope="session")
def prepared_bpe(sample_text_dir, tmp_path_factory) -> Path:
    """The sample prepared with a 512-token byte-level BPE (a PreparedData directory)."""
    return _prepare(sample_text_dir, tmp_path_factory, "prepared_bpe", tokenizer="bpe")


@pytest.fixture(scope="session")
def prepared_wordpiece(sample_text_dir, tmp_path_factory) -> Path:
    """The sample prepared with a 512-token WordPiece (a PreparedData directory)."""
    return _prepare(sample_text_dir, tmp_path_factory, "prepared_wordpiece", tokenizer="wordpiece")
