"""An honest validation split: `data prepare` holds out at least `min_val_tokens` tokens (at most a
tenth of the corpus), cutting a long document if it must, says how many, and warns when it could
not; the pretraining report warns when an evaluation scored fewer tokens than asked."""

from __future__ import annotations

from test_data_prepare import decoded_docs, rejoin_cut
from test_pretrain import tiny_args

from budgetlm.cli import main
from budgetlm.config import PrepareConfig
from budgetlm.data.clean import clean_text
from budgetlm.data.dataset import PreparedData
from budgetlm.data.prepare import format_summary, prepare


def _one_long_document(sample_text_dir, path):
    """A .txt without a single blank line: the real sample's lines, run together (one document)."""
    lines = [ln for p in sorted(sample_text_dir.rglob("*.txt")) for ln in p.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
    path.write_text("\n".join(lines), encoding="utf-8")
    return clean_text(path.read_text(encoding="utf-8"))


def test_one_long_document_still_gets_a_validation_split(sample_text_dir, tmp_path):
    text = _one_long_document(sample_text_dir, tmp_path / "book.txt")
    cfg = PrepareConfig(vocab_size=400, workers=1, txt_document_chars=0, min_val_tokens=4096)
    s = prepare([str(tmp_path / "book.txt")], tmp_path / "out", cfg, show_progress=False)
    assert s["documents"] == {"train": 1, "val": 1} and s["val_documents_cut"] == 1
    assert 4096 <= s["tokens"]["val"] < 4096 + 300  # the asked tokens, cut at a line or word start
    assert s["tokens"]["train"] > 5 * s["tokens"]["val"]
    assert rejoin_cut(decoded_docs(tmp_path / "out"), [text]) == [text]  # the two parts are the document, exactly
    data = PreparedData(tmp_path / "out")
    total_bytes = data.split("train")["bytes"] + data.split("val")["bytes"]
    assert total_bytes == len(text.encode("utf-8"))  # bits per byte stays exact on both sides of the cut
    assert not s["warnings"]
    assert "held out" in format_summary(s) and "1 long document(s) cut" in format_summary(s)


def test_small_corpus_is_capped_and_warned_about(sample_text_dir, tmp_path, capsys):
    src = tmp_path / "small.txt"
    src.write_text("\n\n".join(f"Paragraph {i}: " + "words of a small corpus " * 8 for i in range(60)), encoding="utf-8")
    assert main(["data", "prepare", str(src), "--out", str(tmp_path / "out"), "--vocab-size", "300", "--workers", "1", "--json"]) == 0
    import json

    s = json.loads(capsys.readouterr().out)
    total = s["tokens"]["train"] + s["tokens"]["val"]
    assert 0.05 * total < s["tokens"]["val"] <= 0.1 * total + 200  # a tenth at most: the rest must train
    assert s["warnings"] and "fewer than min_val_tokens=65,536" in s["warnings"][0]


def test_report_warns_when_evaluation_scored_fewer_tokens_than_asked(prepared_bpe, tmp_path, capsys):
    run = tmp_path / "run"
    held_out = len(PreparedData(prepared_bpe).tokens("val"))
    assert main(tiny_args(prepared_bpe, run, "steps:2", f"train.eval_tokens={4 * held_out}")) == 0
    out = capsys.readouterr().out
    assert "warning: validation scored" in out and f"train.eval_tokens={4 * held_out:,}" in out
    report = (run / "report.md").read_text()
    assert "fewer than train.eval_tokens" in report and "val_split_tokens" in report


def test_report_does_not_warn_when_the_split_holds_what_was_asked(prepared_bpe, tmp_path, capsys):
    """Scoring whole windows falls short of a split of exactly train.eval_tokens by under one window."""
    run = tmp_path / "run"
    held_out = len(PreparedData(prepared_bpe).tokens("val"))
    assert main(tiny_args(prepared_bpe, run, "steps:2", f"train.eval_tokens={held_out}")) == 0
    assert "warning: validation scored" not in capsys.readouterr().out
    assert "fewer than train.eval_tokens" not in (run / "report.md").read_text()
