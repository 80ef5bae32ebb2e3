"""The Python API: the README's example runs as written, `import budgetlm` stays light, settings
are taken as keyword arguments or config objects, and errors are the CLI's."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_cli import write_reviews

import budgetlm
from budgetlm.cli import main
from budgetlm.config import FinetuneConfig, RunConfig, apply_settings
from budgetlm.errors import UserError

README = Path(__file__).parent.parent / "README.md"
SAMPLE = Path(__file__).parent / "data" / "shakespeare"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    marker = text.index("<!-- api-example")
    match = re.search(r"```python\n(.*?)```", text[marker:], re.S)
    assert match, "the README's API example block is missing"
    return match.group(1)


def test_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    corpus = "".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(SAMPLE.rglob("*.txt"))[:2])
    (tmp_path / "corpus.txt").write_text(corpus[:200_000])
    write_reviews(tmp_path / "reviews.csv")
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert (tmp_path / "run" / "model.safetensors").is_file() and (tmp_path / "ft" / "finetune.json").is_file()
    assert re.search(r"^30 \d+\.\d+$", out, re.M), out  # steps and val_bpb of the run
    assert "refused: cannot read budget 'soon'" in out
    assert re.search(r"^\['(pos|neg)', '(pos|neg)'\]$", out, re.M), out


def test_import_and_help_stay_light():
    code = (
        "import sys, budgetlm\n"
        "assert 'torch' not in sys.modules, 'import budgetlm loaded torch'\n"
        "from budgetlm.cli import build_parser\n"
        "build_parser().format_help()\n"
        "assert 'torch' not in sys.modules, 'building the CLI loaded torch'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_api_names_that_are_also_modules_stay_both():
    import budgetlm.pretrain as module

    assert budgetlm.pretrain is module and callable(module) and hasattr(module, "pretrain_command")
    from budgetlm import finetune

    assert callable(finetune) and hasattr(finetune, "train")
    assert set(budgetlm.__all__) <= set(dir(budgetlm))


def test_errors_are_the_cli_lines(prepared_bpe, tmp_path, capsys):
    with pytest.raises(UserError) as e:
        budgetlm.pretrain(data=prepared_bpe, out=tmp_path / "r", budget="soon")
    assert main(["pretrain", "--data", str(prepared_bpe), "--out", str(tmp_path / "r"), "--budget", "soon"]) == 2
    assert capsys.readouterr().err.strip() == f"budgetlm pretrain: error: {e.value}"
    with pytest.raises(UserError, match=r"unknown config key 'train.lrr' \(did you mean 'train.lr'\?\)"):
        budgetlm.pretrain(data=prepared_bpe, out=tmp_path / "r", train={"lrr": 1})
    with pytest.raises(UserError, match="config must be a budgetlm.config.RunConfig"):
        budgetlm.pretrain(data=prepared_bpe, out=tmp_path / "r", config=FinetuneConfig())
    with pytest.raises(UserError, match="is not a budgetlm run directory"):
        budgetlm.load(tmp_path)


def test_keyword_settings_leaf_alias_section_and_dotted():
    cfg = RunConfig()
    keys = apply_settings(cfg, {"learning_rate": 3e-3, "n_layer": 3, "model": {"block_size": 96}, "train.max_grad_norm": 0.5, "auto": False})
    assert (cfg.train.lr, cfg.model.n_layer, cfg.model.seq_len, cfg.train.grad_clip, cfg.auto) == (3e-3, 3, 96, 0.5, False)
    assert keys == {"train.lr", "model.n_layer", "model.seq_len", "train.grad_clip", "auto"}
    with pytest.raises(UserError, match="expected an integer"):
        apply_settings(RunConfig(), {"n_layer": "three"})
    ft = FinetuneConfig()
    apply_settings(ft, {"num_train_epochs": 2, "learning_rate": 1e-3, "text_column": "007"})
    assert (ft.epochs, ft.lr, ft.text_column) == (2.0, 1e-3, "007")  # text stays text


@dataclass
class A:
    seed: int = 0


@dataclass
class B:
    seed: int = 0


@dataclass
class Root:
    a: A = field(default_factory=A)
    b: B = field(default_factory=B)


def test_a_leaf_in_two_sections_must_be_named_by_section():
    with pytest.raises(UserError, match=r"setting 'seed' is ambiguous \(a.seed, b.seed\)"):
        apply_settings(Root(), {"seed": 1})
    root = Root()
    apply_settings(root, {"b": {"seed": 2}})
    assert (root.a.seed, root.b.seed) == (0, 2)


def test_pretrain_takes_a_config_object_and_the_model_generates(prepared_bpe, tmp_path):
    cfg = RunConfig()
    apply_settings(cfg, {"n_layer": 1, "n_head": 2, "n_embd": 32, "seq_len": 32, "batch_tokens": 256, "eval_tokens": 512, "auto": False})
    summary = budgetlm.pretrain(data=prepared_bpe, out=tmp_path / "run", budget="steps:3", config=cfg)
    assert summary["steps"] == 3 and summary["params"] > 0
    assert cfg.data == ""  # the caller's object is not changed
    model = budgetlm.load(tmp_path / "run", device="cpu")
    assert model.config.model.n_layer == 1
    pieces = []
    out = model.generate("KING", max_tokens=5, temperature=0, on_text=pieces.append)
    assert out["tokens"] <= 5 and "".join(pieces) == out["completion"]
    assert model.generate("KING", max_new_tokens=5, temperature=0)["completion"] == out["completion"]  # greedy: deterministic
    metrics = model.evaluate(tokens=256)
    assert metrics["val_tokens"] <= 256 + 32 and metrics["val_bpb"] > 0
