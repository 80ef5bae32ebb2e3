"""What each `budgetlm compress` method buys on a small run, on this CPU: size, speed, quality.

A run is trained for the purpose (4 blocks, width 128, context 128, 1.1M parameters, on Shakespeare
prepared with a 2048-token BPE; bf16, Muon, 2048-token batches, as the planner picks for short CPU
budgets; `--teacher-tokens`, default 300k: a few minutes on one busy core), then compressed with
every CPU method. For the run and each output:

- size on disk of `model.safetensors`, and parameters (a tied matrix once)
- generation tokens/s, greedy, batch 1 and batch 8 (16-token prompt, 64 new tokens, KV cache),
  median of `--repeats` timed runs after one warm-up, one thread
- validation bits per byte on a fixed 65,536 held-out tokens (`budgetlm.evaluate.lm`)
- the downstream suite (`budgetlm.evaluate.suite`: sentiment accuracy and POS token accuracy) on a
  fixed small subset, since the full suite (3 seeds, 4,000 training examples, 60 s per fine-tuning)
  would take most of an hour per model on this CPU: `SUITE` below, 2 seeds, 2,000 training and 500
  test examples, a step budget (so a busy machine changes the time, not the score), LoRA for every
  model, because quantized runs fine-tune only with LoRA and one method keeps the rows comparable.
  The suite score is the mean of the two headline metrics.

The two methods that train are compared with training from scratch at the same total budget,
counted in training FLOPs (`Transformer.flops_per_token`: 6 N + attention per token) so that the
comparison does not depend on how busy the shared machine was while each run trained: pruning to
half the blocks' parameters + `--recovery-tokens` of recovery against a model of the pruned shape
trained from scratch on the FLOPs of teacher + recovery; distillation into a 2-block, 96-wide
student on `--distill-tokens` (each costing the student's step plus the teacher's forward, a
third of its training FLOPs) against that student trained from scratch on the FLOPs of teacher +
distillation. The teacher's training counts towards what the pruned and distilled models cost.

    taskset -c 1 python bench/compress.py --out bench/results/compress       # about 15 minutes
    python bench/compress.py --smoke                                          # a few seconds each step
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from budgetlm.cli import main as budgetlm_main  # noqa: E402
from budgetlm.compress.command import count_params  # noqa: E402
from budgetlm.data.dataset import PreparedData  # noqa: E402
from budgetlm.evaluate.lm import evaluate_lm  # noqa: E402
from budgetlm.generate import generate  # noqa: E402
from budgetlm.hardware import cpu_name  # noqa: E402
from budgetlm.pretrain import pretrain, resolve_config  # noqa: E402
from budgetlm.run import load_run  # noqa: E402

TEACHER = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.seq_len=128"]
STUDENT = ["model.n_layer=2", "model.n_head=2", "model.n_embd=96"]
TRAIN = ["auto=false", "train.batch_tokens=2048", "train.optimizer=muon", "train.lr=1.6e-2", "train.precision=bf16", "train.warmup=0.02",
         "train.eval_every=0", "train.log_every=50"]  # fmt: skip
SMOKE = {"teacher": ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.seq_len=64"], "student": ["model.n_layer=1", "model.n_embd=32"]}
EVAL_TOKENS = 65536
SUITE = {"tasks": ["sentiment", "pos"], "seeds": 2, "method": "lora", "budget": "steps:150", "max_train": 2000, "max_test": 500}
SMOKE_SUITE = {**SUITE, "seeds": 1, "budget": "steps:3", "max_train": 40, "max_test": 40}
PROMPT, NEW_TOKENS = 16, 64


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def cli(*args) -> None:
    code = budgetlm_main([str(a) for a in args])
    if code:
        raise SystemExit(f"budgetlm {' '.join(map(str, args[:3]))} ... exited {code}")


def prepared(work: Path, smoke: bool) -> Path:
    data = work / "data"
    if (data / "manifest.json").is_file():
        return data
    if smoke:
        corpus = Path(__file__).resolve().parents[1] / "tests" / "data" / "shakespeare"
        cli("data", "prepare", corpus, "--out", data, "--set", "vocab_size=512", "--set", "txt_document_chars=4096", "--set", "val_fraction=0.05")
    else:
        from budgetlm.data.fetch import fetch

        cli("data", "prepare", fetch("shakespeare"), "--out", data, "--set", "vocab_size=2048")
    return data


def train(out: Path, data: Path, tokens: float, keys: list[str]) -> Path:
    if not (out / "model.safetensors").is_file():
        pretrain(resolve_config(None, f"tokens:{int(tokens)}", [*TRAIN, *keys], str(data)), out)
    return out


def flops_per_token(run_dir: Path) -> float:
    from budgetlm.model import Transformer
    from budgetlm.run import run_config

    return Transformer.on_meta(run_config(run_dir).model).flops_per_token()


def cost(run_dir: Path) -> dict:
    """Tokens, wall seconds and CPU seconds of a run's training (from its metrics), for the record."""
    from budgetlm.tracking import read_metrics

    end = [r for r in read_metrics(run_dir) if r.get("event") == "end"]
    return {"tokens": end[-1]["tokens"], "elapsed_s": end[-1]["elapsed_s"]} if end else {}


# ---------------------------------------------------------------------------------------------
# measurements


@torch.no_grad()
def generation_seconds(model, batch: int, vocab: int) -> float:
    idx = torch.randint(0, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    generate(model, idx, NEW_TOKENS, temperature=0.0)
    return time.perf_counter() - start


def time_generation(rows: list[dict], repeats: int) -> None:
    """tokens/s of every model at batch 1 and 8, in interleaved rounds (one warm-up round first), so a
    busy moment of the shared machine hits every model alike; the median round per model."""
    models = [load_run(Path(r["dir"])) for r in rows]
    times: dict = {(i, b): [] for i in range(len(rows)) for b in (1, 8)}
    for round_ in range(repeats + 1):
        for i, run in enumerate(models):
            for b in (1, 8):
                t = generation_seconds(run.model, b, run.tokenizer.vocab_size)
                if round_:
                    times[i, b].append(t)
    for i, row in enumerate(rows):
        for b in (1, 8):
            row[f"tok_s_b{b}"] = b * NEW_TOKENS / statistics.median(times[i, b])
            row[f"tok_s_b{b}_all"] = [round(b * NEW_TOKENS / t, 1) for t in times[i, b]]
        log(f"{row['name']}: {row['tok_s_b1']:.0f} / {row['tok_s_b8']:.0f} tok/s")


def measure(name: str, run_dir: Path, data: PreparedData, note: str = "") -> dict:
    run = load_run(run_dir)
    model = run.model
    cfg = run.config
    val = evaluate_lm(model, data, objective=cfg.model.objective, seq_len=cfg.model.seq_len, n_tokens=EVAL_TOKENS,
                      batch_size=max(1, 8192 // cfg.model.seq_len), device=torch.device("cpu"))  # fmt: skip
    row = {
        "name": name,
        "dir": str(run_dir),
        "size_mb": (run_dir / "model.safetensors").stat().st_size / 1e6,
        "params": count_params(model),
        "val_bpb": val["val_bpb"],
        "note": note,
    }
    if (run_dir / "compression.json").is_file():
        info = json.loads((run_dir / "compression.json").read_text())
        for key in ("block_weight_sparsity", "model_after"):
            if key in info:
                row[key] = info[key]
    log(f"{name}: {row['size_mb']:.2f} MB, {row['params']:,} params, bpb {row['val_bpb']:.5f}")
    return row


def suite_scores(run_dir: Path, spec: dict, folder: Path | None) -> dict:
    """The suite's headline metrics on the fixed subset `spec`, and their mean (the suite score).
    `folder`: the suite's corpora (default: `budgetlm data fetch pattern-eval`'s)."""
    from budgetlm.evaluate.suite import run_suite

    results = run_suite(run_dir, spec["tasks"], spec["seeds"], method=spec["method"], budget=spec["budget"], max_train=spec["max_train"],
                        max_test=spec["max_test"], device="cpu", folder=folder, log=lambda *a, **k: None)  # fmt: skip
    heads = {"sentiment": "accuracy", "pos": "token_accuracy"}
    got = {name: results["tasks"][name]["metrics"][heads[name]]["score"] for name in spec["tasks"]}
    out = {f"{name}_{heads[name]}": s["mean"] for name, s in got.items()}
    out["runs"] = {name: s["runs"] for name, s in got.items()}
    out["score"] = sum(s["mean"] for s in got.values()) / len(got)
    return out


def suite_majority(spec: dict, folder: Path | None) -> dict:
    """The majority-class scores of the suite's fixed test sets (what fine-tuning must beat)."""
    from budgetlm.data.fetch import fetch
    from budgetlm.evaluate.suite import TASKS, make_splits
    from budgetlm.finetune.metrics import majority_baseline

    out = {}
    for name, head in (("sentiment", "accuracy"), ("pos", "token_accuracy")):
        examples = TASKS[name].load(folder or fetch("pattern-eval"))
        train, _, test = make_splits(examples, 0, 0.2, 0.1, spec["max_train"], spec["max_test"])
        out[name] = majority_baseline(TASKS[name].task, [e.label for e in train], [e.label for e in test])[head]
    return out


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = [
        "| model | size on disk | parameters | tokens/s batch 1 | tokens/s batch 8 | val bits/byte | suite score (sentiment / POS) | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        rel = lambda k, r=r: "" if r is base else f" ({r[k] / base[k]:.2f}x)"
        s = r.get("suite")
        suite = f"{s['score']:.4f} ({s['sentiment_accuracy']:.3f} / {s['pos_token_accuracy']:.3f})" if s else "-"
        lines.append(
            f"| {r['name']} | {r['size_mb']:.2f} MB{rel('size_mb')} | {r['params'] / 1e6:.2f}M | {r['tok_s_b1']:.0f}{rel('tok_s_b1')} | "
            f"{r['tok_s_b8']:.0f}{rel('tok_s_b8')} | {r['val_bpb']:.5f} | {suite} | {r['note']} |"
        )
    return "\n".join(lines)


def header(meta: dict) -> str:
    load = meta.get("load_average_at_end")
    shared = f" (load average {load[0]:.1f} on 2 cores when the timings ended)" if load else ""
    return (
        "# Compression: what each method buys (written by bench/compress.py)\n\n"
        f"Device: {meta['device']}, one thread (`{meta['command']}`), torch {meta['torch']}, torchao {meta['torchao']}, "
        f"Python {meta['python']}. The machine was shared with other sessions{shared}: tokens/s are medians of "
        f"{meta['repeats']} interleaved rounds and noisy; training budgets are tokens, matched in FLOPs, so busy moments "
        "slow the runs without changing what they learn.\n\n"
        f"Run: {', '.join(meta['teacher'])}; training {', '.join(meta['train'])}. Student: {', '.join(meta['student'])}. "
        f"Pruned shape: {', '.join(meta['pruned_shape'])}. Bits per byte on 65,536 held-out tokens, greedy generation of "
        f"{NEW_TOKENS} tokens after a {PROMPT}-token prompt, weights file size.\n\n"
        + (_suite_text(meta) if meta.get("suite") else "")
    )


def _suite_text(meta: dict) -> str:
    s, majority = meta["suite"], meta["suite_majority"]
    return (
        "Suite score: the mean of sentiment accuracy and POS token accuracy from `budgetlm suite` on a fixed small subset "
        f"(not the full suite, which takes most of an hour per model here): {s['seeds']} seeds, --method {s['method']}, "
        f"budget {s['budget']} per fine-tune, {s['max_train']:,} training and {s['max_test']:,} test examples per task, "
        "the same test examples for every model. Majority-class baselines on these test sets: "
        f"sentiment {majority['sentiment']:.3f}, POS {majority['pos']:.3f}.\n\n"
    )


# ---------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="bench/work/compress", help="runs and data (kept: a second call re-measures without retraining)")
    p.add_argument("--out", default="bench/results/compress", help="writes OUT.json and OUT.md")
    p.add_argument("--teacher-tokens", type=float, default=3e5)
    p.add_argument("--recovery-tokens", type=float, default=1e5)
    p.add_argument("--distill-tokens", type=float, default=1e5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny model, step budgets, for a quick check")
    p.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json")
    p.add_argument("--no-suite", action="store_true", help="leave out the downstream suite (the slowest measurement)")
    p.add_argument("--suite-corpus", type=Path, help="the suite's corpora folder (default: fetched, `budgetlm data fetch pattern-eval`)")
    args = p.parse_args()
    if args.render:
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        Path(args.out).with_suffix(".md").write_text(header(saved["meta"]) + table(saved["rows"]) + "\n")
        return
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data_dir = prepared(work, args.smoke)
    teacher_keys, student_keys = (SMOKE["teacher"], SMOKE["student"]) if args.smoke else (TEACHER, STUDENT)
    scale = 0.05 if args.smoke else 1.0
    tb, rb, db = args.teacher_tokens * scale, args.recovery_tokens * scale, args.distill_tokens * scale

    base = train(work / "base", data_dir, tb, teacher_keys)
    outs = {}
    for method, extra in (("int8", []), ("int8-dyn", []), ("sparse", ["--sparsity", "0.5"])):
        outs[method] = work / method
        if not (outs[method] / "compression.json").is_file():
            cli("compress", base, "--method", method, "--out", outs[method], *extra)
    outs["prune"] = work / "prune"
    if not (outs["prune"] / "compression.json").is_file():
        cli("compress", base, "--method", "prune", "--keep", "0.5", "--budget", f"tokens:{int(rb)}", "--out", outs["prune"])
    outs["distill"] = work / "distill"
    if not (outs["distill"] / "compression.json").is_file():
        student_set = [a for k in student_keys for a in ("--set", k)]
        cli("compress", base, "--method", "distill", "--budget", f"tokens:{int(db)}", "--out", outs["distill"], *student_set)
    pruned_model = load_run(outs["prune"]).config.model
    pruned_keys = [f"model.{key}={getattr(pruned_model, key)}" for key in ("n_layer", "layer_heads", "layer_ffn")]
    # the same training FLOPs as teacher + recovery / teacher + distillation
    f_teacher, f_pruned, f_student = flops_per_token(base), flops_per_token(outs["prune"]), flops_per_token(outs["distill"])
    pruned_tokens = (tb * f_teacher + rb * f_pruned) / f_pruned
    student_tokens = (tb * f_teacher + db * (f_student + f_teacher / 3)) / f_student
    scratch_pruned = train(work / "scratch-pruned", data_dir, pruned_tokens, [*teacher_keys, *pruned_keys])
    scratch_student = train(work / "scratch-student", data_dir, student_tokens, [*teacher_keys, *student_keys])
    # the pruned model before its recovery: its weights right after pruning, as a run of their own
    before = work / "prune-before-recovery"
    if not (before / "model.safetensors").is_file():
        before.mkdir(exist_ok=True)
        for name in ("config.yaml", "tokenizer.json", "data.json"):
            (before / name).write_bytes((outs["prune"] / name).read_bytes())
        (before / "model.safetensors").write_bytes((outs["prune"] / "pruned.safetensors").read_bytes())

    data = PreparedData(data_dir)
    r = args.repeats
    k = lambda n: f"{n / 1e3:,.0f}k tokens"
    rows = [
        measure("trained run (fp32)", base, data, f"{k(tb)}"),
        measure("int8 weight-only", outs["int8"], data, "torchao Int8WeightOnly"),
        measure("int8 dynamic act. + weight", outs["int8-dyn"], data, "torchao Int8DynamicActivationInt8Weight"),
        measure("magnitude 50% (unstructured)", outs["sparse"], data, "dense kernels: zeros are not skipped"),
        measure("pruned to 50% of blocks, before recovery", before, data, "heads, neurons, blocks by gradient importance"),
        measure("pruned + recovery", outs["prune"], data, f"teacher + {k(rb)} of recovery"),
        measure("pruned shape from scratch", scratch_pruned, data, f"{k(pruned_tokens)}: the same training FLOPs"),
        measure("distilled student", outs["distill"], data, f"teacher + {k(db)} of distillation"),
        measure("student from scratch", scratch_student, data, f"{k(student_tokens)}: the same training FLOPs"),
    ]
    time_generation(rows, r)
    suite_spec = SMOKE_SUITE if args.smoke else SUITE
    for row in rows if not args.no_suite else []:
        row["suite"] = suite_scores(Path(row["dir"]), suite_spec, args.suite_corpus)
        log(f"{row['name']}: suite {row['suite']['score']:.4f}")
    for row in rows:
        row["training"] = cost(Path(row["dir"]))
    meta = {
        "device": cpu_name(),
        "threads": 1,
        "torch": torch.__version__,
        "torchao": __import__("torchao").__version__,
        "python": platform.python_version(),
        "command": "taskset -c 1 python bench/compress.py" + (" --smoke" if args.smoke else ""),
        "flops_per_token": {"teacher": f_teacher, "pruned": f_pruned, "student": f_student},
        "repeats": r,
        "teacher": teacher_keys,
        "student": student_keys,
        "train": TRAIN,
        "pruned_shape": pruned_keys,
        "load_average_at_end": os.getloadavg(),
        "suite": None if args.no_suite else suite_spec,
        "suite_majority": None if args.no_suite else suite_majority(suite_spec, args.suite_corpus),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(header(meta) + table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
