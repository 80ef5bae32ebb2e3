"""Training speed of budgetlm's Transformer against Hugging Face `LlamaForCausalLM`, side by side.

Same sizes, same batch, same precision, same optimizer (fused AdamW: the default `optim` of the
Hugging Face Trainer on torch >= 2.8, and what budgetlm's optim.py builds), same weights (copied
through budgetlm.hf_names, and checked to give the same logits). One timed step is forward +
backward + optimizer step + zero_grad. Each side computes its loss the way its training loop does:
budgetlm with `compute_loss(model, x, y)` on the shifted window (what `pretrain` calls), Hugging Face
with `model(input_ids=x, labels=x)` (it shifts internally, as the Trainer calls it). Compiled rows
compile the model together with its loss, as one graph: for budgetlm, `torch.compile` of pretrain's
own loss function (what `train.compile` does on one process, `model+loss`); for Hugging Face,
`torch.compile` of a function calling `model(input_ids=x, labels=x).loss`. Equal configuration:
budgetlm with tied embeddings and no QK-norm, the Llama architecture (the planner's own defaults
untie the head and add QK-norm, which HF Llama cannot express; those are not compared here).

Honest timing: warm-up steps (and torch.compile's compilation) are untimed
but reported; the variants are interleaved step by step through every repeat so a noisy
neighbour slows all of them alike; we report the median and the best wall time per step and the
median process CPU time per step (CPU time barely moves when other processes share the cores,
so it is the steadiest ratio on a shared machine). MFU = flops_per_token x tokens/s / peak, with
FLOPs = 6N + 12 L C T (model.flops_per_token) and the peak measured with a large matmul on a CPU
(in the same dtype) or taken from the datasheet table on a GPU (budgetlm.hardware).

    python bench/train_speed.py                                     # CPU: fp32 and bf16 autocast, eager and compiled
    python bench/train_speed.py --device cuda --dtype bf16 --compile --configs gpt2-124m
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from budgetlm.config import ModelConfig  # noqa: E402
from budgetlm.hardware import cpu_name, measure_matmul_flops, peak_flops  # noqa: E402
from budgetlm.hf_names import llama_config_kwargs, to_hf_llama_state_dict  # noqa: E402
from budgetlm.model import Transformer, compute_loss  # noqa: E402
from budgetlm.pretrain import _loss as pretrain_loss  # noqa: E402  (pretrain's loss function, compiled as pretrain compiles it)

# name -> (model sizes, micro-batch in sequences)
# The tiny ones are what `budgetlm plan` picks on this CPU for short budgets: 2 x 128 (vocabulary
# 2048, context 128) up to ~20 min, 3 x 192 (vocabulary 4096, context 256) at 1 h.
LLAMA_SHAPED = dict(tie_embeddings=True, qk_norm=False)  # what HF LlamaForCausalLM computes
CONFIGS = {
    # 1 x 64, the plan's smallest candidate (its 90 s choice on a CPU without fast bf16)
    "cpu-0.2m": (dict(n_layer=1, n_head=1, n_embd=64, seq_len=128, vocab_size=1024, **LLAMA_SHAPED), 16),
    "cpu-0.7m": (dict(n_layer=2, n_head=2, n_embd=128, seq_len=128, vocab_size=2048, **LLAMA_SHAPED), 16),
    "cpu-3m": (dict(n_layer=3, n_head=3, n_embd=192, seq_len=256, vocab_size=4096, **LLAMA_SHAPED), 8),
    "cpu-10m": (dict(n_layer=6, n_head=6, n_embd=384, seq_len=256, vocab_size=8192, **LLAMA_SHAPED), 8),
    "cpu-30m": (dict(n_layer=8, n_head=8, n_embd=512, seq_len=512, vocab_size=8192, **LLAMA_SHAPED), 4),
    "gpt2-124m": (dict(n_layer=12, n_head=12, n_embd=768, seq_len=1024, vocab_size=50257, **LLAMA_SHAPED), 16),  # the gpt-124m-1gpu recipe's model
    "smoke": (dict(n_layer=2, n_head=2, n_embd=64, seq_len=64, vocab_size=256, **LLAMA_SHAPED), 2),  # bench/gpu.sh --dry-run
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores visible, torch threads {torch.get_num_threads()})"


class Variant:
    """One model + optimizer + step function, timed over many interleaved steps."""

    def __init__(self, name, model, step_fn, optimizer, scaler=None):
        self.name, self.model, self.step_fn, self.optimizer, self.scaler = name, model, step_fn, optimizer, scaler
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.warmup_s = 0.0

    def step(self, device: torch.device) -> None:
        loss = self.step_fn()
        if self.scaler is not None:  # fp16 on a GPU: loss scaling, as budgetlm's loop does
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def build_variants(
    cfg: ModelConfig, batch: int, device: torch.device, dtype: str, compile_ours: bool, compile_hf: bool, eager: bool, no_hf: bool = False
):
    from transformers import LlamaConfig, LlamaForCausalLM

    def hf_twin():
        m = LlamaForCausalLM(LlamaConfig(**llama_config_kwargs(cfg), attn_implementation="sdpa")).to(device)
        m.load_state_dict(to_hf_llama_state_dict(ours), strict=False)  # strict=False: the tied lm_head is re-tied, not loaded
        return m

    torch.manual_seed(0)
    ours = Transformer.build(cfg, device)
    hf = hf_twin()
    window = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), device=device)
    x, y = window[:, :-1], window[:, 1:]
    with torch.no_grad():  # same weights, same function: the comparison is of implementations only
        diff = (ours(x[:1]) - hf(input_ids=x[:1]).logits.float()).abs().max().item()
        assert diff < 1e-3, f"budgetlm and HF logits differ by {diff}"
        # same loss: HF's shifted loss over T-1 positions is budgetlm's compute_loss on the same pairs
        ours_loss = compute_loss(ours, x[:, :-1], x[:, 1:]).item()
        hf_loss = hf(input_ids=x, labels=x).loss.item()
        assert abs(ours_loss - hf_loss) < 1e-3, f"budgetlm loss {ours_loss} and HF loss {hf_loss} differ"

    low = DTYPES[dtype]
    autocast = (lambda: torch.autocast(device.type, dtype=low)) if low is not None else contextlib.nullcontext

    def make(name, model, call):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
        scaler = torch.amp.GradScaler("cuda") if dtype == "fp16" and device.type == "cuda" else None

        def step_fn():
            with autocast():
                return call(model)

        return Variant(name, model, step_fn, opt, scaler)

    def hf_loss_fn(model, x):
        return model(input_ids=x, labels=x).loss

    variants = []
    ours_call = lambda m: pretrain_loss(m, (x, y))  # noqa: E731  compute_loss(model, x, y), as pretrain.fit calls it
    hf_call = lambda m: hf_loss_fn(m, x)  # noqa: E731
    if eager:
        variants.append(make("budgetlm", ours, ours_call))
        if not no_hf:
            variants.append(make("hf", hf, hf_call))
    # compiled rows get their own copies (same weights), so no two rows share parameters or optimizer state
    if compile_ours:
        torch.manual_seed(0)
        twin = Transformer.build(cfg, device)
        assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), ours.state_dict().values()))
        compiled_loss = torch.compile(pretrain_loss)  # pretrain.fit with parallelize's "model+loss": one graph
        variants.append(make("budgetlm+compile", twin, lambda m: compiled_loss(m, (x, y))))
    if compile_hf and not no_hf:
        compiled_hf_loss = torch.compile(hf_loss_fn)  # HF's model and its loss as one graph, likewise
        variants.append(make("hf+compile", hf_twin(), lambda m: compiled_hf_loss(m, x)))
    return variants


def measure_config(name: str, args, device: torch.device, dtype: str, peak: float) -> list[dict]:
    sizes, batch = CONFIGS[name]
    cfg = ModelConfig(**sizes)
    batch = args.batch or batch
    torch._dynamo.reset()  # a fresh compile cache per config and dtype: no recompile limit reached across rows
    variants = build_variants(cfg, batch, device, dtype, args.compile, args.compile_hf, not args.no_eager, args.no_hf)
    failed = []
    for v in list(variants):  # untimed: first-call allocations, oneDNN primitive caches, compilation
        start = time.perf_counter()
        try:
            for _ in range(args.warmup):
                v.step(device)
        except Exception as exc:  # e.g. a compile failure: keep the other variants' numbers
            print(f"{name} {dtype} {v.name}: failed in warm-up: {type(exc).__name__}: {exc}"[:2000], file=sys.stderr, flush=True)
            failed.append(dict(config=name, dtype=dtype, variant=v.name, error=f"{type(exc).__name__}: {exc}"[:500]))
            variants.remove(v)
            continue
        v.warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.repeats):
        for _ in range(args.steps):
            for v in variants:  # interleaved step by step: shared-machine noise hits every variant alike
                w0, c0 = time.perf_counter(), time.process_time()
                v.step(device)
                v.wall.append(time.perf_counter() - w0)
                v.cpu.append(time.process_time() - c0)

    with torch.device("meta"):  # FLOPs and parameter count from the config alone
        reference = Transformer(cfg)
    flops_per_token = reference.flops_per_token(cfg.seq_len)
    tokens = batch * cfg.seq_len
    hf_row = next((v for v in variants if v.name == "hf"), None)
    hf_median = statistics.median(hf_row.wall) if hf_row else None
    hf_cpu = statistics.median(hf_row.cpu) if hf_row else None
    rows = []
    for v in variants:
        median, best, cpu = statistics.median(v.wall), min(v.wall), statistics.median(v.cpu)
        tps = tokens / median
        rows.append(
            dict(
                config=name,
                params=reference.num_params(),
                n_layer=cfg.n_layer,
                n_embd=cfg.n_embd,
                seq_len=cfg.seq_len,
                batch=batch,
                vocab_size=cfg.vocab_size,
                dtype=dtype,
                variant=v.name,
                steps_timed=len(v.wall),
                warmup_steps=args.warmup,
                warmup_s=round(v.warmup_s, 2),
                step_ms_median=round(1000 * median, 1),
                step_ms_best=round(1000 * best, 1),
                cpu_ms_median=round(1000 * cpu, 1),
                tokens_per_s=round(tps, 1),
                mfu=round(flops_per_token * tps / peak, 4),
                speedup_vs_hf=round(hf_median / median, 3) if hf_median else None,
                speedup_vs_hf_best=round(min(hf_row.wall) / best, 3) if hf_row else None,
                speedup_vs_hf_cpu_time=round(hf_cpu / cpu, 3) if hf_cpu else None,
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    if device.type == "cuda" and rows:  # all variants co-resident: an upper bound, not one model's peak
        rows[-1]["cuda_max_memory_allocated_all_variants"] = torch.cuda.max_memory_allocated(device)
    del variants
    return rows + failed


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def ms(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def markdown(result: dict) -> str:
    env = result["environment"]
    peaks = ", ".join(f"{k}: {v / 1e9:.1f} GFLOP/s ({result['peak_source'][k]})" for k, v in result["peak"].items())
    lines = [
        "# Training speed: budgetlm vs Hugging Face LlamaForCausalLM",
        "",
        f"- device: {env['device']}",
        f"- torch {env['torch']}, transformers {env['transformers']}, python {env['python']}",
        f"- command: `{result['command']}`",
        f"- date: {result['date']}; load average before/after: {env['load_before']} / {env['load_after']}",
        f"- peak used for MFU: {peaks}",
        "",
        "One step = forward + backward + fused AdamW step on one micro-batch; same sizes, batch, precision, optimizer and",
        "weights for both. Step times are medians over interleaved repeats (best in brackets); speed-up = HF step time /",
        "this row's step time (wall median; by best wall time; by median process CPU time).",
        "",
        "| config | params | seq x batch | dtype | variant | step ms (best) | CPU ms | tokens/s | MFU | vs HF (best, CPU) | warm-up s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['config']} | | | {r['dtype']} | {r['variant']} | failed: {r['error'][:120]} | | | | | |")
            continue
        vs = "-" if r["speedup_vs_hf"] is None else f"{r['speedup_vs_hf']:.2f}x ({r['speedup_vs_hf_best']:.2f}x, {r['speedup_vs_hf_cpu_time']:.2f}x)"
        lines.append(
            f"| {r['config']} | {r['params'] / 1e6:.1f}M | {r['seq_len']} x {r['batch']} | {r['dtype']} | {r['variant']} | "
            f"{ms(r['step_ms_median'])} ({ms(r['step_ms_best'])}) | {ms(r['cpu_ms_median'])} | {r['tokens_per_s']:.0f} | "
            f"{100 * r['mfu']:.1f}% | {vs} | {r['warmup_s']:.1f} |"
        )
    return "\n".join(lines + ["", *summary(result["rows"])]) + "\n"


def summary(rows: list[dict]) -> list[str]:
    """budgetlm's step rate over Hugging Face's at equal precision: eager against eager and
    compiled against compiled (model and loss compiled as one graph on both sides)."""
    by = {(r["config"], r["dtype"], r["variant"]): r for r in rows if "error" not in r}
    configs = list(dict.fromkeys(r["config"] for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    pairs = [(d, "eager", "budgetlm", "hf") for d in dtypes] + [(d, "compiled", "budgetlm+compile", "hf+compile") for d in dtypes]
    pairs = [p for p in pairs if any((c, p[0], p[2]) in by and (c, p[0], p[3]) in by for c in configs)]
    if not pairs:
        return []
    out = [
        "budgetlm steps/s over Hugging Face steps/s at equal precision, eager against eager and compiled against compiled",
        "(HF step ms / budgetlm step ms, wall medians; by median process CPU time in brackets):",
        "",
        "| config | params | " + " | ".join(f"{d} {k}" for d, k, _, _ in pairs) + " |",
        "|---|---|" + "---:|" * len(pairs),
    ]
    for c in configs:
        cells, params = [], ""
        for d, _, ours, hf in pairs:
            a, b = by.get((c, d, ours)), by.get((c, d, hf))
            if a and b:
                params = f"{a['params'] / 1e6:.1f}M"
                cells.append(f"{b['step_ms_median'] / a['step_ms_median']:.2f}x ({b['cpu_ms_median'] / a['cpu_ms_median']:.2f}x)")
            else:
                cells.append("-")
        out.append(f"| {c} | {params} | " + " | ".join(cells) + " |")
    return out


def merge(parts: list[str], out: str) -> dict:
    """One result from several runs (e.g. one locked run per config): rows in the order given, MFU
    restated against the highest peak any part measured, every part's command and load kept."""
    results = [json.loads(Path(p).read_text(encoding="utf-8")) for p in parts]
    peaks = {}
    for res in results:
        for d, v in res["peak"].items():
            peaks[d] = max(peaks.get(d, 0.0), v)
    rows = []
    for res in results:
        for r in res["rows"]:
            if "mfu" in r:
                r = dict(r, mfu=round(r["mfu"] * res["peak"][r["dtype"]] / peaks[r["dtype"]], 4))
            rows.append(r)
    first = results[0]
    env = dict(first["environment"], load_before=[res["environment"]["load_before"] for res in results],
               load_after=[res["environment"]["load_after"] for res in results])  # fmt: skip
    sources = {d: f"highest of the runs' {src}" for res in results for d, src in res["peak_source"].items()}
    merged = dict(
        command="; ".join(f"`{res['command']}`" for res in results).strip("`"),
        date=" to ".join(dict.fromkeys([results[0]["date"], results[-1]["date"]])),
        environment=env,
        peak=peaks,
        peak_source=sources,
        rows=rows,
        parts=[dict(command=res["command"], date=res["date"], peak=res["peak"]) for res in results],
    )
    write(merged, out)
    return merged


def write(result: dict, out: str) -> None:
    """OUT.json and OUT.md (appended, not `with_suffix`: an OUT such as runs/cpu-0.7m keeps its dot)."""
    base = str(out).removesuffix(".json").removesuffix(".md")
    Path(base).parent.mkdir(parents=True, exist_ok=True)
    Path(base + ".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    Path(base + ".md").write_text(markdown(result), encoding="utf-8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="both", choices=["fp32", "bf16", "fp16", "both"], help="fp32, bf16 or fp16 autocast, or both (fp32 and bf16)")
    p.add_argument("--configs", default="cpu-0.7m,cpu-3m,cpu-10m,cpu-30m", help=f"comma-separated: {', '.join(CONFIGS)}")
    p.add_argument("--batch", type=int, default=0, help="micro-batch in sequences (default: per config)")
    p.add_argument("--compile", action="store_true", help="add a torch.compile'd budgetlm row")
    p.add_argument("--compile-hf", action="store_true", help="add a torch.compile'd Hugging Face row")
    p.add_argument("--no-eager", action="store_true", help="skip the eager rows (compile only)")
    p.add_argument("--no-hf", action="store_true", help="budgetlm rows only (no Hugging Face model is built)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--peak-n", type=int, default=2048, help="CPU only: size of the square matmul that measures the peak FLOP/s")
    p.add_argument("--out", default="", help="write OUT.json and OUT.md (e.g. bench/results/train_speed)")
    p.add_argument("--merge", nargs="+", default=[], metavar="PART.json", help="only merge these results (one run per config, say) into --out")
    args = p.parse_args(argv)
    if args.merge:
        if not args.out:
            p.error("--merge needs --out")
        print(markdown(merge(args.merge, args.out)))
        return 0

    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    load_before = load_average()
    peaks, sources = {}, {}
    for dtype in dtypes:
        torch_dtype = DTYPES[dtype] or torch.float32
        if device.type == "cpu":  # best of three so a busy moment does not flatter the MFU
            peaks[dtype] = max(measure_matmul_flops(device, torch_dtype, n=args.peak_n, seconds=1.0) for _ in range(3))
            sources[dtype] = f"measured {dtype} {args.peak_n}^3 matmul, best of 3"
        else:
            peaks[dtype], sources[dtype] = peak_flops(device, torch_dtype)
    rows = []
    for dtype in dtypes:
        for name in args.configs.split(","):
            rows += measure_config(name.strip(), args, device, dtype, peaks[dtype])
    result = dict(
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        environment=dict(
            device=device_name(device),
            torch=torch.__version__,
            transformers=transformers.__version__,
            python=platform.python_version(),
            load_before=load_before,
            load_after=load_average(),
        ),
        peak=peaks,
        peak_source=sources,
        rows=rows,
    )
    if args.out:
        write(result, args.out)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
