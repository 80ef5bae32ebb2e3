"""`budgetlm finetune` / `budgetlm predict` end to end on a tiny run: each task, format and method,
save -> reload gives the same predictions, and bad input gets one error line and exit 2."""

import json
import random

import pytest
import torch
import yaml
from test_finetune_runs import make_tiny_run

from budgetlm.cli import main
from budgetlm.finetune.predict import load_finetuned, predict_examples
from budgetlm.finetune.tasks import read_task_file
from budgetlm.finetune.train import Base, FinetuneConfig, default_lr, fit, load_base, save_finetuned

POS, NEG = ["good", "great", "fun", "fine"], ["bad", "awful", "boring", "dull"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("base") / "run")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    r = random.Random(0)
    rows = []
    for _ in range(40):
        label = r.choice(["pos", "neg"])
        words = POS if label == "pos" else NEG
        rows.append((label, f"the film was {r.choice(words)}", f"the plot was {r.choice(words)}"))
    (d / "cls.csv").write_text("".join(f"{a},{b}\n" for a, b, _ in rows))
    (d / "pair.tsv").write_text("label\tsentence1\tsentence2\n" + "".join(f"{a}\t{b}\t{c}\n" for a, b, c in rows))
    (d / "reg.jsonl").write_text("".join(json.dumps({"text": b, "score": 1.0 if a == "pos" else 0.0}) + "\n" for a, b, _ in rows))
    tag = {"the": "DT", "a": "DT", "dog": "NN", "cat": "NN", "mat": "NN", "sat": "VB", "ran": "VB", "on": "IN"}
    sents = [["the", r.choice(["dog", "cat"]), r.choice(["sat", "ran"]), "on", "a", "mat"] for _ in range(30)]
    (d / "pos.txt").write_text("".join(" ".join(f"{w}/{tag[w]}" for w in s) + "\n" for s in sents))
    ner = {"the": "O", "a": "O", "dog": "B-ANIMAL", "cat": "B-ANIMAL", "mat": "B-THING", "sat": "O", "ran": "O", "on": "O"}
    (d / "ner.conll").write_text("".join("".join(f"{w} {tag[w]} {ner[w]}\n" for w in s) + "\n" for s in sents))
    return d


def _finetune(run, out, *extra):
    return main(["finetune", str(run), "--out", str(out), "--epochs", "1", "--batch-size", "8", *extra])


@pytest.mark.parametrize(
    "name,task,method,extra",
    [
        ("cls.csv", "classify", "full", []),
        ("pair.tsv", "pair", "adapter", []),
        ("reg.jsonl", "regress", "prefix", ["--label-column", "score"]),
        ("ner.conll", "tag", "lora", []),
        ("pos.txt", "tag", "full", ["--format", "tagged"]),
    ],
)
def test_each_task_format_and_method_through_the_cli(run, files, tmp_path, capsys, name, task, method, extra):
    out = tmp_path / "ft"
    assert _finetune(run, out, "--train", str(files / name), "--task", task, "--method", method, "--json", *extra) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["trainable_params"] > 0 and summary["metric"].startswith(("accuracy", "spearman", "span_f1", "token_accuracy"))
    width = yaml.safe_load((run / "config.yaml").read_text())["model"]["n_embd"]
    assert summary["peak_lr"] == pytest.approx(default_lr(method, width))
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["task"] == task and meta["method"] == method and meta["base"]["run"] == str(run.resolve())
    if task == "tag" and name.endswith(".conll"):
        assert meta["labels"] == ["B-ANIMAL", "B-THING", "O"] and "val_span_f1" in meta["summary"]
    pred_file = tmp_path / ("pred" + (".txt" if name.endswith(".txt") else name[name.index(".") :]))
    fmt_flag = ["--format", "tagged"] if "--format" in extra else []
    assert main(["predict", str(out), "--input", str(files / name), "--output", str(pred_file), *fmt_flag]) == 0
    fmt = "tagged" if name.endswith(".txt") else None
    got = read_task_file(pred_file, task, fmt, labelled=False)
    assert len(got.examples) == len(read_task_file(files / name, task, fmt, labelled=False).examples)


def test_default_lr_scales_full_finetuning_with_width():
    assert default_lr("full", 768) == pytest.approx(1e-4)
    assert default_lr("full", 128) == pytest.approx(6e-4)  # the demo body
    assert default_lr("full", 1536) == pytest.approx(5e-5)
    for method in ("lora", "adapter", "prefix"):
        assert default_lr(method, 128) == default_lr(method, 768)


@pytest.mark.parametrize("method", ["full", "lora", "adapter", "prefix"])
def test_saved_model_reloads_to_the_same_predictions(run, files, tmp_path, method):
    data = read_task_file(files / "cls.csv", "classify").examples
    base = load_base(run)
    cfg = FinetuneConfig(method=method, epochs=1, batch_size=8, seed=1, prefix_len=4, adapter_size=8)
    result = fit(base, data[:30], data[30:], cfg, log=lambda *a: None)
    with torch.no_grad():  # make the trained state distinctive, so equality is not an accident of a near-zero update
        for n, p in result.model.named_parameters():
            if p.requires_grad and n.startswith("head."):
                p.add_(torch.randn_like(p) * 0.5)
    expected = predict_examples(result.model, base.tokenizer, data, result.space, 64)
    save_finetuned(tmp_path / "ft", result, base, cfg, {"format": "csv", "columns": {}})
    model, tok, space, _ = load_finetuned(tmp_path / "ft")
    assert predict_examples(model, tok, data, space, 64) == expected
    if method != "full":
        from safetensors.torch import load_file

        saved = load_file(str(tmp_path / "ft" / "head_and_method.safetensors"))
        assert not any(k.startswith("body.tok_embeddings") for k in saved)  # the base run is referenced, not copied


def test_random_init_baseline_differs_from_the_pretrained_body(run):
    pretrained, rand = load_base(run), load_base(run, random_init=True, seed=5)
    assert isinstance(rand, Base) and rand.info["random_init"]
    a, b = pretrained.body.tok_embeddings.weight, rand.body.tok_embeddings.weight
    assert a.shape == b.shape and not torch.equal(a, b)


def _one_error_line(capsys, code):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_bad_inputs_give_one_error_line(run, files, tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert "is empty" in _one_error_line(capsys, _finetune(run, tmp_path / "o1", "--train", str(empty)))
    nolabel = tmp_path / "nolabel.csv"
    nolabel.write_text("text,other\nhello,1\nbye,2\n")
    assert "no label column" in _one_error_line(capsys, _finetune(run, tmp_path / "o2", "--train", str(nolabel)))
    valid = tmp_path / "valid.csv"
    valid.write_text("neutral,the film was fine\npos,the film was good\n")
    msg = _one_error_line(capsys, _finetune(run, tmp_path / "o3", "--train", str(files / "cls.csv"), "--valid", str(valid)))
    assert "not seen in training" in msg and "'neutral'" in msg
    bad_tags = tmp_path / "bad.txt"
    bad_tags.write_text("the/DT dog/NN\nthe dog/NN\n")
    msg = _one_error_line(capsys, _finetune(run, tmp_path / "o4", "--train", str(bad_tags), "--task", "tag", "--format", "tagged"))
    assert "misaligned tagged token at line 2" in msg


def test_tokenizer_mismatch_is_detected(files, tmp_path, capsys):
    run = make_tiny_run(tmp_path / "run")
    out = tmp_path / "ft"
    assert _finetune(run, out, "--train", str(files / "cls.csv"), "--method", "lora") == 0
    capsys.readouterr()
    other = make_tiny_run(tmp_path / "other", "masked")  # a WordPiece tokenizer
    (run / "tokenizer.json").write_text((other / "tokenizer.json").read_text())
    msg = _one_error_line(capsys, main(["predict", str(out), "--input", str(files / "cls.csv")]))
    assert "tokenizer" in msg and "does not match" in msg
    # a run whose tokenizer is larger than its model's vocabulary cannot be fine-tuned at all
    big = make_tiny_run(tmp_path / "big")
    data = yaml.safe_load((big / "config.yaml").read_text())
    data["model"]["vocab_size"] = 8
    (big / "config.yaml").write_text(yaml.safe_dump(data))
    code = _finetune(big, tmp_path / "o5", "--train", str(files / "cls.csv"))
    assert code == 2 and "does not match" in capsys.readouterr().err


def test_masked_body_and_step_budget(files, tmp_path, capsys):
    run = make_tiny_run(tmp_path / "masked", "masked")
    for name, task in (("cls.csv", "classify"), ("ner.conll", "tag")):
        out = tmp_path / f"ft-{task}"
        assert _finetune(run, out, "--train", str(files / name), "--task", task, "--budget", "steps:2", "--lr", "3e-3", "--json") == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["steps"] == 2 and summary["peak_lr"] == 3e-3
        meta = json.loads((out / "finetune.json").read_text())
        assert meta["base"]["objective"] == "masked" and meta["pooling"] == "mean"
        assert main(["predict", str(out), "--input", str(files / name)]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == (40 if task == "classify" else 30 * 7 - 1)  # csv rows; conll: 6 words + blank per sentence


def test_run_whose_tokenizer_is_not_its_datas_is_refused(files, tmp_path, capsys):
    run = make_tiny_run(tmp_path / "run")
    (run / "data.json").write_text(json.dumps({"tokenizer_sha256": "0" * 64}))
    msg = _one_error_line(capsys, _finetune(run, tmp_path / "out", "--train", str(files / "cls.csv")))
    assert "not the one its data was prepared with" in msg


def test_a_validation_tag_unseen_in_training_is_scored_as_an_error(run, files, tmp_path, capsys):
    valid = tmp_path / "valid.txt"
    valid.write_text("the/DT dog/NN sat/VB oh/UH\nthe/DT cat/NN ran/VB on/IN a/DT mat/NN\nwow/UH the/DT cat/NN sat/VB\n")
    out = tmp_path / "ft"
    code = _finetune(run, out, "--train", str(files / "pos.txt"), "--valid", str(valid), "--task", "tag", "--format", "tagged", "--json")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["valid_unseen_tag_tokens"] == 2
    assert "warning: 2 of 14 validation tokens (14.29%) carry 1 tag(s) never seen in training ('UH' x2)" in captured.err
    assert summary["val_token_accuracy"] <= 12 / 14  # the two UH tokens can never be right
    # classification still refuses an unseen class: most often a wrong label column
    valid_cls = tmp_path / "valid.csv"
    valid_cls.write_text("neutral,the film was fine\npos,the film was good\n")
    msg = _one_error_line(capsys, _finetune(run, tmp_path / "ft2", "--train", str(files / "cls.csv"), "--valid", str(valid_cls)))
    assert "not seen in training: 'neutral'" in msg and "check the label column" in msg
