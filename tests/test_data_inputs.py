"""`data prepare` inputs beyond plain files: Arrow files, folders saved by Hugging Face `datasets`
(read with pyarrow alone), Hub names (refused with one line offline), the text-field choice, and a
tokenizer brought from elsewhere with its own end-of-sequence token (`--eos-token`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")

from test_data_prepare import DOCS, decoded_docs  # noqa: E402

from budgetlm.cli import main  # noqa: E402
from budgetlm.config import PrepareConfig  # noqa: E402
from budgetlm.data.clean import clean_text  # noqa: E402
from budgetlm.data.dataset import PreparedData  # noqa: E402
from budgetlm.data.prepare import prepare  # noqa: E402
from budgetlm.data.tokenizer import Tokenizer  # noqa: E402


def _cfg(**kw) -> PrepareConfig:
    return PrepareConfig(**{"vocab_size": 320, "workers": 1, "val_fraction": 0.1, "min_val_tokens": 0, **kw})


def write_arrow(path: Path, columns: dict, stream: bool = True, batch_rows: int = 10) -> Path:
    """An Arrow IPC file as `datasets` writes it (stream format), in batches of `batch_rows`."""
    table = pa.table(columns)
    with pa.OSFile(str(path), "wb") as sink:
        opener = pa.ipc.new_stream if stream else pa.ipc.new_file
        with opener(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=batch_rows):
                writer.write_batch(batch)
    return path


def save_to_disk_folder(folder: Path, texts: list[str], n_files: int = 2) -> Path:
    """What `Dataset.save_to_disk` writes: data-0000i-of-0000n.arrow, state.json, dataset_info.json."""
    folder.mkdir(parents=True)
    per = -(-len(texts) // n_files)
    names = []
    for i in range(n_files):
        name = f"data-{i:05d}-of-{n_files:05d}.arrow"
        write_arrow(folder / name, {"text": texts[i * per : (i + 1) * per], "id": list(range(len(texts[i * per : (i + 1) * per])))})
        names.append(name)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names], "_split": "train"}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string", "_type": "Value"}}}))
    return folder


def _tokens(out: Path) -> dict:
    m = PreparedData(out).manifest
    return {s: [sh["sha256"] for sh in m["splits"][s]["shards"]] for s in ("train", "val")}


def test_saved_dataset_folder_prepares_like_the_same_jsonl(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    saved = save_to_disk_folder(tmp_path / "saved", DOCS)
    a = prepare([str(jsonl)], tmp_path / "a", _cfg(), show_progress=False)
    b = prepare([str(saved)], tmp_path / "b", _cfg(), show_progress=False)
    assert _tokens(tmp_path / "a") == _tokens(tmp_path / "b")  # the same tokens, shard for shard
    assert a["documents"] == b["documents"] and b["input_files"] == 2

    # a DatasetDict folder gives its train split; a single arrow file (either IPC format) reads alone
    dd = tmp_path / "dict"
    dd.mkdir()
    save_to_disk_folder(dd / "train", DOCS, n_files=1)
    save_to_disk_folder(dd / "test", DOCS[:3], n_files=1)
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    c = prepare([str(dd)], tmp_path / "c", _cfg(), show_progress=False)
    assert c["documents"] == a["documents"]
    file_format = write_arrow(tmp_path / "f.arrow", {"text": DOCS}, stream=False)
    assert sorted(decoded_docs(Path(prepare([str(file_format)], tmp_path / "d", _cfg(), show_progress=False)["out"]))) == sorted(
        decoded_docs(tmp_path / "a")
    )


def test_text_field_choice(tmp_path, capsys):
    one = write_arrow(tmp_path / "one.arrow", {"content": DOCS, "n": list(range(len(DOCS)))})
    s = prepare([str(one)], tmp_path / "one", _cfg(), show_progress=False)  # the only text column is taken
    assert s["documents"]["train"] + s["documents"]["val"] == len(DOCS)

    two = write_arrow(tmp_path / "two.arrow", {"title": [d[:10] for d in DOCS], "body": DOCS})
    assert main(["data", "prepare", str(two), "--out", str(tmp_path / "x"), "--vocab-size", "320"]) == 2
    err = capsys.readouterr().err
    assert "which one holds the text? set --text-field to one of: title, body" in err and len(err.strip().splitlines()) == 1
    args = ["data", "prepare", str(two), "--out", str(tmp_path / "y"), "--vocab-size", "320", "--text-field", "body", "--min-val-tokens", "0"]
    assert main(args) == 0
    assert sorted(decoded_docs(tmp_path / "y")) == sorted(decoded_docs(tmp_path / "one"))
    assert main(["data", "prepare", str(one), "--out", str(tmp_path / "z"), "--text-field", "n"]) == 2
    assert "field 'n' holds int64, not text" in capsys.readouterr().err

    broken = tmp_path / "broken"
    save_to_disk_folder(broken, DOCS)
    (broken / "data-00001-of-00002.arrow").unlink()
    assert main(["data", "prepare", str(broken), "--out", str(tmp_path / "w")]) == 2
    assert "listed in state.json is missing" in capsys.readouterr().err


def test_hub_names_are_refused_with_one_line_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["data", "prepare", "hf:roneneldan/TinyStories", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "set offline" in err and "save_to_disk" in err and len(err.strip().splitlines()) == 1
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as on a machine without the library
    assert main(["data", "prepare", "hf:roneneldan/TinyStories:validation", "--out", str(tmp_path / "o")]) == 2
    assert "needs the 'datasets' package" in capsys.readouterr().err
    assert main(["data", "prepare", "hf:", "--out", str(tmp_path / "o")]) == 2
    assert "name a dataset" in capsys.readouterr().err


def _foreign_tokenizer(path: Path) -> Path:
    """A byte-level BPE with Llama-style specials (<s>, </s>) and no post-processor: not budgetlm's."""
    import tokenizers as tk

    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(DOCS, trainer=trainer)
    tok.save(str(path))
    return path


def test_eos_token_names_the_separator_of_a_tokenizer_brought_along(tmp_path, capsys):
    foreign = _foreign_tokenizer(tmp_path / "tokenizer.json")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    base = ["data", "prepare", str(jsonl), "--tokenizer-file", str(foreign)]
    assert main([*base, "--out", str(tmp_path / "a")]) == 2
    assert "--eos-token" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "b"), "--eos-token", "</eos>"]) == 2
    assert "not in the tokenizer's vocabulary" in capsys.readouterr().err

    assert main([*base, "--out", str(tmp_path / "c"), "--eos-token", "</s>", "--min-val-tokens", "0"]) == 0
    data = PreparedData(tmp_path / "c")
    eos = Tokenizer.load(foreign, eos_token="</s>").eos_id
    assert data.separator_id == eos and data.tokenizer.eos_id == eos  # recorded in the prepared tokenizer.json
    assert data.tokenizer.encode("some text") == Tokenizer.load(foreign, eos_token="</s>").encode("some text")
    assert sorted(decoded_docs(tmp_path / "c")) == sorted(clean_text(d) for d in DOCS)  # split at </s>, every document whole

    assert main(["data", "prepare", str(jsonl), "--out", str(tmp_path / "d"), "--eos-token", "</s>"]) == 2
    assert "tokenizer you bring" in capsys.readouterr().err
