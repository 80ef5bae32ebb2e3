"""The end of a run: PNG plots (loss, learning rate, throughput against time) and report.md.

Everything is drawn from the run's metrics log, so a report can be rebuilt for any run.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from budgetlm.config import to_dict
from budgetlm.files import write_text_atomic
from budgetlm.tracking import read_metrics


def _series(records: list[dict], kind: str, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        if r.get("kind") == kind and key in r and "elapsed" in r:
            xs.append(r["elapsed"] / 60)
            ys.append(r[key])
    return xs, ys


def write_plots(run_dir: Path) -> list[Path]:
    """loss.png, lr.png and throughput.png against elapsed minutes; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    panels = [
        ("loss.png", "loss", [("train", "loss", "train"), ("eval", "val_loss", "validation")]),
        ("lr.png", "learning rate", [("train", "lr", "lr")]),
        ("throughput.png", "tokens / s", [("train", "tokens_per_s", "tokens/s")]),
    ]
    written = []
    for name, ylabel, lines in panels:
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
        drawn = False
        for kind, key, label in lines:
            xs, ys = _series(records, kind, key)
            if xs:
                ax.plot(xs, ys, marker="o" if kind == "eval" else None, markersize=3, label=label)
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("elapsed (minutes)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend()
        fig.tight_layout()
        path = plot_dir / name
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _run_section(run_dir: Path) -> list[str]:
    """The command that made the run, when, and on what (env.json, written when the run started)."""
    env_file = run_dir / "env.json"
    if not env_file.is_file():
        return []
    env = json.loads(env_file.read_text(encoding="utf-8"))
    code = f"budgetlm {env.get('budgetlm')}" + (f" (git {env['git']})" if env.get("git") else "")
    device = env.get("gpu") or f"{env.get('cpu')}, {env.get('cpu_count')} cores, {env.get('torch_threads')} torch threads"
    lines = ["", "## Run", "", "```", env.get("command", "?"), "```", ""]
    lines += ["| | |", "| --- | --- |", f"| started | {env.get('started', '?')} |", f"| code | {code} |"]
    lines += [f"| versions | Python {env.get('python')}, torch {env.get('torch')}, numpy {env.get('numpy')}, tokenizers {env.get('tokenizers')} |"]
    lines += [f"| device | {env.get('device')}: {device} |", f"| platform | {env.get('platform')} |"]
    return lines


def write_report(run_dir: Path, cfg, summary: dict, samples: list[tuple[str, str]], plots: list[Path]) -> Path:
    """report.md: what was trained, on what, for how long, how well, and what it writes."""
    run_dir = Path(run_dir)
    lines = ["# budgetlm run report", ""]
    lines += ["## Result", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in summary.items()]
    lines += ["", "## Plots", ""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots] or ["(matplotlib not installed)"]
    if samples:
        lines += ["", "## Samples", ""]
        lines += ["The start of a held-out document (up to the `▌`), then the model's continuation (64 tokens, temperature 0.8, top-k 50).", ""]
        for prompt, text in samples:
            lines += ["```", prompt + "▌" + text, "```", ""]
    plan_file = run_dir / "plan.json"
    if plan_file.is_file():
        from budgetlm.plan import format_plan, plan_from_dict

        lines += ["", "## Why this model", "", "Chosen by `budgetlm plan`'s rules for the budget, timing candidates on this device;"]
        lines += ["keys you set won.", ""]
        lines += ["```", format_plan(plan_from_dict(json.loads(plan_file.read_text(encoding="utf-8")))), "```"]
    lines += _run_section(run_dir)
    lines += ["", "## Configuration", "", "```yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(), "```", ""]
    lines += [
        "## What the clock counts",
        "",
        "The wall-clock budget counts everything from the first training step to the final save:",
        "data loading, compile warm-up, periodic evaluation and checkpoints. Model building and the",
        "one-off peak-FLOP/s measurement happen before the clock starts, and so does choosing the model",
        "for the budget (timing candidate models, cached per machine) and deriving its vocabulary. The end of the budget",
        "is kept for the final evaluation and save: their measured cost with a margin, or `budget.reserve` of it if more.",
        "",
    ]
    return write_text_atomic(run_dir / "report.md", "\n".join(lines))
