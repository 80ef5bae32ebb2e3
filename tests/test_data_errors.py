"""Bad input to `data prepare` and to readers of prepared data: one clear line, exit 2, no traceback."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest

from budgetlm.cli import main
from budgetlm.data.dataset import PreparedData
from budgetlm.errors import UserError


def fails(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("budgetlm data prepare: error:")
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def prep(*args: str) -> list[str]:
    return ["data", "prepare", *args, "--set", "vocab_size=320", "--set", "workers=1"]


@pytest.fixture
def good(tmp_path):
    src = tmp_path / "good.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(30)), encoding="utf-8")
    return src


def test_missing_input(capsys, tmp_path):
    fails(capsys, prep(str(tmp_path / "absent.txt"), "--out", str(tmp_path / "o")), "input not found", "absent.txt")


def test_empty_inputs(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    fails(capsys, prep(str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o")), "no usable documents")
    (tmp_path / "blank.jsonl").write_text('{"text": "   "}\n{"text": ""}\n', encoding="utf-8")
    fails(capsys, prep(str(tmp_path / "blank.jsonl"), "--out", str(tmp_path / "o2")), "no usable documents")


def test_binary_file_named_explicitly(capsys, tmp_path):
    (tmp_path / "weights.txt").write_bytes(bytes(range(256)) * 10)
    fails(capsys, prep(str(tmp_path / "weights.txt"), "--out", str(tmp_path / "o")), "binary")
    (tmp_path / "latin.txt").write_bytes(bytes(range(128, 256)) * 20)  # no NUL, but nothing decodes as UTF-8
    fails(capsys, prep(str(tmp_path / "latin.txt"), "--out", str(tmp_path / "o")), "not UTF-8")
    (tmp_path / "fake.txt.gz").write_bytes(b"this is not gzip data at all")
    fails(capsys, prep(str(tmp_path / "fake.txt.gz"), "--out", str(tmp_path / "o")), "cannot read")


def test_folder_with_nothing_usable(capsys, tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG")
    (folder / ".hidden.txt").write_text("hidden files are ignored", encoding="utf-8")
    fails(capsys, prep(str(folder), "--out", str(tmp_path / "o")), "no usable input files", "pics")
    (folder / "b.txt").write_bytes(b"\x00\x01binary")  # binary files inside a folder are skipped, then nothing is left
    fails(capsys, prep(str(folder), "--out", str(tmp_path / "o")), "no usable input files", "1 binary files")


def test_unsupported_file_named_explicitly(capsys, tmp_path):
    (tmp_path / "book.pdf").write_bytes(b"%PDF-1.4")
    fails(capsys, prep(str(tmp_path / "book.pdf"), "--out", str(tmp_path / "o")), "unsupported input file", ".parquet")


def test_missing_jsonl_field_and_csv_column(capsys, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "x", "id": 1}\n', encoding="utf-8")
    fails(capsys, prep(str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "o")), "no field 'text'", "body")
    (tmp_path / "a.csv").write_text("label,sentence\n1,hello\n", encoding="utf-8")
    fails(capsys, prep(str(tmp_path / "a.csv"), "--out", str(tmp_path / "o")), "no column 'text'", "sentence")
    fails(capsys, prep(str(tmp_path / "a.csv"), "--out", str(tmp_path / "o"), "--text-column", "5"), "column index 5")
    fails(capsys, prep(str(tmp_path / "a.csv"), "--out", str(tmp_path / "o"), "--text-column", "sentence", "--csv-header", "false"), "csv_header")


def test_parquet_errors(capsys, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"n": [1, 2], "body": ["a", "b"]}), tmp_path / "a.parquet")
    fails(capsys, prep(str(tmp_path / "a.parquet"), "--out", str(tmp_path / "o")), "no column 'text'", "body")
    fails(capsys, prep(str(tmp_path / "a.parquet"), "--out", str(tmp_path / "o"), "--text-column", "n"), "not text")
    (tmp_path / "b.parquet").write_bytes(b"not parquet")
    fails(capsys, prep(str(tmp_path / "b.parquet"), "--out", str(tmp_path / "o")), "not a readable parquet")
    (tmp_path / "c.parquet.gz").write_bytes(gzip.compress(b"x"))
    fails(capsys, prep(str(tmp_path / "c.parquet.gz"), "--out", str(tmp_path / "o")), "compressed parquet")


def test_output_directory_conflicts(capsys, tmp_path, good):
    out = tmp_path / "out"
    assert main(prep(str(good), "--out", str(out))) == 0
    capsys.readouterr()
    assert main(prep(str(good), "--out", str(out))) == 0  # same settings and inputs: nothing to do
    assert "already up to date" in capsys.readouterr().out
    fails(capsys, prep(str(good), "--out", str(out), "--seed", "3"), "other settings", "--force")
    assert main(prep(str(good), "--out", str(out), "--seed", "3", "--force", "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["documents"]["train"] + summary["documents"]["val"] == 30
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("mine", encoding="utf-8")
    fails(capsys, prep(str(good), "--out", str(busy)), "not empty")
    assert main(prep(str(good), "--out", str(busy), "--force")) == 0
    assert (busy / "thesis.tex").read_text(encoding="utf-8") == "mine"  # --force never deletes files that are not ours
    (tmp_path / "file").write_text("x", encoding="utf-8")
    fails(capsys, prep(str(good), "--out", str(tmp_path / "file")), "not a directory")


def test_bad_settings(capsys, tmp_path, good):
    fails(capsys, prep(str(good), "--out", str(tmp_path / "o"), "--val-fraction", "1.5"), "val_fraction")
    fails(capsys, prep(str(good), "--out", str(tmp_path / "o"), "--set", "vocab_sise=100"), "unknown config key", "vocab_size")
    fails(capsys, prep(str(good), "--out", str(tmp_path / "o"), "--tokenizer", "sentencepiece"), "tokenizer")
    fails(capsys, prep(str(good), "--out", str(tmp_path / "o"), "--tokenizer-file", str(tmp_path / "none.json")), "tokenizer file not found")
    (tmp_path / "tok.json").write_text("{}", encoding="utf-8")
    fails(capsys, prep(str(good), "--out", str(tmp_path / "o"), "--tokenizer-file", str(tmp_path / "tok.json")), "not a valid tokenizer")
    fails(capsys, prep(str(good), "--out", str(tmp_path / "o"), "--set", "val_fraction=0.99", "--set", "min_val_documents=40"), "validation")


def test_prepared_data_reader_errors(tmp_path, prepared_bpe):
    with pytest.raises(UserError, match="not found"):
        PreparedData(tmp_path / "nothing")
    with pytest.raises(UserError, match="not a prepared data directory"):
        PreparedData(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(prepared_bpe, copy)
    manifest = json.loads((copy / "manifest.json").read_text(encoding="utf-8"))
    shard = copy / manifest["splits"]["train"]["shards"][0]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[::-1])  # same size, different content: only the checksum notices
    with pytest.raises(UserError, match="sha256"):
        PreparedData(copy).verify()
    shard.write_bytes(data[:-2])
    with pytest.raises(UserError, match="truncated"):
        PreparedData(copy)
    shard.unlink()
    with pytest.raises(UserError, match="missing"):
        PreparedData(copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format": "other/9"}), encoding="utf-8")
    with pytest.raises(UserError, match="format"):
        PreparedData(copy)
    (copy / "manifest.json").write_text("{", encoding="utf-8")
    with pytest.raises(UserError, match="damaged"):
        PreparedData(copy)
