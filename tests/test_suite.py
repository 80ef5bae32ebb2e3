"""The downstream suite: corpus loading, fixed splits, the table, and the command on a tiny run."""

import json

from test_finetune_runs import make_tiny_run

from budgetlm.cli import main
from budgetlm.evaluate.suite import make_splits, split_sentences, table
from budgetlm.finetune.tasks import Example


def _corpus(folder):
    rows = [f'"{1 if i % 2 else -1}","the film was {"good" if i % 2 else "bad"} , {i}\n"\n' for i in range(60)]
    (folder / "polarity-en-pang&lee2.csv").write_text("\ufeff" + "".join(rows))
    line = "The/DT cat/NN sat/VBD ./. A/DT dog/NN ran/VBD ./.\n"
    (folder / "tagged-en-wsj.txt").write_text(line * 30 + "Oh/UH ./.\n")


def test_split_sentences_cuts_after_final_punctuation():
    ex = Example(["A", "b", ".", "C", "d"], None, ["DT", "NN", ".", "DT", "NN"])
    assert [s.text for s in split_sentences([ex])] == [["A", "b", "."], ["C", "d"]]


def test_test_split_is_fixed_and_seeds_vary_training():
    examples = [Example(str(i), None, "x") for i in range(100)]
    a_train, a_valid, a_test = make_splits(examples, 0, 0.2, 0.1, 50, 1000)
    b_train, b_valid, b_test = make_splits(examples, 1, 0.2, 0.1, 50, 1000)
    assert [e.text for e in a_test] == [e.text for e in b_test] and len(a_test) == 20
    assert [e.text for e in a_train] != [e.text for e in b_train] and len(a_train) == 50
    assert not {e.text for e in a_train + a_valid} & {e.text for e in a_test}


def test_suite_command_writes_table_json_and_markdown(tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "pattern"
    corpus.mkdir()
    _corpus(corpus)
    monkeypatch.setattr("budgetlm.data.fetch.fetch", lambda name, dest=None: corpus)
    run = make_tiny_run(tmp_path / "run")
    argv = ["suite", str(run), "--seeds", "2", "--baseline", "--max-train", "40", "--epochs", "1", "--budget", "steps:3", "--json"]
    assert main(argv) == 0
    results = json.loads(capsys.readouterr().out)
    assert set(results["tasks"]) == {"sentiment", "pos"}
    acc = results["tasks"]["sentiment"]["metrics"]["accuracy"]
    assert len(acc["score"]["runs"]) == 2 and len(acc["random_body"]["runs"]) == 2 and 0 <= acc["majority"]["mean"] <= 1
    md = (run / "suite.md").read_text()
    assert "| task | metric | score | majority baseline | random body |" in md and "| pos | token_accuracy |" in md
    assert json.loads((run / "suite.json").read_text())["seeds"] == 2
    assert table(results).count("\n") == 4  # header, rule, 3 rows


def test_suite_rejects_unknown_task(tmp_path, capsys):
    run = make_tiny_run(tmp_path / "run")
    assert main(["suite", str(run), "--tasks", "parsing"]) == 2
    assert "unknown suite task" in capsys.readouterr().err
