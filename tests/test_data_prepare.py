"""`data prepare`: every input format, cleaning, dedup, the filter, the split, shards and manifest."""

from __future__ import annotations

import csv
import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from budgetlm.config import PrepareConfig
from budgetlm.data import shards
from budgetlm.data.clean import clean_text
from budgetlm.data.dataset import PreparedData
from budgetlm.data.prepare import prepare
from budgetlm.data.sources import ReadStats, discover, iter_documents
from budgetlm.data.tokenizer import Tokenizer
from budgetlm.errors import UserError

DOCS = [
    "The quality of mercy is not strain'd,\nIt droppeth as the gentle rain from heaven.",
    "Now is the winter of our discontent\nMade glorious summer by this sun of York.",
    "Café, naïve, résumé — “typographic” quotes… and ½ fractions.",
    "日本語のテキストも大丈夫です。 Emoji too: 🎉",
    "Tabs\tstay\tput, and\n\nblank lines inside a document too.",
    "A line with a comma, a \"quote\" and a ; semicolon",
    "Mentions <|endoftext|> and [SEP] as plain text.",
] + [f"Document number {i}: {'lorem ipsum dolor sit amet ' * (i % 5 + 1)}end." for i in range(40)]


def cfg(**kw) -> PrepareConfig:
    base = dict(vocab_size=320, workers=1, val_fraction=0.1, txt_document_chars=0, min_val_tokens=0)
    base.update(kw)
    return PrepareConfig(**base)


def run(inputs, out, **kw) -> dict:
    force = kw.pop("force", False)
    return prepare([str(i) for i in inputs], out, cfg(**kw), force=force, show_progress=False)


def decoded_docs(out: Path, split: str | None = None) -> list[str]:
    """Documents of a prepared directory (both splits unless one is named), split at separators."""
    data = PreparedData(out)
    tok = data.tokenizer
    docs = []
    for s in [split] if split else ["train", "val"]:
        arr = data.tokens(s)
        ids = arr.get(0, len(arr))
        ends = np.flatnonzero(ids == data.separator_id)
        assert len(ids) == 0 or ends[-1] == len(ids) - 1, "every document ends with the separator"
        start = 0
        for end in ends:
            docs.append(tok.decode(ids[start:end]))
            start = end + 1
    return docs


def expected_docs(inputs, **kw) -> list[str]:
    """The cleaned documents the reader produces (the round-trip target)."""
    c = cfg(**kw)
    files = discover([str(i) for i in inputs], ReadStats())
    out = [clean_text(d, c.normalization, c.lowercase) for d in iter_documents(files, c, ReadStats())]
    return [d for d in out if d]


def write_formats(root: Path) -> dict[str, Path]:
    """The same documents in every supported format; returns name -> input path."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    txt = root / "txt"
    txt.mkdir()
    for i, d in enumerate(DOCS):
        (txt / f"doc{i:03d}.txt").write_text(d, encoding="utf-8")
    paths["txt"] = txt
    lines = "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(DOCS))
    (root / "d.jsonl").write_text(lines, encoding="utf-8")
    paths["jsonl"] = root / "d.jsonl"
    (root / "d.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    paths["jsonl.gz"] = root / "d.jsonl.gz"
    (root / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    paths["jsonl.zst"] = root / "d.jsonl.zst"
    for name, delim in (("csv", ","), ("tsv", "\t")):
        with open(root / f"d.{name}", "w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh, delimiter=delim)
            w.writerow(["label", "text"])
            w.writerows([[i % 2, d] for i, d in enumerate(DOCS)])
        paths[name] = root / f"d.{name}"
    with open(root / "noheader.csv", "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([[i % 2, d] for i, d in enumerate(DOCS)])
    paths["csv-index"] = root / "noheader.csv"
    (root / "txt.txt.gz").write_bytes(gzip.compress("\n\n".join(DOCS).encode()))
    paths["txt.gz"] = root / "txt.txt.gz"
    table = pa.table({"label": list(range(len(DOCS))), "text": DOCS})
    pq.write_table(table, root / "d.parquet", row_group_size=8)  # several row groups
    paths["parquet"] = root / "d.parquet"
    return paths


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    return write_formats(tmp_path_factory.mktemp("formats"))


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "jsonl.gz", "jsonl.zst", "csv", "tsv", "csv-index", "parquet"])
def test_every_format_gives_the_same_documents(formats, fmt, tmp_path):
    extra = {"text_column": "1", "csv_header": False} if fmt == "csv-index" else {}
    s = run([formats[fmt]], tmp_path / "out", **extra)
    want = sorted(clean_text(d) for d in DOCS)
    assert sorted(decoded_docs(tmp_path / "out")) == want
    assert s["documents"]["train"] + s["documents"]["val"] == len(DOCS)
    assert s["skipped"]["bad_rows"] == 0


def test_csv_column_by_name_and_by_index_agree(formats, tmp_path):
    run([formats["csv"]], tmp_path / "name", text_column="text")
    run([formats["csv"]], tmp_path / "index", text_column="1")
    assert decoded_docs(tmp_path / "name") == decoded_docs(tmp_path / "index")


def test_large_txt_is_cut_into_paragraph_documents(formats, tmp_path):
    s = run([formats["txt.gz"]], tmp_path / "out", txt_document_chars=200)
    docs = decoded_docs(tmp_path / "out")
    assert s["documents"]["train"] + s["documents"]["val"] > 5
    assert all(len(d) < 200 * 8 for d in docs)
    # documents are unions of whole paragraphs: every original document appears inside one of them
    assert all(any(clean_text(d) in doc for doc in docs) for d in DOCS)


def rejoin_cut(docs: list[str], want: list[str]) -> list[str]:
    """`docs` with each document that validation cut in two (head in train, tail in val) joined again."""
    extra = Counter(docs) - Counter(want)
    for missing in (Counter(want) - Counter(docs)).elements():
        head = next(h for h in extra if missing.startswith(h) and extra[missing[len(h) :]] > 0)
        extra.subtract([head, missing[len(head) :]])
        docs = [d for d in docs if d not in (head, missing[len(head) :])] + [missing]
    return docs


def test_round_trip_on_the_real_sample_both_tokenizers(sample_text_dir, prepared_bpe, prepared_wordpiece):
    want = sorted(expected_docs([sample_text_dir], txt_document_chars=4096))
    for out in (prepared_bpe, prepared_wordpiece):
        data = PreparedData(out)
        assert data.manifest["summary"]["val_documents_cut"] <= 1
        assert sorted(rejoin_cut(decoded_docs(out), want)) == want  # a cut document's two parts give it back exactly
        assert data.manifest["settings"]["txt_document_chars"] == 4096
    assert PreparedData(prepared_bpe).manifest["tokenizer"]["kind"] == "bpe"
    assert PreparedData(prepared_wordpiece).manifest["tokenizer"]["kind"] == "wordpiece"


def test_cleaning_line_endings_controls_bom_and_nfc(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    raw = "\ufeffCafe\u0301 line one\r\nline\x07 two\rline three\x00?\n\n  "
    (src / "a.txt").write_bytes(raw.encode("utf-8").replace(b"\x00", b""))  # NUL makes a file binary; test it in clean_text
    run([src], tmp_path / "out", val_fraction=0.0, min_val_documents=0)
    assert decoded_docs(tmp_path / "out") == ["Caf\u00e9 line one\nline two\nline three?"]
    assert clean_text("a\x00b\x1fc\x7fd\x9fe\tf") == "abcde\tf"
    assert clean_text("ﬁ", normalization="NFKC") == "fi" and clean_text("ﬁ") == "ﬁ"
    assert clean_text("MiXeD", lowercase=True) == "mixed"


def test_exact_duplicates_are_dropped_and_counted(formats, tmp_path):
    s = run([formats["jsonl"], formats["csv"]], tmp_path / "dedup")
    assert s["skipped"]["duplicates"] == len(DOCS)
    assert len(decoded_docs(tmp_path / "dedup")) == len(DOCS)
    s = run([formats["jsonl"], formats["csv"]], tmp_path / "keep", dedup=False)
    assert s["skipped"]["duplicates"] == 0
    docs = decoded_docs(tmp_path / "keep")
    assert len(docs) == 2 * len(DOCS)


def test_tokens_per_char_filter_drops_badly_tokenized_documents(formats, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "d.jsonl").write_bytes(formats["jsonl"].read_bytes())
    garbage = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(300))  # rare CJK: ~3 byte tokens per char
    with open(src / "d.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": garbage}) + "\n")
    s = run([src], tmp_path / "out", max_tokens_per_char=1.5)
    assert s["skipped"]["tokens_per_char"] >= 1
    assert garbage not in decoded_docs(tmp_path / "out")
    s = run([src], tmp_path / "off")
    assert s["skipped"]["tokens_per_char"] == 0 and garbage in decoded_docs(tmp_path / "off")


def test_val_split_is_by_document_deterministic_and_order_independent(formats, tmp_path):
    run([formats["txt"]], tmp_path / "a", val_fraction=0.2)
    run([formats["txt"]], tmp_path / "b", val_fraction=0.2, workers=2)  # the process pool gives the same bytes
    run([formats["jsonl"]], tmp_path / "c", val_fraction=0.2)  # same documents, other container and order source
    run([formats["txt"]], tmp_path / "d", val_fraction=0.2, seed=99)
    ma, mb = PreparedData(tmp_path / "a").manifest, PreparedData(tmp_path / "b").manifest
    assert ma["splits"] == mb["splits"]
    val_a, train_a = decoded_docs(tmp_path / "a", "val"), decoded_docs(tmp_path / "a", "train")
    assert 2 <= len(val_a) <= len(DOCS) // 2 and not set(val_a) & set(train_a)
    assert set(val_a) <= {clean_text(d) for d in DOCS}  # whole documents, never pieces
    assert sorted(decoded_docs(tmp_path / "c", "val")) == sorted(val_a)
    assert sorted(decoded_docs(tmp_path / "d", "val")) != sorted(val_a)


def test_min_val_documents_is_honoured(formats, tmp_path):
    s = run([formats["jsonl"]], tmp_path / "out", val_fraction=0.0, min_val_documents=3)
    assert s["documents"]["val"] == 3 and s["documents"]["train"] == len(DOCS) - 3


def test_manifest_counts_bytes_and_checksums(formats, tmp_path):
    out = tmp_path / "out"
    run([formats["jsonl"]], out, shard_tokens=1024)
    data = PreparedData(out)
    m = data.manifest
    assert m["format"] == shards.FORMAT and m["dtype"] == "uint16"
    assert m["tokenizer"]["file"] == "tokenizer.json" and m["tokenizer"]["sha256"] == Tokenizer.load(out).sha256
    assert m["separator_id"] == data.tokenizer.eos_id and m["settings"]["vocab_size"] == 320
    assert len(m["splits"]["train"]["shards"]) > 1  # small shards: several files
    for split in ("train", "val"):
        info = m["splits"][split]
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"]) == len(data.tokens(split))
        docs = decoded_docs(out, split)
        assert info["documents"] == len(docs)
        assert info["bytes"] == sum(len(d.encode("utf-8")) for d in docs)
        for s in info["shards"]:
            assert shards.sha256_file(out / s["file"]) == s["sha256"]
            assert (out / s["file"]).stat().st_size == 2 * s["tokens"]
    assert data.bytes_per_token("train") == pytest.approx(m["splits"]["train"]["bytes"] / m["splits"]["train"]["tokens"])
    assert m["inputs"][0]["path"].endswith("d.jsonl") and m["summary"]["documents"]["train"] == m["splits"]["train"]["documents"]
    assert not list(out.glob("*.tmp"))
    data.verify()


def test_uint32_shards_when_the_vocabulary_exceeds_uint16(tmp_path, formats):
    run([formats["jsonl"]], tmp_path / "small")
    big = Tokenizer.load(tmp_path / "small").hf
    big.add_tokens([f"<extra_{i}>" for i in range(66000)])
    big.save(str(tmp_path / "big.json"))
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "hello <extra_65999> world"}) + "\n" + json.dumps({"text": "second"}) + "\n", encoding="utf-8")
    run([src], tmp_path / "out", tokenizer_file=str(tmp_path / "big.json"), val_fraction=0.0, min_val_documents=0)
    data = PreparedData(tmp_path / "out")
    assert data.manifest["dtype"] == "uint32" and data.vocab_size > 65536
    ids = data.tokens("train").get(0, len(data.tokens("train")))
    assert ids.max() > 65535
    assert sorted(decoded_docs(tmp_path / "out")) == sorted(["hello <extra_65999> world", "second"])


def test_reusing_a_tokenizer_file(formats, tmp_path):
    run([formats["jsonl"]], tmp_path / "first")
    s = run([formats["csv"]], tmp_path / "second", tokenizer_file=str(tmp_path / "first" / "tokenizer.json"))
    assert Tokenizer.load(tmp_path / "second").sha256 == Tokenizer.load(tmp_path / "first").sha256
    assert s["tokenizer"]["vocab_size"] == Tokenizer.load(tmp_path / "first").vocab_size
    assert sorted(decoded_docs(tmp_path / "second")) == sorted(clean_text(d) for d in DOCS)


def test_same_settings_is_a_no_op_other_settings_need_force(formats, tmp_path):
    out = tmp_path / "out"
    run([formats["jsonl"]], out)
    before = (out / "manifest.json").stat().st_mtime_ns
    again = run([formats["jsonl"]], out)
    assert again["up_to_date"] and (out / "manifest.json").stat().st_mtime_ns == before
    with pytest.raises(UserError, match="other settings"):
        run([formats["jsonl"]], out, seed=7)
    s = run([formats["jsonl"]], out, seed=7, force=True)
    assert not s["up_to_date"] and PreparedData(out).manifest["settings"]["seed"] == 7
    s = run([formats["jsonl"]], out, seed=7, workers=2)  # workers do not change the output: still up to date
    assert s["up_to_date"]


def test_undecodable_bytes_and_bad_rows_are_skipped_and_counted(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_bytes(b"good text \xff\xfe with two bad bytes")
    (src / "b.jsonl").write_bytes(b'{"text": "fine row"}\n{broken json\n{"text": 42}\n{"other": "x"}\n\n{"text": "another fine row"}\n')
    (src / "c.csv").write_text('text,label\n"ok, quoted",1\n', encoding="utf-8")
    (src / "notes.md").write_text("not an input format", encoding="utf-8")
    (src / "image.txt").write_bytes(b"\x89PNG\x00\x00\x00binary")
    s = run([src], tmp_path / "out", val_fraction=0.0, min_val_documents=0)
    assert s["skipped"]["undecodable_bytes"] == 2
    assert s["skipped"]["bad_rows"] == 3
    assert s["skipped"]["unsupported_files"] == 1 and s["skipped"]["binary_files"] == 1
    assert sorted(decoded_docs(tmp_path / "out")) == sorted(["good text  with two bad bytes", "fine row", "another fine row", "ok, quoted"])
    assert PreparedData(tmp_path / "out").manifest["skipped"]["bad_rows"] == 3


def test_interrupted_run_never_looks_finished(formats, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run([formats["jsonl"]], out)
    calls = {"n": 0}
    original = shards.ShardWriter.add

    def crash_midway(self, ids, n_bytes):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C halfway
        return original(self, ids, n_bytes)

    monkeypatch.setattr(shards.ShardWriter, "add", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        run([formats["jsonl"]], out, seed=5, force=True, shard_tokens=1024)
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tmp"))
    with pytest.raises(UserError, match="not a prepared data directory"):
        PreparedData(out)
    monkeypatch.setattr(shards.ShardWriter, "add", original)
    s = run([formats["jsonl"]], out, seed=5)  # leftovers of our own are cleared without --force
    assert not s["up_to_date"] and PreparedData(out).manifest["settings"]["seed"] == 5


def test_killed_process_leaves_no_manifest(formats, tmp_path):
    import subprocess
    import sys
    import time

    big = tmp_path / "big.jsonl"
    with open(big, "w", encoding="utf-8") as fh:
        for i in range(20000):
            fh.write(json.dumps({"text": f"{i} " + DOCS[i % len(DOCS)] * 5}) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "budgetlm", "data", "prepare", str(big), "--out", str(out), "--set", "vocab_size=320", "--set", "workers=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline and not (out / "tokenizer.json").exists():
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not (out / "manifest.json").exists()
    with pytest.raises(UserError):
        PreparedData(out)


def test_txt_without_blank_lines_is_still_cut_so_memory_stays_bounded(tmp_path):
    from budgetlm.data.sources import InputFile

    one_line = "".join(chr(ord("a") + i % 26) for i in range(5000))
    lines = "\n".join(f"line {i} " + "x" * 40 for i in range(200))
    for name, text in (("one.txt", one_line), ("lines.txt", lines)):
        (tmp_path / name).write_text(text, encoding="utf-8")
    c = cfg(txt_document_chars=100)
    f = InputFile(tmp_path / "one.txt", "txt", "", 5000, True)
    docs = list(iter_documents([f], c, ReadStats()))
    assert max(len(d) for d in docs) <= 800 and "".join(docs) == one_line  # hard cuts lose nothing
    f = InputFile(tmp_path / "lines.txt", "txt", "", len(lines), True)
    docs = list(iter_documents([f], c, ReadStats()))
    assert len(docs) > 5 and max(len(d) for d in docs) <= 800 and "\n".join(docs) == lines  # cut at line ends
