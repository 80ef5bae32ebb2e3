"""One command line: every verb's flags follow the same rules (defaults in --help, `-` or `_`,
aliases, --set, --print-config, errors under the verb's own usage), and `--json` leaves only JSON
on stdout for every verb."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest
import yaml
from test_data_fetch import mocked_pip  # noqa: F401 (a fixture)
from test_suite import _corpus

from budgetlm.cli import COMMANDS, build_parser, main, verb_parser
from budgetlm.config import ParallelConfig, RunConfig, apply_overrides
from budgetlm.errors import UserError
from budgetlm.flags import DEST

# what each verb needs besides its settings, to parse
REQUIRED = {
    "data fetch": ["shakespeare"],
    "data prepare": ["IN", "--out", "OUT"],
    "pretrain": [],
    "plan": ["--budget", "1h"],
    "eval": ["RUN"],
    "generate": ["RUN", "--prompt", "x"],
    "finetune": ["RUN", "--train", "F", "--out", "O"],
    "predict": ["DIR", "--input", "F"],
    "suite": ["RUN"],
    "export": ["RUN", "--format", "hf", "--out", "O"],
    "import": ["HF_DIR", "--out", "O"],
    "compress": ["RUN", "--method", "int8", "--out", "O"],
    "runs": ["DIR"],
    "serve": ["RUN"],
}
NO_JSON = {"serve"}  # a server answers over HTTP; it prints no result


def write_reviews(path: Path, n: int = 40) -> None:
    """A headerless `label,text` CSV of short film reviews."""
    r = random.Random(0)
    good, bad = ["good", "great", "moving", "fine"], ["bad", "dull", "boring", "awful"]
    rows = []
    for _ in range(n):
        label = r.choice(["pos", "neg"])
        rows.append(f"{label},the film was {r.choice(good if label == 'pos' else bad)}\n")
    path.write_text("".join(rows))


def sub(verb: str) -> argparse.ArgumentParser:
    return verb_parser(build_parser(), verb.split())


def settings_actions(verb: str) -> list[argparse.Action]:
    return [a for a in sub(verb)._actions if a.dest.startswith(DEST) and a.help != argparse.SUPPRESS]


@pytest.mark.parametrize("verb", sorted(REQUIRED))
def test_help_shows_every_default(verb):
    parser = sub(verb)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        text = formatter._expand_help(action)
        if action.dest.startswith(DEST) or action.default not in (None, False, argparse.SUPPRESS):
            assert "(default:" in text, f"{verb} {action.option_strings[0]}: {text}"
    assert "(default:" in parser.format_help()  # every verb's settings show their defaults


@pytest.mark.parametrize("verb", sorted(REQUIRED))
def test_every_flag_takes_either_spelling(verb):
    actions = settings_actions(verb)
    assert actions, f"{verb} has no settings dataclass"
    for action in actions:
        flag = action.option_strings[0]
        underscored = "--" + flag[2:].replace("-", "_")
        value = [] if action.const == "true" else ["1"]
        for spelling in {flag, underscored}:
            args = build_parser().parse_args([*verb.split(), *REQUIRED[verb], spelling, *value])
            assert getattr(args, action.dest) == (value[0] if value else "true"), spelling
    args = build_parser().parse_args(["plan", "--budget", "1h", "--set", "model.n_layer=2"])
    assert args.set == ["model.n_layer=2"]


def test_every_verb_has_json_and_its_required_arguments_are_known():
    for verb in COMMANDS:
        if verb in NO_JSON:
            continue
        assert "--json" in sub(verb)._option_string_actions, f"{verb} has no --json"
        assert verb in REQUIRED and verb in JSON_CASES, f"add {verb!r} to REQUIRED and JSON_CASES in tests/test_cli.py"


def test_aliases_from_the_ecosystem_land_on_our_keys():
    args = build_parser().parse_args(["pretrain", "--train.learning_rate", "0.1", "--model.block-size", "64", "--train.max_grad_norm", "0.5"])
    cfg = apply_overrides(RunConfig(), [f"{k[len(DEST):]}={v}" for k, v in vars(args).items() if k.startswith(DEST)])
    assert (cfg.train.lr, cfg.model.seq_len, cfg.train.grad_clip) == (0.1, 64, 0.5)
    assert vars(build_parser().parse_args(["generate", "R", "--prompt", "x", "--max_tokens", "7"]))[DEST + "max_new_tokens"] == "7"
    assert vars(build_parser().parse_args(["finetune", *REQUIRED["finetune"], "--learning-rate", "1e-3"]))[DEST + "lr"] == "1e-3"
    cfg = apply_overrides(RunConfig(), ["train.learning_rate=0.2", "model.hidden_size=128", "train.compile=false"])
    assert (cfg.train.lr, cfg.model.n_embd, cfg.train.compile) == (0.2, 128, "false")
    assert "(also: learning_rate)" in " ".join(sub("pretrain").format_help().split())  # the help line names the aliases


def test_unknown_flag_is_refused_under_the_verbs_usage_naming_the_full_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--lr", "3e-4"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: budgetlm pretrain") and "did you mean --train.lr?" in err
    with pytest.raises(SystemExit):
        main(["generate", "RUN", "--prompt", "x", "--max-new-tokenz", "5"])
    err = capsys.readouterr().err
    assert err.startswith("usage: budgetlm generate") and "did you mean --max-new-tokens?" in err
    with pytest.raises(SystemExit):
        main(["data", "prepare", "IN", "--out", "O", "--vocab-sizes", "9"])
    assert capsys.readouterr().err.startswith("usage: budgetlm data prepare")


def test_set_names_the_full_key(capsys, tmp_path):
    for item, hint in (("lr=3e-4", "train.lr"), ("train.learning_rat=1", "train.lr"), ("n_layers=2", "model.n_layer")):
        assert main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--set", item]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"did you mean '{hint}'?" in err, err
    assert main(["finetune", *REQUIRED["finetune"], "--set", "learning_rat=1"]) == 2
    assert "did you mean 'lr'?" in capsys.readouterr().err


def test_print_config_shows_the_resolved_settings(capsys):
    assert main(["pretrain", "--recipe", "gpt-124m-1gpu", "--budget", "1h", "--train.learning-rate", "1e-4", "--print-config"]) == 0
    captured = capsys.readouterr()
    cfg = yaml.safe_load(captured.out)
    assert "auto:" not in captured.err  # a recipe is complete: nothing is planned
    assert cfg["train"]["lr"] == 1e-4 and cfg["budget"]["limit"] == "1h" and cfg["recipe"] == "gpt-124m-1gpu" and cfg["model"]["n_layer"] == 12
    assert main(["pretrain", "--model.n_layer", "3", "--print-config"]) == 0
    captured = capsys.readouterr()
    assert yaml.safe_load(captured.out)["model"]["n_layer"] == 3 and "chosen for the budget when the run starts" in captured.err
    assert main(["finetune", *REQUIRED["finetune"], "--method", "lora", "--lora_rank", "4", "--print-config", "--json"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["method"], cfg["lora_rank"], cfg["epochs"]) == ("lora", 4, 3.0)
    assert main(["generate", "RUN", "--prompt", "x", "--temperature", "nope", "--print-config"]) == 2
    assert "config key 'temperature': expected a number" in capsys.readouterr().err


def test_export_import_compress_settings_resolve_like_the_other_verbs(capsys):
    assert main(["export", "RUN", "--out", "O", "--format", "gguf", "--set", "dtype=q8_0", "--print-config", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"format": "gguf", "dtype": "q8_0", "peft": False}
    assert main(["export", "RUN", "--out", "O", "--dtype", "f17", "--print-config"]) == 2
    assert "'f17' is not one of auto, f32, f16, q8_0" in capsys.readouterr().err
    assert main(["import", "HF", "--out", "O", "--max_position_embeddings", "128", "--print-config", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seq_len"] == 128  # the HF name lands on ours


def test_compress_set_keeps_run_keys_apart_from_its_own_settings(capsys, monkeypatch):
    """`compress --set` takes compress settings; a dotted key is a run key of the model that trains, as it was
    before the verb had settings, and --train-set names those keys outright."""
    seen = {}
    monkeypatch.setattr("budgetlm.compress.command.compress", lambda run, out, cfg, train_set: seen.update(cfg=cfg, train_set=train_set) or {})
    args = ["compress", "RUN", "--out", "O", "--method", "distill", "--set", "alpha=0.25", "--set", "model.n_layer=2",
            "--train-set", "train.lr=1e-4", "--importance_batches", "3", "--json"]  # fmt: skip
    assert main(args) == 0
    assert (seen["cfg"].method, seen["cfg"].alpha, seen["cfg"].importance_batches) == ("distill", 0.25, 3)
    assert seen["train_set"] == ["model.n_layer=2", "train.lr=1e-4"]
    assert main(["compress", "RUN", "--out", "O", "--method", "prune", "--set", "kep=0.3"]) == 2
    assert "did you mean 'keep'?" in capsys.readouterr().err
    assert main(["compress", "RUN", "--out", "O", "--method", "int8", "--keep", "0.3", "--print-config", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["keep"] == 0.3


def test_compress_refuses_a_missing_method_and_run_keys_where_nothing_trains(capsys, tmp_path):
    assert main(["compress", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "give --method" in capsys.readouterr().err
    assert main(["compress", str(tmp_path), "--out", str(tmp_path / "o"), "--method", "int8", "--train-set", "train.lr=1"]) == 2
    assert "int8 trains nothing" in capsys.readouterr().err


def test_parallel_degrees_say_they_need_torchrun():
    text = sub("pretrain").format_help()
    assert "torchrun --nproc_per_node=N" in text
    from budgetlm.distributed.dims import ParallelDims

    with pytest.raises(UserError, match="do not multiply to the 1 process started .*torchrun"):
        ParallelDims.resolve(ParallelConfig(tp=2), 1)


# ---------------------------------------------------------------------------------------------
# --json: stdout is one JSON document, whatever the verb


@pytest.fixture(scope="module")
def world(prepared_bpe, tmp_path_factory):
    """A tiny pretrained run, a labelled file, a fine-tuned model and the suite's corpora."""
    d = tmp_path_factory.mktemp("json")
    run = d / "run"
    tiny = ["--set", "model.n_layer=1", "--set", "model.n_head=2", "--set", "model.n_embd=32", "--set", "model.seq_len=32",
            "--set", "train.batch_tokens=256", "--set", "train.eval_tokens=512", "--set", "auto=false"]  # fmt: skip
    assert main(["pretrain", "--data", str(prepared_bpe), "--out", str(run), "--budget", "steps:3", *tiny]) == 0
    write_reviews(d / "reviews.csv")
    assert main(["finetune", str(run), "--train", str(d / "reviews.csv"), "--out", str(d / "ft"), "--epochs", "1", "--batch-size", "8"]) == 0
    (d / "pattern").mkdir()
    _corpus(d / "pattern")
    corpus = Path(__file__).parent / "data" / "shakespeare"
    assert main(["export", str(run), "--format", "hf", "--out", str(d / "hf")]) == 0  # what the import case reads
    return {"data": prepared_bpe, "run": run, "dir": d, "corpus": corpus, "tiny": tiny}


JSON_CASES = {
    "data fetch": lambda w: ["data", "fetch", "shakespeare", "--dest", str(w["dir"] / "cache")],
    "data prepare": lambda w: ["data", "prepare", str(w["corpus"]), "--out", str(w["dir"] / "data"), "--vocab-size", "300",
                               "--txt-document-chars", "4096", "--workers", "1"],  # fmt: skip
    "pretrain": lambda w: ["pretrain", "--data", str(w["data"]), "--out", str(w["dir"] / "run2"), "--budget", "steps:2", *w["tiny"]],
    "plan": lambda w: ["plan", "--budget", "24h", "--gpu", "H100"],
    "eval": lambda w: ["eval", str(w["run"]), "--tokens", "256"],
    "generate": lambda w: ["generate", str(w["run"]), "--prompt", "KING", "--max_new_tokens", "4"],
    "finetune": lambda w: ["finetune", str(w["run"]), "--train", str(w["dir"] / "reviews.csv"), "--out", str(w["dir"] / "ft2"), "--epochs", "1"],
    "predict": lambda w: ["predict", str(w["dir"] / "ft"), "--input", str(w["dir"] / "reviews.csv")],
    "suite": lambda w: ["suite", str(w["run"]), "--tasks", "sentiment", "--seeds", "1", "--max-train", "20", "--budget", "steps:2"],
    "export": lambda w: ["export", str(w["run"]), "--format", "gguf", "--dtype", "f32", "--out", str(w["dir"] / "gguf")],
    "import": lambda w: ["import", str(w["dir"] / "hf"), "--out", str(w["dir"] / "imported")],
    "compress": lambda w: ["compress", str(w["run"]), "--method", "sparse", "--out", str(w["dir"] / "sparse")],
    "runs": lambda w: ["runs", str(w["dir"])],
}


@pytest.mark.parametrize("verb", sorted(JSON_CASES))
def test_json_prints_only_json_on_stdout(verb, world, capsys, monkeypatch, mocked_pip):  # noqa: F811
    if verb == "suite":
        monkeypatch.setattr("budgetlm.data.fetch.fetch", lambda name, dest=None: world["dir"] / "pattern")
    assert main([*JSON_CASES[verb](world), "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)  # the whole of stdout is one JSON document
    assert isinstance(result, (dict, list)) and result
    if verb == "pretrain":
        assert "step" in err and result["steps"] == 2  # the progress went to stderr
    if verb == "runs":  # the runs the verbs before it made (the cases run in name order)
        status = {r["name"]: r["status"] for r in result}
        assert status["run"] == "finished" and status["run2"] == "finished" and status["sparse"] == "compressed" and status["imported"] == "imported"
        assert "ft" not in status
    if verb == "predict":
        assert result["examples"] == 40 and set(result["predictions"]) <= {"pos", "neg"}
        out_file = world["dir"] / "pred.csv"
        assert main([*JSON_CASES[verb](world), "--output", str(out_file), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["output"] == str(out_file) and out_file.is_file()
