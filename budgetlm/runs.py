"""`budgetlm runs DIR`: a table of the run directories under DIR, to compare what was trained.

One row per run (a folder with config.yaml, found at any depth; a run's own folders are not searched):
when it started, whether it finished, its budget, model shape, parameters, tokens and steps seen,
and its final validation bits per byte. Everything is read from the run's own files (env.json,
config.yaml, metrics.jsonl, eval.json), so a killed run shows how far it got, and listing never
imports torch.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml

from budgetlm.errors import UserError
from budgetlm.tracking import read_metrics

SORT_KEYS = ("started", "val_bpb", "name")


def find_runs(root: Path) -> list[Path]:
    """Run directories at or under `root`, in path order."""
    found = []
    for here, dirs, files in os.walk(root):
        if "config.yaml" in files and ({"metrics.jsonl", "model.safetensors"} & set(files) or "checkpoint" in dirs):
            found.append(Path(here))
            dirs.clear()  # a run's checkpoint, plots and tracker folders hold no runs
        dirs.sort()
    return found


def describe(run: Path, root: Path) -> dict:
    """One row: what `budgetlm runs` shows of `run`, as plain values (None where unknown)."""
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    env = _json(run / "env.json")
    model, budget = config.get("model", {}), config.get("budget", {})
    records = read_metrics(run)
    start = next((r for r in records if r.get("event") == "start"), {})
    end = next((r for r in reversed(records) if r.get("event") == "end"), None)
    last = next((r for r in reversed(records) if r.get("kind") == "train"), {})
    final = _json(run / "eval.json")
    if (run / "compression.json").is_file():
        status = "compressed"
    elif end is not None:
        status = "finished"
    elif records:
        status = "stopped"  # killed, or still running: `pretrain --resume` continues it
    else:
        status = "imported" if (run / "model.safetensors").is_file() else "empty"
    shape = f"{model.get('n_layer')}x{model.get('n_embd')}" if model.get("n_layer") else None
    return {
        "name": str(run.relative_to(root)) if run != root else run.name,
        "path": str(run),
        "status": status,
        "started": env.get("started"),
        "objective": model.get("objective"),
        "model": shape,
        "vocab": model.get("vocab_size"),
        "budget": budget.get("limit"),
        "params": (end or start).get("params"),
        "tokens": end["tokens"] if end else last.get("tokens"),
        "steps": end["steps"] if end else last.get("step"),
        "elapsed_s": end.get("elapsed_s") if end else last.get("elapsed"),
        "val_bpb": final.get("val_bpb"),
        "val_loss": final.get("val_loss"),
    }


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def list_runs(root: str | os.PathLike, sort: str = "started") -> list[dict]:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory")
    if sort not in SORT_KEYS:
        raise UserError(f"sort must be one of {', '.join(SORT_KEYS)}, got {sort!r}")
    rows = [describe(run, root) for run in find_runs(root)]
    # unknown values last, whatever the key
    return sorted(rows, key=lambda r: (r[sort] is None, r[sort] if r[sort] is not None else 0, r["name"]))


def _human(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def format_table(rows: list[dict]) -> str:
    header = ["run", "status", "started", "budget", "model", "params", "tokens", "steps", "val bpb"]
    body = [
        [r["name"], r["status"], (r["started"] or "-")[:16].replace("T", " "), r["budget"] or "-", r["model"] or "-",
         _human(r["params"]), _human(r["tokens"]), str(r["steps"] if r["steps"] is not None else "-"),
         f"{r['val_bpb']:.4f}" if r["val_bpb"] is not None else "-"]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    right = {5, 6, 7, 8}  # numbers line up on the right
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in [header, *body]]
    return "\n".join(lines)


def runs_command(args) -> int:
    from budgetlm.config import RunsConfig
    from budgetlm.flags import print_config, settings_from_args

    cfg = settings_from_args(RunsConfig, args)
    if args.print_config:
        print_config(cfg, args.json)
        return 0
    rows = list_runs(args.dir, cfg.sort)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        print(format_table(rows))
    else:
        print(f"no runs under {args.dir}", file=sys.stderr)
    return 0
