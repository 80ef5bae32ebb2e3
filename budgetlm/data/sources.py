"""Input discovery and readers: files and folders -> a stream of raw documents.

Formats (by extension, optionally followed by .gz or .zst):

* ``.txt``      one document per file, except that files longer than ``txt_document_chars``
                are cut into documents of about that size at blank lines (paragraph groups).
                Without that, a corpus of a few dozen books (Shakespeare) would hold out one
                or two whole books for validation, or none; with it the split samples
                passages from every book. Set ``txt_document_chars=0`` for one per file.
* ``.jsonl``    one JSON object per line, text in ``text_field``.
* ``.csv`` ``.tsv``  text in ``text_column`` (a header name, or a 0-based index).
* ``.parquet``  text in ``text_column``; streamed one row group at a time.
* ``.arrow``    Arrow IPC (stream or file) as Hugging Face `datasets` writes it; text in
                ``text_field`` (when that field is missing and the table has exactly one string
                column, that one); streamed one record batch at a time, read with pyarrow alone.
* a folder written by `datasets`' ``save_to_disk`` (``state.json`` + ``dataset_info.json`` +
  ``data-*.arrow``): its arrow files in the order ``state.json`` lists them; a ``DatasetDict``
  folder (``dataset_dict.json``) gives its ``train`` split (name another one as FOLDER/SPLIT).
* ``hf:NAME[:SPLIT]``  a dataset on the Hugging Face Hub, streamed with the `datasets` library
  (split ``train`` by default); needs the network, so it is refused with one line offline.

Everything is streamed: memory does not grow with the corpus (one txt document, one csv row or
one parquet row group at a time). Folders are walked recursively in sorted order (so the output
is deterministic); hidden files are ignored and unsupported files counted. Problems the user
must fix (a missing path, a binary file named explicitly, a missing field or column) raise
`UserError` before any work starts; damage inside a good corpus (undecodable bytes, bad rows,
a binary file inside a folder) is skipped and counted in `ReadStats`.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from budgetlm.errors import UserError

FORMATS = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".arrow": "arrow"}
HF_PREFIX = "hf:"
HF_DATASET_FILES = ("state.json", "dataset_info.json")  # what save_to_disk writes beside the arrow files
COMPRESSIONS = (".gz", ".zst")
SNIFF_BYTES = 8192
READ_CHUNK = 1 << 20
# paragraph boundary: a newline followed by one or more blank (or whitespace-only) lines
_BLANK_LINES = re.compile(r"\r?\n(?:[ \t]*\r?\n)+")
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

# Undecodable bytes are dropped and counted. A codec error handler is the only hook that sees
# them while streaming (TextIOWrapper, csv and the incremental decoder all go through it).
_undecodable = [0]


def _skip_and_count(err: UnicodeDecodeError):
    _undecodable[0] += err.end - err.start
    return "", err.end


codecs.register_error("budgetlm-skip", _skip_and_count)


@dataclass
class InputFile:
    path: Path
    format: str  # txt | jsonl | csv | tsv | parquet | arrow | hf (a Hub dataset: path holds "NAME:SPLIT")
    compression: str  # "" | ".gz" | ".zst"
    size: int
    explicit: bool  # named on the command line (errors are the user's to fix) vs found in a folder
    text_field: str = ""  # a Hub dataset's text field, once checked

    def describe(self) -> dict:
        return {"path": str(self.path), "format": self.format + self.compression, "bytes": self.size}

    @property
    def hub_name(self) -> tuple[str, str]:
        name, _, split = str(self.path).rpartition(":")
        return name, split


@dataclass
class ReadStats:
    bytes_read: int = 0  # input bytes consumed (compressed size for .gz/.zst), for progress and MB/s
    files: int = 0
    bad_rows: int = 0
    undecodable_bytes: int = 0
    binary_files: int = 0
    unreadable_files: int = 0
    unsupported_files: int = 0

    def skipped(self) -> dict:
        d = asdict(self)
        for k in ("bytes_read", "files"):
            d.pop(k)
        return d


def input_format(path: Path) -> tuple[str, str] | None:
    """(format, compression) from the file name, or None when unsupported."""
    name = path.name.lower()
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), "")
    stem = name[: len(name) - len(compression)]
    fmt = FORMATS.get(Path(stem).suffix)
    return (fmt, compression) if fmt else None


def discover(inputs: list[str], stats: ReadStats) -> list[InputFile]:
    """Expand files and folders (recursively) into supported input files, in a stable order."""
    files: list[InputFile] = []
    seen: set[Path] = set()
    supported = ", ".join(sorted(FORMATS)) + " (optionally .gz/.zst)"
    for raw in inputs:
        if raw.startswith(HF_PREFIX):
            files.append(_hub_input(raw))
            continue
        path = Path(raw).expanduser()
        if not path.exists():
            raise UserError(f"input not found: {raw}")
        saved = saved_dataset_files(path) if path.is_dir() else None
        if saved is not None:
            for p in saved:
                if p.resolve() not in seen:
                    seen.add(p.resolve())
                    files.append(InputFile(p, "arrow", "", p.stat().st_size, explicit=True))
            continue
        if path.is_dir():
            found = 0
            for p in sorted(path.rglob("*")):
                rel = p.relative_to(path)
                if any(part.startswith(".") for part in rel.parts) or not p.is_file():
                    continue
                kind = input_format(p)
                if kind is None:
                    stats.unsupported_files += 1
                    continue
                found += 1
                if p.resolve() not in seen:
                    seen.add(p.resolve())
                    files.append(InputFile(p, kind[0], kind[1], p.stat().st_size, explicit=False))
            if not found:
                raise UserError(f"no usable input files in folder {raw} (supported: {supported})")
        else:
            kind = input_format(path)
            if kind is None:
                raise UserError(f"unsupported input file {raw} (supported: {supported})")
            if kind[0] in ("parquet", "arrow") and kind[1]:
                raise UserError(f"{raw}: compressed {kind[0]} is not supported ({kind[0]} compresses internally; decompress it first)")
            if path.resolve() not in seen:
                seen.add(path.resolve())
                files.append(InputFile(path, kind[0], kind[1], path.stat().st_size, explicit=True))
    return files


def saved_dataset_files(path: Path) -> list[Path] | None:
    """The arrow files of a folder written by `datasets`' `save_to_disk`, in order; None for other folders."""
    dict_file = path / "dataset_dict.json"
    if dict_file.is_file() and not (path / "state.json").is_file():
        try:
            splits = json.loads(dict_file.read_text(encoding="utf-8"))["splits"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise UserError(f"{dict_file} is damaged (no list of splits)") from None
        if "train" not in splits:
            raise UserError(f"{path} is a DatasetDict without a 'train' split; name one: {', '.join(str(path / s) for s in splits)}")
        return saved_dataset_files(path / "train") or []
    if not all((path / name).is_file() for name in HF_DATASET_FILES):
        return None
    try:
        listed = [d["filename"] for d in json.loads((path / "state.json").read_text(encoding="utf-8"))["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(f"{path / 'state.json'} is damaged (no _data_files list); save the dataset again") from None
    files = [path / name for name in listed]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise UserError(f"{path}: arrow file {missing[0]} listed in state.json is missing")
    if not files:
        raise UserError(f"{path}: the saved dataset holds no arrow files")
    return files


def _hub_input(raw: str) -> InputFile:
    spec = raw[len(HF_PREFIX) :]
    name, _, split = spec.partition(":")
    if not name:
        raise UserError(f"{raw}: name a dataset, e.g. hf:roneneldan/TinyStories or hf:wikitext/wikitext-2-raw-v1:validation")
    return InputFile(Path(f"{name}:{split or 'train'}"), "hf", "", 0, explicit=True)


# ---------------------------------------------------------------------------------------------
# opening: compressed or not, counting the input bytes consumed


class _CountingRaw(io.RawIOBase):
    """A raw file that adds every byte it reads to `stats.bytes_read` (progress and MB/s)."""

    def __init__(self, path: Path, stats: ReadStats):
        self._f = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by close())
        self._stats = stats

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self._f.readinto(buf) or 0
        self._stats.bytes_read += n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def open_binary(f: InputFile, stats: ReadStats):
    """The decompressed byte stream of an input file."""
    raw = io.BufferedReader(_CountingRaw(f.path, stats), READ_CHUNK)
    if f.compression == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if f.compression == ".zst":
        try:
            import zstandard
        except ImportError:
            raise UserError(f"{f.path}: reading .zst needs the 'zstandard' package (pip install 'budgetlm[data]')") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True), READ_CHUNK)
    return raw


def _open_text(f: InputFile, stats: ReadStats, newline: str | None = None):
    # utf-8-sig drops a leading byte-order mark, which would otherwise glue onto a csv header
    return io.TextIOWrapper(open_binary(f, stats), encoding="utf-8-sig", errors="budgetlm-skip", newline=newline)


# ---------------------------------------------------------------------------------------------
# checks before any work: a user error should come before minutes of tokenizer training


_READ_ERRORS = (OSError, EOFError, ValueError)  # gzip.BadGzipFile is an OSError; zstd errors are ValueError-like


def _zstd_errors() -> tuple:
    try:
        import zstandard

        return (zstandard.ZstdError,)
    except ImportError:
        return ()


def check_file(f: InputFile, cfg, stats: ReadStats) -> bool:
    """Validate one input; False = skip it (counted), UserError = the user must fix it."""

    def bad(reason: str, counter: str) -> bool:
        if f.explicit:
            raise UserError(f"{f.path}: {reason}")
        setattr(stats, counter, getattr(stats, counter) + 1)
        return False

    if f.format == "parquet":
        return _check_parquet(f, cfg)
    if f.format == "arrow":
        _arrow_column(f, cfg.text_field)
        return True
    if f.format == "hf":
        _check_hub(f, cfg)
        return True
    scratch = ReadStats()
    try:
        with open_binary(f, scratch) as fh:
            head = fh.read(SNIFF_BYTES)
    except (*_READ_ERRORS, *_zstd_errors()) as e:
        return bad(f"cannot read ({f.compression or 'file'} stream is damaged: {e})", "unreadable_files")
    if b"\x00" in head:
        return bad("looks like a binary file (contains NUL bytes), not text", "binary_files")
    text = head.decode("utf-8", errors="ignore")
    # a cut multi-byte character at the end of the sniff window is not an error
    lost = len(head) - len(text.encode("utf-8"))
    if head and lost > 4 and lost > 0.3 * len(head):
        return bad("is not UTF-8 text (most bytes do not decode)", "binary_files")
    if f.format == "jsonl":
        _check_jsonl_field(f, cfg, text)
    elif f.format in ("csv", "tsv"):
        _check_csv_column(f, cfg, text)
    return True


def _check_jsonl_field(f: InputFile, cfg, head: str) -> None:
    for line in head.splitlines()[:-1] or head.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue  # a bad row is counted later; the field check needs a good one
        if isinstance(obj, dict) and cfg.text_field not in obj:
            fields = ", ".join(list(obj)[:10])
            raise UserError(f"{f.path}: no field '{cfg.text_field}' in its records (fields: {fields}); set --text-field")
        return


def _column_index(header: list[str] | None, column: str, where: Path) -> int:
    if column.strip().lstrip("-").isdigit():
        idx = int(column)
        if idx < 0:
            raise UserError(f"text column index must be >= 0, got {column}")
        return idx
    if header is None:
        raise UserError(f"{where}: text column '{column}' is a name but csv_header=false; give a 0-based index")
    names = [h.strip() for h in header]
    if column not in names:
        raise UserError(f"{where}: no column '{column}' (columns: {', '.join(names[:20])}); set --text-column (name or 0-based index)")
    return names.index(column)


def _check_csv_column(f: InputFile, cfg, head: str) -> None:
    delimiter = "\t" if f.format == "tsv" else ","
    first = next(csv.reader(io.StringIO(head), delimiter=delimiter), None)
    if first is None:
        return  # empty file: nothing to read, counted as no documents
    idx = _column_index(first if cfg.csv_header else None, cfg.text_column, f.path)
    if idx >= len(first):
        raise UserError(f"{f.path}: text column index {idx} but rows have {len(first)} columns")


def _parquet_column(pf, column: str, where: Path) -> str:
    names = pf.schema_arrow.names
    if column.strip().isdigit():
        idx = int(column)
        if idx >= len(names):
            raise UserError(f"{where}: text column index {idx} but the file has {len(names)} columns")
        return names[idx]
    if column not in names:
        raise UserError(f"{where}: no column '{column}' (columns: {', '.join(names[:20])}); set --text-column")
    return column


def _check_parquet(f: InputFile, cfg) -> bool:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{f.path}: reading .parquet needs the 'pyarrow' package (pip install 'budgetlm[data]')") from None
    try:
        pf = pq.ParquetFile(f.path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-parquet files
        if f.explicit:
            raise UserError(f"{f.path}: not a readable parquet file ({str(e).splitlines()[0][:120]})") from None
        return False
    name = _parquet_column(pf, cfg.text_column, f.path)
    tp = pf.schema_arrow.field(name).type
    if not (pa.types.is_string(tp) or pa.types.is_large_string(tp)):
        raise UserError(f"{f.path}: column '{name}' holds {tp}, not text")
    return True


def _pyarrow(f: InputFile):
    try:
        import pyarrow as pa
    except ImportError:
        raise UserError(f"{f.path}: reading .arrow needs the 'pyarrow' package (pip install 'budgetlm[data]')") from None
    return pa


def _open_arrow(f: InputFile):
    """A record-batch reader over an Arrow IPC file: the stream format (what `datasets` writes) or the file format."""
    pa = _pyarrow(f)
    source = pa.memory_map(str(f.path))
    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        try:
            return pa.ipc.open_file(source)
        except pa.ArrowInvalid as e:
            raise UserError(f"{f.path}: not an Arrow IPC file ({str(e).splitlines()[0][:120]})") from None


def text_field_of(names: list[str], types: list, field: str, where) -> str:
    """The column holding the text: `field`; or, when `field` is the default and missing, the only
    string column. With several string columns the user must choose."""
    strings = [n for n, t in zip(names, types) if _is_string(t)]
    if field in names:
        if field not in strings:
            kind = types[names.index(field)]
            raise UserError(f"{where}: field '{field}' holds {kind}, not text; set --text-field (text fields: {', '.join(strings) or 'none'})")
        return field
    if field == "text" and len(strings) == 1:
        return strings[0]
    if strings:
        raise UserError(f"{where}: no field '{field}'; which one holds the text? set --text-field to one of: {', '.join(strings[:20])}")
    raise UserError(f"{where}: no field '{field}' and no text field at all (fields: {', '.join(names[:20])})")


def _is_string(tp) -> bool:
    import pyarrow as pa

    if isinstance(tp, str):  # a `datasets` feature: Value('string') prints its dtype
        return tp in ("string", "large_string")
    return pa.types.is_string(tp) or pa.types.is_large_string(tp)


def _arrow_column(f: InputFile, field: str) -> str:
    reader = _open_arrow(f)
    schema = reader.schema
    return text_field_of(schema.names, [schema.field(n).type for n in schema.names], field, f.path)


def _hub_dataset(f: InputFile, cfg):
    """The streamed Hub dataset, or one line saying why not (no `datasets`, offline, unknown name)."""
    import os

    name, split = f.hub_name
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")):
        raise UserError(f"hf:{name}: this machine is set offline (HF_HUB_OFFLINE); save the dataset with save_to_disk elsewhere and pass its folder")
    try:
        import datasets
    except ImportError:
        raise UserError(f"hf:{name}: a Hub dataset needs the 'datasets' package (pip install datasets); or pass a save_to_disk folder") from None
    try:
        return datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # connection errors, unknown names and splits all surface as different exception types
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"hf:{name}:{split}: cannot open it ({first}); offline, save it with save_to_disk elsewhere and pass its folder") from None


def _check_hub(f: InputFile, cfg) -> None:
    ds = _hub_dataset(f, cfg)
    features = getattr(ds, "features", None) or {}
    names = list(features)
    types = [getattr(v, "dtype", str(v)) for v in features.values()]
    if names:
        f.text_field = text_field_of(names, types, cfg.text_field, f"hf:{f.hub_name[0]}")


# ---------------------------------------------------------------------------------------------
# reading documents


def iter_documents(files: list[InputFile], cfg, stats: ReadStats) -> Iterator[str]:
    """Raw (not yet cleaned) documents of all files, in order."""
    for f in files:
        before = _undecodable[0]
        stats.files += 1
        try:
            if f.format == "txt":
                yield from _txt_documents(f, cfg.txt_document_chars, stats)
            elif f.format == "jsonl":
                yield from _jsonl_documents(f, cfg.text_field, stats)
            elif f.format in ("csv", "tsv"):
                yield from _csv_documents(f, cfg, stats)
            elif f.format == "arrow":
                yield from _arrow_documents(f, cfg.text_field, stats)
            elif f.format == "hf":
                yield from _hub_documents(f, cfg, stats)
            else:
                yield from _parquet_documents(f, cfg.text_column, stats)
        except (*_READ_ERRORS, *_zstd_errors()):
            # a damaged compressed stream or a file that vanished mid-run: keep what was read
            stats.unreadable_files += 1
        finally:
            stats.undecodable_bytes += _undecodable[0] - before


def _txt_documents(f: InputFile, target_chars: int, stats: ReadStats) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="budgetlm-skip")
    buf = ""
    with open_binary(f, stats) as fh:
        while True:
            chunk = fh.read(READ_CHUNK)
            buf += decoder.decode(chunk, final=not chunk)
            if target_chars > 0:
                start = 0
                while len(buf) - start >= target_chars:
                    cut = _paragraph_cut(buf, start, target_chars)
                    if cut is None:
                        break  # need more text to find a paragraph end
                    end, resume = cut
                    yield buf[start:end]
                    start = resume
                buf = buf[start:]
            if not chunk:
                break
    if buf:
        yield buf


def _paragraph_cut(buf: str, start: int, target: int) -> tuple[int, int] | None:
    """Where to end a document that starts at `start`: (end, start of the next one) or None.

    The first paragraph break after `target` characters; failing that (a text without blank
    lines), a line break after 4x the target; failing that, a hard cut at 8x, so one
    pathological file can never hold the whole input in memory.
    """
    m = _BLANK_LINES.search(buf, start + target)
    if m and m.end() < len(buf):  # a break touching the buffer end may continue in the next chunk
        return m.start(), m.end()
    if len(buf) - start >= 4 * target:
        nl = buf.find("\n", start + 4 * target)
        if nl != -1 and nl < len(buf) - 1:
            return nl, nl + 1
    if len(buf) - start >= 8 * target:
        return start + 8 * target, start + 8 * target
    return None


def _jsonl_documents(f: InputFile, field: str, stats: ReadStats) -> Iterator[str]:
    with _open_text(f, stats) as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                stats.bad_rows += 1
                continue
            value = obj.get(field) if isinstance(obj, dict) else None
            if not isinstance(value, str):
                stats.bad_rows += 1
                continue
            yield value


def _csv_documents(f: InputFile, cfg, stats: ReadStats) -> Iterator[str]:
    delimiter = "\t" if f.format == "tsv" else ","
    with _open_text(f, stats, newline="") as fh:
        rows = csv.reader(fh, delimiter=delimiter)
        idx = None
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except csv.Error:
                stats.bad_rows += 1  # e.g. a NUL byte or an unterminated quote; the reader resumes on the next line
                continue
            if idx is None:
                idx = _column_index(row if cfg.csv_header else None, cfg.text_column, f.path)
                if cfg.csv_header:
                    continue
            if idx >= len(row):
                if row:  # an empty line is not a bad row
                    stats.bad_rows += 1
                continue
            yield row[idx]


def _parquet_documents(f: InputFile, column: str, stats: ReadStats) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f.path)
    name = _parquet_column(pf, column, f.path)
    n_groups = max(1, pf.num_row_groups)
    for g in range(pf.num_row_groups):
        table = pf.read_row_group(g, columns=[name])
        for value in table.column(0).to_pylist():
            if value is None:
                stats.bad_rows += 1
            else:
                yield value
        del table
        stats.bytes_read += f.size // n_groups


def _arrow_documents(f: InputFile, field: str, stats: ReadStats) -> Iterator[str]:
    name = _arrow_column(f, field)
    reader = _open_arrow(f)
    if hasattr(reader, "num_record_batches"):  # the file format: batches by index
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    else:
        batches = iter(reader)
    for batch in batches:
        for value in batch.column(name).to_pylist():
            if value is None:
                stats.bad_rows += 1
            else:
                yield value
    stats.bytes_read += f.size  # progress per file: the map is read in place, not through a counting stream


def _hub_documents(f: InputFile, cfg, stats: ReadStats) -> Iterator[str]:
    field = f.text_field or cfg.text_field
    for row in _hub_dataset(f, cfg):
        value = row.get(field)
        if isinstance(value, str):
            stats.bytes_read += len(value.encode("utf-8"))
            yield value
        else:
            stats.bad_rows += 1
