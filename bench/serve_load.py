"""Load test of `budgetlm serve` on loopback: continuous batching against one request at a time.

For each server setting (`--max-batch 64`, the batching server, and `--max-batch 1`, the same model
answering one request at a time) a `budgetlm serve` process is started on a free loopback port, and
for each concurrency level (1, 8, 32, 64 clients, each sending its next request as soon as the last
one ended) a fixed number of streamed completions is sent with the openai wire format. Per level:
requests/s, generated tokens/s, p50/p99 latency (request to last byte) and time to first token,
the count of 5xx answers, and the CPU time the server and the client (this process) spent per token.
Every level is bounded in requests and in time (`--level-timeout`).
The table gives the median of `--repeats` runs of each cell.

    python bench/serve_load.py runs/demo/run --out bench/results/serve_load
    python bench/serve_load.py RUN --smoke          # a few requests, to check the script
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = ["ROMEO:", "KING HENRY:", "First Citizen:\nBefore we proceed", "JULIET:\nO", "HAMLET:\nTo be", "MENENIUS:", "LADY MACBETH:", "The king"]


def start_server(run: str, max_batch: int, device: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "budgetlm", "serve", run, "--port", "0", "--max-batch", str(max_batch), "--max-queue", "1024", "--device", device]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    if "serving" not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{proc.stderr.read()}")
    return proc, line.split(" on ")[1].split()[0]


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured_level(proc: subprocess.Popen, url: str, concurrency: int, requests: int, max_tokens: int, timeout: float) -> dict:
    """`level`, with the CPU time the server process and this (client) process spent per generated token:
    on a shared 2-core machine the client's share is what the server could not use."""
    server0, client0 = process_cpu_s(proc.pid), time.process_time()
    row = asyncio.run(level(url, concurrency, requests, max_tokens, timeout))
    tokens = max(1.0, row["tokens_per_s"] * row["wall_s"])
    row["server_cpu_ms_per_token"] = 1000 * (process_cpu_s(proc.pid) - server0) / tokens
    row["client_cpu_ms_per_token"] = 1000 * (time.process_time() - client0) / tokens
    return row


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


async def one_request(client, url: str, prompt: str, max_tokens: int, seed: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "latency": time.perf_counter() - start, "ttft": None, "tokens": 0}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
    return {"status": 200, "latency": time.perf_counter() - start, "ttft": first, "tokens": tokens}


async def level(url: str, concurrency: int, requests: int, max_tokens: int, timeout: float) -> dict:
    import httpx

    results: list[dict] = []
    counter = iter(range(requests))
    deadline = time.perf_counter() + timeout
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def worker():
            for i in counter:
                if time.perf_counter() > deadline:
                    return
                try:
                    results.append(await one_request(client, url, PROMPTS[i % len(PROMPTS)], max_tokens, i))
                except httpx.HTTPError as e:
                    results.append({"status": 0, "latency": time.perf_counter() - start, "ttft": None, "tokens": 0, "error": repr(e)})

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(ok),
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "p50_latency_s": percentile([r["latency"] for r in ok], 50),
        "p99_latency_s": percentile([r["latency"] for r in ok], 99),
        "p50_ttft_s": percentile([r["ttft"] for r in ok if r["ttft"] is not None], 50),
        "p99_ttft_s": percentile([r["ttft"] for r in ok if r["ttft"] is not None], 99),
        "5xx": sum(1 for r in results if r["status"] >= 500),
        "other_errors": sum(1 for r in results if r["status"] != 200 and r["status"] < 500),
    }


def pipeline_level(pipe, concurrency: int, requests: int, max_tokens: int) -> dict:
    """`requests` completions through a transformers text-generation pipeline, `concurrency` prompts per
    batch, batches one after another (as `concurrency` clients that each send their next request when
    the last one ended): a request's latency is its batch's time. Offline (no HTTP, no second process
    competing for the cores) and not streamed, so it has no TTFT."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    latencies, tokens = [], 0
    start = time.perf_counter()
    for first in range(0, requests, concurrency):
        batch = prompts[first : first + concurrency]
        batch_start = time.perf_counter()
        outs = pipe(batch, batch_size=len(batch), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=True,
                    temperature=0.8, return_full_text=False)  # fmt: skip
        tokens += sum(len(pipe.tokenizer(o[0]["generated_text"])["input_ids"]) for o in outs)
        latencies += [time.perf_counter() - batch_start] * len(batch)
    wall = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": requests, "requests_per_s": requests / wall, "tokens_per_s": tokens / wall,
            "p50_latency_s": percentile(latencies, 50), "p99_latency_s": percentile(latencies, 99), "p50_ttft_s": float("nan"),
            "p99_ttft_s": float("nan"), "5xx": 0, "other_errors": 0}  # fmt: skip


def engine_level(run: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    """The server's scheduler in this process, no HTTP: `concurrency` sequences decoded together by
    continuous batching, `requests` in all; what the batching engine alone does, beside the pipeline."""
    import torch

    from budgetlm.run import load_run
    from budgetlm.serve.scheduler import SamplingParams, Scheduler, Sequence

    loaded = load_run(run)
    sched = Scheduler(loaded.model.eval(), loaded.tokenizer, max_batch=concurrency)
    tokens = []
    start = time.perf_counter()
    for i in range(requests):
        prompt = loaded.tokenizer.encode(PROMPTS[i % len(PROMPTS)])
        params = SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=i)
        sched.submit(Sequence(prompt, params, loaded.tokenizer, lambda e: tokens.append(1)))
    with torch.no_grad():
        while sched.active or sched.waiting:
            sched.step()
    wall = time.perf_counter() - start
    nan = float("nan")
    return {"concurrency": concurrency, "requests": requests, "requests_per_s": requests / wall, "tokens_per_s": len(tokens) / wall,
            "p50_latency_s": nan, "p99_latency_s": nan, "p50_ttft_s": nan, "p99_ttft_s": nan, "5xx": 0, "other_errors": 0}  # fmt: skip


def median_row(rows: list[dict]) -> dict:
    out = dict(rows[0])
    for key, value in rows[0].items():
        if isinstance(value, float):
            out[key] = statistics.median(r[key] for r in rows)
    out["5xx"] = sum(r["5xx"] for r in rows)
    out["other_errors"] = sum(r["other_errors"] for r in rows)
    return out


def latency(r: dict) -> str:
    if r["p50_latency_s"] != r["p50_latency_s"]:  # NaN: the engine alone has no per-request latency
        return "- | -"
    return f"{r['p50_latency_s']:.2f} s | {r['p99_latency_s']:.2f} s"


def cpu_cells(r: dict) -> str:
    if "server_cpu_ms_per_token" not in r:  # the engine and the pipeline run in this process
        return "-"
    return f"{r['server_cpu_ms_per_token']:.3f} / {r['client_cpu_ms_per_token']:.3f}"


def table(rows: list[dict]) -> str:
    head = "| server | clients | requests | req/s | tokens/s | p50 latency | p99 latency | p50 TTFT | p99 TTFT | 5xx "
    head += "| CPU ms per token: server / client |\n"
    head += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    lines = []
    for r in rows:
        name = r.get("server") or (f"batched (--max-batch {r['max_batch']})" if r["max_batch"] > 1 else "one at a time (--max-batch 1)")
        ttft = "-" if r["p50_ttft_s"] != r["p50_ttft_s"] else f"{r['p50_ttft_s']:.3f} s | {r['p99_ttft_s']:.3f} s"  # NaN: not streamed
        lines.append(
            f"| {name} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{latency(r)} | {ttft if ttft != '-' else '- | -'} | {r['5xx']} | {cpu_cells(r)} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run directory to serve")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--max-batch", type=int, nargs="+", default=[64, 1], help="server settings to compare")
    p.add_argument("--requests", type=int, default=0, help="requests per level (default: 2 x clients, at least 32)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--level-timeout", type=float, default=120, help="seconds a level may take before it stops sending")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="write OUT.json and OUT.md")
    p.add_argument("--smoke", action="store_true", help="a few requests at concurrency 1 and 4, one repeat")
    p.add_argument("--engine", action="store_true", help="also: the server's batching scheduler alone, in this process (no HTTP)")
    p.add_argument("--no-server", action="store_true", help="skip the HTTP server rows")
    p.add_argument("--threads", type=int, default=0, help="torch threads for --engine and --hf-pipeline (0 = torch's default)")
    p.add_argument("--hf-pipeline", metavar="DIR", help="also: the run exported with `budgetlm export --format hf` to DIR, through "
                   "transformers' text-generation pipeline, `clients` prompts a batch")  # fmt: skip
    args = p.parse_args()
    if args.smoke:
        args.concurrency, args.requests, args.repeats, args.max_tokens = [1, 4], 4, 1, 8

    rows = []
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    for max_batch in [] if args.no_server else args.max_batch:
        proc, url = start_server(args.run, max_batch, args.device)
        try:
            asyncio.run(level(url, 2, 4, 4, 60))  # warm-up: first-call costs are not load
            for c in args.concurrency:
                n = args.requests or max(32, 2 * c)
                runs = [measured_level(proc, url, c, n, args.max_tokens, args.level_timeout) for _ in range(args.repeats)]
                row = {"max_batch": max_batch, **median_row(runs)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            proc.terminate()
            proc.wait(60)

    if args.engine:
        engine_level(args.run, 2, 4, 4)  # warm-up
        for c in args.concurrency:
            n = args.requests or max(32, 2 * c)
            runs = [engine_level(args.run, c, n, args.max_tokens) for _ in range(args.repeats)]
            rows.append({"max_batch": c, "server": "batching engine alone (no HTTP)", **median_row(runs)})
            print(json.dumps(rows[-1]), flush=True)
    if args.hf_pipeline:
        from transformers import pipeline

        pipe = pipeline("text-generation", model=args.hf_pipeline, device=args.device)
        pipe.tokenizer.padding_side = "left"  # a decoder pads on the left for batched generation
        pipeline_level(pipe, 2, 4, 4)  # warm-up
        for c in args.concurrency:
            n = args.requests or max(32, 2 * c)
            runs = [pipeline_level(pipe, c, n, args.max_tokens) for _ in range(args.repeats)]
            row = {"max_batch": c, "server": "transformers pipeline (offline, batch = clients)", **median_row(runs)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    import torch

    import budgetlm
    from budgetlm.hardware import cpu_name

    about = (
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}, budgetlm {budgetlm.__version__}; device {args.device}.\n"
        f"Each cell: median of {args.repeats} runs; {args.max_tokens} new tokens per request (temperature 0.8, a seed per request), "
        f"streamed; latency = request to last byte; TTFT = request to the first text chunk.\n"
    )
    command = " ".join(["python", "bench/serve_load.py", *sys.argv[1:]])
    md = f"# `budgetlm serve` under load (loopback)\n\n{about}\nCommand: `{command}`\n\n{table(rows)}"
    print(md)
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
        Path(args.out).with_suffix(".md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
