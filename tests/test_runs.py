"""`budgetlm runs DIR`: every run under a folder, finished or not, as a table or JSON."""

from __future__ import annotations

import json
import shutil

from test_pretrain import tiny_args

from budgetlm.cli import main
from budgetlm.runs import list_runs


def test_runs_lists_finished_and_stopped_runs_in_order(prepared_bpe, tmp_path, capsys):
    root = tmp_path / "experiments"
    assert main(tiny_args(prepared_bpe, root / "short", "steps:4")) == 0
    assert main(tiny_args(prepared_bpe, root / "group" / "long", "steps:12")) == 0
    # a run killed after step 10: no end event, no final evaluation or weights
    stopped = root / "group" / "killed"
    shutil.copytree(root / "group" / "long", stopped)
    records = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    kept = [r for r in records if r.get("event") != "end" and not r.get("final") and r["step"] <= 10]
    (stopped / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    (stopped / "eval.json").unlink()
    (stopped / "model.safetensors").unlink()
    (root / "notes").mkdir()
    (root / "notes" / "config.yaml").write_text("not: a run\n")  # a config alone is not a run
    capsys.readouterr()

    assert main(["runs", str(root), "--json", "--sort", "name"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["group/killed", "group/long", "short"]
    killed, long, short = rows
    assert (long["status"], long["steps"], long["budget"], long["model"]) == ("finished", 12, "steps:12", "2x64")
    assert long["tokens"] == 12 * 512 and long["params"] > 0 and long["val_bpb"] > 0 and long["started"][:2] == "20"
    assert (killed["status"], killed["steps"], killed["tokens"], killed["val_bpb"]) == ("stopped", 10, 10 * 512, None)
    assert short["val_bpb"] > long["val_bpb"]  # more steps, lower loss

    by_bpb = list_runs(root, sort="val_bpb")
    assert [r["name"] for r in by_bpb] == ["group/long", "short", "group/killed"]  # unknown last

    assert main(["runs", str(root)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["run", "status", "started", "budget", "model", "params", "tokens", "steps", "val", "bpb"]
    assert any(line.startswith("group/killed") and "stopped" in line and line.rstrip().endswith("-") for line in table)
    assert main(["runs", str(root / "missing")]) == 2
