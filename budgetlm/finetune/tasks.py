"""Task files: read labelled (or unlabelled) examples and write predictions back in the same format.

Four tasks share one `Example` record: `classify` (one text and a label), `pair` (two texts and a
label), `regress` (one or two texts and a number) and `tag` (a list of words and one tag per word).
Five formats: CSV/TSV (with a header or by column index), JSONL (by field name), CoNLL columns
and `word/TAG` lines. Which column holds what is configurable; the defaults follow the common
layouts (a headerless two-column CSV is `label,text`, as in the Pang & Lee polarity file).

Rows that are malformed inside an otherwise good file (too few columns, a regression label that is
not a number, a JSONL line that is not JSON) are skipped and counted, because real corpora carry a
few of them. Whole-file problems (empty, the label column missing, a tagged token without a tag)
raise `UserError`: training on them would be silently wrong.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from budgetlm.errors import UserError

TASKS = ("classify", "pair", "regress", "tag")
FORMATS = ("csv", "tsv", "jsonl", "conll", "tagged")

# names tried, in order, when a column/field is not given and the file has a header
DEFAULT_NAMES = {
    "text": ("text", "sentence", "sentence1", "question", "premise", "review", "tokens", "words"),
    "text2": ("text2", "sentence2", "hypothesis", "passage", "text_b"),
    "label": ("label", "labels", "score", "target", "tags"),
}

csv.field_size_limit(1 << 24)  # long reviews exceed the 128 KiB default


@dataclass
class Example:
    """One example. `text` is a string, or the list of words for `tag`; `label` is a class name,
    a float (`regress`), a list of tags (`tag`), or None when the file has no labels."""

    text: str | list[str]
    text2: str | None = None
    label: Any = None
    line: int = 0  # 1-based line (or record) number in the source file, for error messages
    raw: Any = None  # the source row/object, so predictions are written back around it


@dataclass
class TaskData:
    examples: list[Example]
    skipped: int = 0  # malformed rows skipped
    header: list[str] | None = None  # CSV/TSV header row when there is one
    columns: dict[str, Any] = field(default_factory=dict)  # resolved text/text2/label column or field


@dataclass
class Columns:
    """Where the text, second text and label live: a field/column name or a 0-based index."""

    text: str | None = None
    text2: str | None = None
    label: str | None = None
    header: bool | None = None  # CSV/TSV: None = detect from the first row

    def as_dict(self) -> dict:
        return {"text": self.text, "text2": self.text2, "label": self.label, "header": self.header}


def infer_format(path: Path, fmt: str | None) -> str:
    if fmt:
        if fmt not in FORMATS:
            raise UserError(f"unknown format '{fmt}' (choose one of {', '.join(FORMATS)})")
        return fmt
    suffix = Path(path).suffix.lower().lstrip(".")
    by_suffix = {"csv": "csv", "tsv": "tsv", "tab": "tsv", "jsonl": "jsonl", "json": "jsonl", "conll": "conll", "conllu": "conll"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    raise UserError(f"cannot tell the format of {path} from its extension; pass --format ({', '.join(FORMATS)})")


def read_task_file(path: str | Path, task: str, fmt: str | None = None, columns: Columns | None = None, labelled: bool = True) -> TaskData:
    """Read `path` as examples of `task`. With `labelled=False` (prediction input) labels are optional."""
    if task not in TASKS:
        raise UserError(f"unknown task '{task}' (choose one of {', '.join(TASKS)})")
    path = Path(path)
    fmt = infer_format(path, fmt)
    columns = columns or Columns()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, expected a file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    if not text.strip():
        raise UserError(f"{path} is empty")
    if fmt in ("conll", "tagged") and task != "tag":
        raise UserError(f"format '{fmt}' holds tagged words; use it with --task tag")
    if fmt in ("csv", "tsv"):
        data = _read_delimited(path, text, "\t" if fmt == "tsv" else ",", task, columns, labelled)
    elif fmt == "jsonl":
        data = _read_jsonl(path, text, task, columns, labelled)
    elif fmt == "conll":
        data = _read_conll(path, text, columns, labelled)
    else:
        data = _read_tagged(path, text, labelled)
    if not data.examples:
        raise UserError(f"{path} holds no usable examples ({data.skipped} malformed rows skipped)")
    return data


# ---------------------------------------------------------------------------------------------
# CSV / TSV


def _is_index(spec: str | None) -> bool:
    return spec is not None and str(spec).lstrip("-").isdigit()


def _read_delimited(path: Path, text: str, delimiter: str, task: str, cols: Columns, labelled: bool) -> TaskData:
    rows = list(csv.reader(io.StringIO(text), delimiter=delimiter))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise UserError(f"{path} is empty")
    header = cols.header
    if header is None:
        # a header is a first row naming one of the requested (or default) columns
        wanted = {str(s).lower() for s in (cols.text, cols.text2, cols.label) if s and not _is_index(s)}
        wanted |= {n for names in DEFAULT_NAMES.values() for n in names}
        header = any(c.strip().lower() in wanted for c in rows[0])
    names = [c.strip() for c in rows[0]] if header else None
    body = rows[1:] if header else rows
    start = 2 if header else 1
    width = max(len(r) for r in body) if body else len(rows[0])

    def resolve(role: str, spec: str | None, default_index: int | None, required: bool) -> int | None:
        if spec is not None and _is_index(spec):
            i = int(spec)
            if i >= width or i < -width:
                raise UserError(f"{role} column {i} is out of range in {path} (rows have {width} columns)")
            return i % width
        if spec is not None:
            if names is None:
                raise UserError(f"{role} column '{spec}' given by name but {path} has no header row; pass a 0-based index")
            lowered = [n.lower() for n in names]
            if spec.lower() not in lowered:
                raise UserError(f"{role} column '{spec}' not found in {path} (columns: {', '.join(names)})")
            return lowered.index(spec.lower())
        if names is not None:
            for candidate in DEFAULT_NAMES[role]:
                if candidate in [n.lower() for n in names]:
                    return [n.lower() for n in names].index(candidate)
            if required:
                raise UserError(f"no {role} column in {path} (columns: {', '.join(names)}); pass --{role}-column")
            return None
        # headerless defaults: label first, then the text(s) -- "label,text" / "label,text,text2"
        if default_index is not None and default_index < width:
            return default_index
        if required:
            raise UserError(f"{path} has {width} column(s); a {role} column is needed (pass --{role}-column)")
        return None

    has_label_default = labelled or width >= (3 if task == "pair" else 2)
    label_i = resolve("label", cols.label, 0 if has_label_default else None, required=labelled)
    text_i = resolve("text", cols.text, 1 if label_i == 0 else 0, required=True)
    text2_i = None
    if task == "pair":
        text2_i = resolve("text2", cols.text2, text_i + 1 if text_i + 1 != label_i else text_i + 2, required=True)
    elif cols.text2 is not None:
        text2_i = resolve("text2", cols.text2, None, required=True)
    if label_i is not None and label_i in (text_i, text2_i):
        raise UserError(f"the label and text columns of {path} are the same column ({label_i}); set --text-column/--label-column")

    examples, skipped = [], 0
    for n, row in enumerate(body, start=start):
        needed = max(i for i in (text_i, text2_i, label_i) if i is not None)
        if len(row) <= needed:
            skipped += 1
            continue
        ex = _make_example(task, row[text_i], row[text2_i] if text2_i is not None else None, row[label_i] if label_i is not None else None, n, row)
        if ex is None:
            skipped += 1
        else:
            examples.append(ex)
    resolved = {"text": text_i, "text2": text2_i, "label": label_i, "header": bool(header)}
    if names:
        resolved.update({k: names[v] for k, v in resolved.items() if isinstance(v, int) and not isinstance(v, bool)})
    return TaskData(examples, skipped, names, resolved)


def _make_example(task: str, text: Any, text2: Any, label: Any, line: int, raw: Any) -> Example | None:
    """An example from raw cells, or None when the row is malformed (empty text, bad number)."""
    if task == "tag":
        words = text if isinstance(text, list) else str(text).split()
        tags = label if isinstance(label, list) or label is None else str(label).split()
        if not words or (tags is not None and len(tags) != len(words)):
            return None
        return Example([str(w) for w in words], None, [str(t) for t in tags] if tags is not None else None, line, raw)
    if text is None or not str(text).strip():
        return None
    if task == "pair" and (text2 is None or not str(text2).strip()):
        return None
    if label is not None:
        if task == "regress":
            try:
                label = float(label)
            except (TypeError, ValueError):
                return None
            if not math.isfinite(label):
                return None
        else:
            label = str(label).strip()
            if not label:
                return None
    return Example(str(text).strip(), str(text2).strip() if text2 is not None else None, label, line, raw)


# ---------------------------------------------------------------------------------------------
# JSONL


def _read_jsonl(path: Path, text: str, task: str, cols: Columns, labelled: bool) -> TaskData:
    records, skipped = [], 0
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if not isinstance(obj, dict):
            skipped += 1
            continue
        records.append((n, obj))
    if not records:
        raise UserError(f"{path} holds no JSON objects ({skipped} malformed lines skipped)")
    keys = set().union(*(obj.keys() for _, obj in records))

    def resolve(role: str, spec: str | None, required: bool) -> str | None:
        if spec is not None:
            if spec not in keys:
                raise UserError(f"{role} field '{spec}' not found in {path} (fields: {', '.join(sorted(keys))})")
            return spec
        for candidate in DEFAULT_NAMES[role]:
            if candidate in keys:
                return candidate
        if required:
            raise UserError(f"no {role} field in {path} (fields: {', '.join(sorted(keys))}); pass --{role}-column")
        return None

    text_f = resolve("text", cols.text, True)
    label_f = resolve("label", cols.label, labelled)
    text2_f = resolve("text2", cols.text2, task == "pair") if task == "pair" or cols.text2 else None
    examples = []
    for n, obj in records:
        if text_f not in obj or (labelled and label_f not in obj):
            skipped += 1
            continue
        ex = _make_example(task, obj[text_f], obj.get(text2_f) if text2_f else None, obj.get(label_f) if label_f else None, n, obj)
        if ex is None:
            skipped += 1
        else:
            examples.append(ex)
    return TaskData(examples, skipped, None, {"text": text_f, "text2": text2_f, "label": label_f})


# ---------------------------------------------------------------------------------------------
# CoNLL columns and word/TAG lines


def _read_conll(path: Path, text: str, cols: Columns, labelled: bool) -> TaskData:
    """Whitespace-separated columns, one token a line, a blank line between sentences.

    The word is column 0 and the tag the last column unless set; `-DOCSTART-` lines are skipped.
    """
    word_i = int(cols.text) if _is_index(cols.text) else 0
    tag_i = int(cols.label) if _is_index(cols.label) else -1
    for role, spec in (("text", cols.text), ("label", cols.label)):
        if spec is not None and not _is_index(spec):
            raise UserError(f"CoNLL files have no column names; give the {role} column as a 0-based index, not '{spec}'")
    examples: list[Example] = []
    words: list[str] = []
    tags: list[str] = []
    first_line = 0

    def flush():
        if words:
            # unlabelled input (prediction) may have only the word column
            examples.append(Example(list(words), None, list(tags) if len(tags) == len(words) else None, first_line, None))
        words.clear()
        tags.clear()

    need = max(word_i, tag_i) + 1 if tag_i >= 0 else max(word_i + 1, 2)
    for n, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            flush()
            continue
        if not words:
            first_line = n
        if len(parts) < need:
            if labelled or len(parts) <= word_i:
                raise UserError(f"misaligned CoNLL line {n} in {path}: expected a word and a tag column, got {line.strip()!r}")
            words.append(parts[word_i])
            continue
        words.append(parts[word_i])
        tags.append(parts[tag_i])
    flush()
    return TaskData(examples, 0, None, {"text": word_i, "label": tag_i})


def _read_tagged(path: Path, text: str, labelled: bool) -> TaskData:
    """One sentence a line of `word/TAG` tokens; the last '/' splits word and tag (`1/2/CD`)."""
    examples = []
    for n, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        words, tags = [], []
        for tok in tokens:
            word, slash, tag = tok.rpartition("/")
            if not slash or not word or not tag:
                if labelled:
                    raise UserError(f"misaligned tagged token at line {n} of {path}: {tok!r} is not word/TAG")
                words.append(tok)  # unlabelled prediction input may be plain words
                continue
            words.append(word)
            tags.append(tag)
        examples.append(Example(words, None, tags if len(tags) == len(words) else None, n, tokens))
    return TaskData(examples, 0, None, {})


# ---------------------------------------------------------------------------------------------
# writing predictions


def write_predictions(data: TaskData, predictions: list, fmt: str, task: str, out) -> None:
    """Write `predictions` (one per example) around the input rows, in the input's format.

    CSV/TSV keep every input column and put the prediction in the label column (a new
    `prediction` column when the input had none); JSONL adds a `prediction` field; CoNLL writes
    `word<TAB>tag` lines; `tagged` writes `word/TAG` tokens.
    """
    if fmt in ("csv", "tsv"):
        writer = csv.writer(out, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
        if data.header is not None:
            names = list(data.header)
            label_i = names.index(data.columns["label"]) if data.columns.get("label") in names else None
            writer.writerow(names if label_i is not None else names + ["prediction"])
        else:
            label_i = data.columns.get("label")
        for ex, pred in zip(data.examples, predictions):
            row = list(ex.raw)
            cell = _format_value(pred)
            if label_i is not None and label_i < len(row):
                row[label_i] = cell
            else:
                row.append(cell)
            writer.writerow(row)
    elif fmt == "jsonl":
        for ex, pred in zip(data.examples, predictions):
            obj = dict(ex.raw)
            obj["prediction"] = pred
            out.write(json.dumps(obj, ensure_ascii=False) + "\n")
    elif fmt == "conll":
        for ex, tags in zip(data.examples, predictions):
            for word, tag in zip(ex.text, tags):
                out.write(f"{word}\t{tag}\n")
            out.write("\n")
    else:
        for ex, tags in zip(data.examples, predictions):
            out.write(" ".join(f"{w}/{t}" for w, t in zip(ex.text, tags)) + "\n")


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)
