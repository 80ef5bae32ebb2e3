"""Quality per second, side by side: budgetlm's defaults against a careful Hugging Face Trainer user.

Both systems train on the same documents for the same wall-clock budget and are scored by one
function (`bench/scoring.py`): bits per byte over every byte of the same held-out text, each
system tokenizing it the way it tokenizes its training text (documents whole, each followed by
its end-of-text token).

Steps (each idempotent; every command runs what it needs first):

    python bench/quality.py split --corpus shakespeare           # bench/work/<corpus>/{train,heldout}.jsonl
    python bench/quality.py hf --corpus shakespeare --budget 90 --config '{"n_layer": 2, "n_embd": 128}'
    python bench/quality.py sweep --corpus shakespeare --budget 90 --sweep cpu-90s
    python bench/quality.py budgetlm --corpus shakespeare --budget 90 [--set train.lr=4e-3 ...]
    python bench/quality.py report                               # bench/results/quality.md from the jsonl

Timing discipline on the shared 2-core development machine: every timed training (HF
`trainer.train()`, budgetlm `pretrain`) runs in a child process under
`flock /tmp/budgetlm-core0.lock taskset -c 0 env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1`, one run
per lock, so other engineers' timed runs interleave and none overlap. Everything untimed
(splitting, tokenizer training, tokenization, `data prepare`, budgetlm's scoring) runs in the
calling process, which should be pinned to the other core (`taskset -c 1 python bench/quality.py ...`).
`--no-pin` drops taskset/flock (a machine of one's own).

The Hugging Face baseline (`hf`): a byte-level BPE tokenizer trained with `tokenizers` on the
training documents (vocabulary = the config's, the end-of-text token included); documents
tokenized whole with the end-of-text token appended, concatenated and grouped into blocks of the
sequence length (run_clm's `group_texts`); `LlamaForCausalLM` (SwiGLU, RMSNorm, RoPE, tied
embeddings, SDPA attention) under `transformers.Trainer` with fused AdamW (beta2 0.95, weight
decay 0.1, gradient clipping 1.0), linear decay after a 2% warm-up, no evaluation, no saving, no
extra data-loader workers. Before the timed run, two short calibration runs of the same Trainer
(fp32 and bf16 autocast) measure the step time and the fixed start/stop cost of `train()`; the
faster precision is kept and `max_steps` is set so the decay ends at the deadline (or taken from
the config, as a user would after a calibrated run that stopped early). The budget is the wall
time of `trainer.train()`; what the calibration left unused or overran is recorded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from budgetlm.hardware import cpu_name  # noqa: E402

WORK = BENCH / "work"
RESULTS = BENCH / "results" / "quality_runs.jsonl"
REPORT = BENCH / "results" / "quality.md"
LOCK = "/tmp/budgetlm-core0.lock"
PIN_TIMED = ["taskset", "-c", "0", "env", "OMP_NUM_THREADS=1", "MKL_NUM_THREADS=1"]
EOS = "<|endoftext|>"
SPLIT_SEED = 0
HELDOUT_FRACTION = 0.025
HELDOUT_MIN_BYTES = 250_000
OVERRUN_OK = 0.05
# where the timed runs ran; recorded with each run, and the report groups runs by it (quality compares on one machine only)
DEVICE_NOTE = f"1 thread, core 0 of a {os.cpu_count()}-core {' '.join(cpu_name().split())} (shared machine; timed runs serialized by flock)"

HF_DEFAULTS = dict(
    n_layer=2, n_embd=128, n_head=2, vocab=2048, batch_tokens=2048, seq_len=128, lr=4e-3,
    warmup=0.02, weight_decay=0.1, beta2=0.95, seed=0, max_steps=0,
)  # fmt: skip
# max_steps 0: calibrated from timed steps. Set, it is what a careful user passes after a calibrated run left part of its
# budget unused (2 x 128 at vocabulary 2048 stopped at 80-82% of 20 minutes twice: it calibrated slower than it then stepped)

# named sweeps: each entry overrides HF_DEFAULTS (the region a prior measurement found good on this CPU)
SWEEPS = {
    "cpu-90s": [
        {},  # 2 x 128, 2 heads, vocab 2048, 2048-token batch, seq 128, lr 4e-3
        {"n_layer": 1},
        {"n_layer": 4},
        {"n_layer": 3, "n_embd": 192, "n_head": 3},
        {"n_layer": 2, "n_embd": 256, "n_head": 4},
        {"n_layer": 4, "n_embd": 256, "n_head": 4},
        {"vocab": 1024},
        {"vocab": 4096},
        {"batch_tokens": 1024},
        {"batch_tokens": 4096},
        {"lr": 2e-3},
        {"lr": 8e-3},
        {"seq_len": 256},
        {"seq_len": 64},
        {"vocab": 8192},
    ],
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict:
    import tokenizers
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "budgetlm_commit": git_commit(),
    }


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def append_result(record: dict, path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------
# the split: once per corpus, deterministic


def split(corpus: str) -> Path:
    """bench/work/<corpus>/{train,heldout}.jsonl: budgetlm's reader cuts the corpus into documents
    (.txt files into ~16k-character passages at blank lines), `clean_text` normalises them (so both
    systems see the same characters), exact duplicates are dropped, and a seeded shuffle holds out
    documents until HELDOUT_FRACTION of the bytes (at least HELDOUT_MIN_BYTES) are set aside."""
    from budgetlm.config import PrepareConfig
    from budgetlm.data.clean import clean_text, digest
    from budgetlm.data.fetch import describe, fetch
    from budgetlm.data.sources import ReadStats, discover, iter_documents

    out = WORK / corpus
    if (out / "split.json").exists():
        return out
    folder = fetch(corpus)
    cfg = PrepareConfig()
    stats = ReadStats()
    docs, seen, dups = [], set(), 0
    for raw in iter_documents(discover([str(folder)], stats), cfg, stats):
        text = clean_text(raw)
        d = digest(text)
        if text and d not in seen:
            seen.add(d)
            docs.append(text)
        elif text:
            dups += 1
    random.Random(SPLIT_SEED).shuffle(docs)
    sizes = [len(t.encode("utf-8")) for t in docs]
    total = sum(sizes)
    target = max(HELDOUT_FRACTION * total, HELDOUT_MIN_BYTES)
    n_held, held_bytes = 0, 0
    while held_bytes < target:
        held_bytes += sizes[n_held]
        n_held += 1
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "heldout.jsonl", ({"text": t} for t in docs[:n_held]))
    write_jsonl(out / "train.jsonl", ({"text": t} for t in docs[n_held:]))
    info = {
        "corpus": corpus, "package": describe(folder)["package"], "seed": SPLIT_SEED, "documents": len(docs),
        "duplicates_dropped": dups, "train_documents": len(docs) - n_held, "heldout_documents": n_held,
        "train_bytes": total - held_bytes, "heldout_bytes": held_bytes, "heldout_share": round(held_bytes / total, 4),
        "txt_document_chars": cfg.txt_document_chars,
    }  # fmt: skip
    (out / "split.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    log(f"{corpus}: {len(docs)} documents, held out {n_held} ({held_bytes / 1e3:.0f} KB, {held_bytes / total:.1%} of the bytes)")
    return out


def load_texts(path: Path) -> list[str]:
    return [r["text"] for r in read_jsonl(path)]


# ---------------------------------------------------------------------------------------------
# Hugging Face baseline


def hf_config(overrides: dict) -> dict:
    unknown = set(overrides) - set(HF_DEFAULTS)
    if unknown:
        raise SystemExit(f"unknown HF config keys: {', '.join(sorted(unknown))} (known: {', '.join(HF_DEFAULTS)})")
    cfg = {**HF_DEFAULTS, **overrides}
    if cfg["batch_tokens"] % cfg["seq_len"] or cfg["n_embd"] % cfg["n_head"]:
        raise SystemExit("batch_tokens must be a multiple of seq_len and n_embd of n_head")
    return cfg


def hf_config_label(cfg: dict) -> str:
    return f"{cfg['n_layer']}x{cfg['n_embd']} h{cfg['n_head']} V{cfg['vocab']} B{cfg['batch_tokens']} T{cfg['seq_len']} lr{cfg['lr']:g}" + "".join(
        f" {k}={cfg[k]}" for k in ("warmup", "weight_decay", "beta2", "seed", "max_steps") if cfg[k] != HF_DEFAULTS[k]
    )


def hf_tokenize(corpus: str, vocab: int) -> Path:
    """Tokenizer trained on train.jsonl, and the train / held-out token streams (untimed, cached)."""
    import numpy as np
    from scoring import token_stream
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    work = split(corpus)
    out = work / f"hf-v{vocab}"
    if (out / "meta.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    train = load_texts(work / "train.jsonl")
    held = load_texts(work / "heldout.jsonl")
    t0 = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(train, trainer)
    eos = tok.token_to_id(EOS)
    t1 = time.perf_counter()

    def encode_batch(texts):
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

    # run_clm: each document tokenized whole + eos, concatenated (grouped into blocks at training time)
    train_ids = np.asarray(token_stream(train, encode_batch, eos)[1:], dtype=np.int32)
    held_ids = np.asarray(token_stream(held, encode_batch, eos), dtype=np.int32)
    tok.save(str(out / "tokenizer.json"))
    np.save(out / "train_ids.npy", train_ids)
    np.save(out / "heldout_ids.npy", held_ids)
    meta = {"vocab": tok.get_vocab_size(), "eos_id": eos, "train_tokens": int(len(train_ids)), "heldout_tokens": int(len(held_ids)),
            "tokenizer_s": round(t1 - t0, 1), "encode_s": round(time.perf_counter() - t1, 1)}  # fmt: skip
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    log(f"{corpus}: HF tokenizer V={vocab}: {len(train_ids):,} train tokens, {len(held_ids):,} held-out tokens")
    return out


def _hf_timed(corpus: str, budget_s: float, cfg: dict) -> dict:
    """Calibrate, train for the budget and score: runs inside the pinned, locked child."""
    import numpy as np
    import torch
    from scoring import bits_per_byte
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(1)
    tokdir = WORK / corpus / f"hf-v{cfg['vocab']}"
    meta = json.loads((tokdir / "meta.json").read_text(encoding="utf-8"))
    ids = torch.from_numpy(np.load(tokdir / "train_ids.npy").astype(np.int64))
    T = cfg["seq_len"]
    blocks = ids[: len(ids) // T * T].view(-1, T)  # group_texts: the remainder is dropped

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(blocks)

        def __getitem__(self, i):
            return {"input_ids": blocks[i], "labels": blocks[i]}

    n_vocab = (meta["vocab"] + 63) // 64 * 64
    ffn = (int(8 * cfg["n_embd"] / 3) + 63) // 64 * 64

    def make_model():
        torch.manual_seed(cfg["seed"])
        conf = LlamaConfig(
            vocab_size=n_vocab, hidden_size=cfg["n_embd"], intermediate_size=ffn, num_hidden_layers=cfg["n_layer"],
            num_attention_heads=cfg["n_head"], num_key_value_heads=cfg["n_head"], max_position_embeddings=T,
            tie_word_embeddings=True, bos_token_id=meta["eos_id"], eos_token_id=meta["eos_id"], pad_token_id=meta["eos_id"],
            attn_implementation="sdpa",
        )  # fmt: skip
        return LlamaForCausalLM(conf)

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    def trainer_for(model, max_steps: int, bf16: bool, warmup_steps: int, clock=None):
        args = TrainingArguments(
            output_dir=str(WORK / corpus / "hf-trainer-tmp"), max_steps=max_steps, per_device_train_batch_size=cfg["batch_tokens"] // T,
            learning_rate=cfg["lr"], lr_scheduler_type="linear", warmup_steps=warmup_steps, weight_decay=cfg["weight_decay"],
            adam_beta2=cfg["beta2"], max_grad_norm=1.0, optim="adamw_torch_fused", bf16=bf16, use_cpu=True,
            logging_strategy="steps", logging_steps=50, save_strategy="no", eval_strategy="no", report_to=[],
            dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=True, seed=cfg["seed"],
        )  # fmt: skip
        return Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[clock] if clock else [])

    # calibration: the same Trainer, a few dozen steps per precision; step time = mean interval after warm-up. With 24
    # steps (5 skipped) the 20-minute run of 2 x 128 at vocabulary 2048 calibrated 67.9 ms on an idle machine, then
    # stepped at 57 ms in its first quarter and stopped at 82% of its budget: its first bf16 steps stay slow longer
    n_cal, n_skip = 64, 16
    calib = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        clock = Clock()
        tr = trainer_for(make_model(), n_cal, bf16, 0, clock)
        t0 = time.perf_counter()
        tr.train()
        t1 = time.perf_counter()
        step = statistics.mean(b - a for a, b in zip(clock.ends[n_skip:], clock.ends[n_skip + 1 :]))
        calib[name] = {"step_s": step, "fixed_s": (t1 - t0) - n_cal * step, "train_s": t1 - t0}
        del tr
    precision = min(calib, key=lambda k: calib[k]["step_s"])
    c = calib[precision]
    max_steps = cfg["max_steps"] or max(10, int((budget_s - max(c["fixed_s"], 0.0)) / c["step_s"]))
    warmup_steps = max(1, round(cfg["warmup"] * max_steps))
    log(f"calibration: fp32 {calib['fp32']['step_s'] * 1e3:.1f} ms/step, bf16 {calib['bf16']['step_s'] * 1e3:.1f} ms/step -> "
        f"{precision}, max_steps {max_steps} (fixed {c['fixed_s']:.2f} s)")  # fmt: skip

    model = make_model()
    clock = Clock()
    tr = trainer_for(model, max_steps, precision == "bf16", warmup_steps, clock)
    t0 = time.perf_counter()
    out = tr.train()
    train_s = time.perf_counter() - t0
    gaps = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    q = max(1, len(gaps) // 4)
    step_times = {"mean_s": round(statistics.mean(gaps), 5), "first_quarter_s": round(statistics.mean(gaps[:q]), 5),
                  "last_quarter_s": round(statistics.mean(gaps[-q:]), 5)} if gaps else {}  # fmt: skip
    steps = tr.state.global_step
    losses = [r["loss"] for r in tr.state.log_history if "loss" in r]

    model.eval()
    held = np.load(tokdir / "heldout_ids.npy").astype(np.int64)
    n_bytes = json.loads((WORK / corpus / "split.json").read_text(encoding="utf-8"))["heldout_bytes"]
    t1 = time.perf_counter()
    score = bits_per_byte(lambda x: model(input_ids=x).logits, held.tolist(), n_bytes, T)
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "steps": steps, "max_steps": max_steps, "tokens": steps * cfg["batch_tokens"], "train_s": round(train_s, 2),
        "budget_used": round(train_s / budget_s, 4), "budget_overrun_s": round(train_s - budget_s, 2),
        "precision": precision, "step_times": step_times, "calibration": {k: {kk: round(vv, 5) for kk, vv in v.items()} for k, v in calib.items()},
        "params": n_params, "epochs": round(steps * cfg["batch_tokens"] / len(ids), 3),
        "heldout_bpb": round(score["bpb"], 5), "heldout": score, "score_s": round(time.perf_counter() - t1, 1),
        "own": {"final_train_loss": losses[-1] if losses else None, "train_loss_mean": round(out.training_loss, 5)},
        "torch_threads": torch.get_num_threads(), "affinity": sorted(os.sched_getaffinity(0)),
    }  # fmt: skip


def timed_prefix(pin: bool) -> list[str]:
    return ["flock", LOCK, *PIN_TIMED] if pin else ["env", "OMP_NUM_THREADS=1", "MKL_NUM_THREADS=1"]


def run_hf(corpus: str, budget_s: float, overrides: dict, pin: bool = True, results: Path = RESULTS, label: str = "") -> dict:
    cfg = hf_config(overrides)
    hf_tokenize(corpus, cfg["vocab"])
    cmd = [*timed_prefix(pin), sys.executable, str(Path(__file__).resolve()), "_hf-timed", "--corpus", corpus, "--budget", str(budget_s),
           "--config", json.dumps(cfg)]  # fmt: skip
    log(f"HF {corpus} {budget_s:g}s {hf_config_label(cfg)}: waiting for the core-0 lock" if pin else f"HF {corpus} {hf_config_label(cfg)}")
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"HF run failed ({proc.returncode})")
    sys.stderr.write("".join(ln + "\n" for ln in proc.stderr.splitlines() if ln.startswith("[")))
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    record = {
        "system": "hf-trainer", "corpus": corpus, "budget_s": budget_s, "config": cfg, "config_label": hf_config_label(cfg),
        "label": label, **res, "threads": DEVICE_NOTE if pin else "unpinned", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s_with_setup": round(time.time() - t0, 1), "versions": versions(), "command": shlex.join(cmd[len(timed_prefix(pin)) :]),
    }  # fmt: skip
    append_result(record, results)
    log(f"HF {corpus} {budget_s:g}s {record['config_label']}: {res['steps']} steps, {res['train_s']:.1f} s, bpb {res['heldout_bpb']:.4f}")
    return record


def sweep(corpus: str, budget_s: float, configs: list[dict], pin: bool = True, results: Path = RESULTS) -> None:
    done = set()
    if results.exists():
        done = {(r["corpus"], r["budget_s"], r["config_label"]) for r in read_jsonl(results) if r["system"] == "hf-trainer"}
    for overrides in configs:
        cfg = hf_config(overrides)
        if (corpus, budget_s, hf_config_label(cfg)) in done:
            log(f"skip (recorded): {corpus} {budget_s:g}s {hf_config_label(cfg)}")
            continue
        try:
            run_hf(corpus, budget_s, overrides, pin, results)
        except SystemExit as e:
            log(f"FAILED {hf_config_label(cfg)}: {e}")


def job_key(job: dict) -> tuple:
    if job["system"] == "hf-trainer":
        return ("hf-trainer", job["corpus"], float(job["budget"]), hf_config_label(hf_config(job.get("config", {}))))
    return ("budgetlm", job["corpus"], float(job["budget"]), job.get("label") or f"defaults @ {git_commit()}")


def record_key(r: dict) -> tuple:
    return (r["system"], r["corpus"], float(r["budget_s"]), r["config_label"] if r["system"] == "hf-trainer" else r["label"])


def queue(path: Path, pin: bool = True, results: Path = RESULTS) -> None:
    """Run the jobs of a JSON-lines queue file in order, one at a time, skipping those already recorded.

    The file is re-read before every job, so jobs can be added, removed or reordered while it runs.
    A job: {"system": "hf-trainer", "corpus": C, "budget": S, "config": {...}} or
    {"system": "budgetlm", "corpus": C, "budget": S, "set": [...], "label": L}."""
    failed: set = set()
    while True:
        done = {record_key(r) for r in read_jsonl(results)} if results.exists() else set()
        jobs = [j for j in read_jsonl(path) if job_key(j) not in done and job_key(j) not in failed]
        if not jobs:
            log("queue empty")
            return
        job = jobs[0]
        try:
            if job["system"] == "hf-trainer":
                run_hf(job["corpus"], float(job["budget"]), job.get("config", {}), pin, results)
            else:
                run_budgetlm(job["corpus"], float(job["budget"]), job.get("set", []), pin, results, job.get("label", ""))
        except (SystemExit, subprocess.CalledProcessError, OSError) as e:
            log(f"FAILED {job}: {e}")
            failed.add(job_key(job))


# ---------------------------------------------------------------------------------------------
# budgetlm


def run_budgetlm(corpus: str, budget_s: float, sets: list[str], pin: bool = True, results: Path = RESULTS, label: str = "") -> dict:
    """`data prepare` with defaults (untimed) and `pretrain --budget` with no recipe (timed), scored on the held-out text."""
    work = split(corpus)
    commit = git_commit()
    bl = Path(sys.executable).with_name("budgetlm")
    base = work / f"budgetlm-{commit}"
    data_dir = base / "data"
    tag = hashlib.sha1(json.dumps(sets).encode()).hexdigest()[:6] if sets else "defaults"
    run_dir = base / f"run-{budget_s:g}s-{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    base.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    subprocess.run([str(bl), "data", "prepare", str(work / "train.jsonl"), "--out", str(data_dir)], check=True)
    prepare_s = time.time() - t0
    cmd = [str(bl), "pretrain", "--data", str(data_dir), "--out", str(run_dir), "--budget", f"{budget_s:g}s"]
    for s in sets:
        cmd += ["--set", s]
    log(f"budgetlm {corpus} {budget_s:g}s {' '.join(sets) or '(defaults)'}: waiting for the core-0 lock" if pin else "budgetlm pretrain")
    t1 = time.time()
    # an empty inductor cache: when the plan compiles, the compile is paid in full on the clock, as on a user's first run
    with tempfile.TemporaryDirectory(prefix="inductor-") as inductor_cache:
        subprocess.run([*timed_prefix(pin), *cmd], check=True, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": inductor_cache})
    pretrain_wall = time.time() - t1

    record = score_budgetlm(corpus, budget_s, run_dir, sets, label or f"defaults @ {commit}", pin, cmd, prepare_s, pretrain_wall)
    append_result(record, results)
    own = record["own"].get("val_bpb")
    log(f"budgetlm {corpus} {budget_s:g}s: {record['config_label']}, {record['steps']} steps, bpb {record['heldout_bpb']:.4f} (own val {own})")
    return record


def score_budgetlm(
    corpus: str, budget_s: float, run_dir: Path, sets: list[str], label: str, pin: bool = True, cmd: list[str] | None = None,
    prepare_s: float | None = None, pretrain_wall: float | None = None,
) -> dict:
    """The record of a finished budgetlm run: its summary and its held-out bits per byte."""
    import torch
    from scoring import bits_per_byte, token_stream

    from budgetlm.data.clean import clean_text
    from budgetlm.run import load_run

    torch.set_num_threads(1)
    work = WORK / corpus
    run = load_run(run_dir)
    env = json.loads((run_dir / "env.json").read_text(encoding="utf-8")) if (run_dir / "env.json").exists() else {}
    end = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("event") == "end"]
    summary = end[-1] if end else {}
    tok = run.tokenizer
    pcfg = run.config.prepare if hasattr(run.config, "prepare") else None
    norm = getattr(pcfg, "normalization", "NFC")
    lower = getattr(pcfg, "lowercase", False)
    held = load_texts(work / "heldout.jsonl")
    n_bytes = json.loads((work / "split.json").read_text(encoding="utf-8"))["heldout_bytes"]
    ids = token_stream([clean_text(t, norm, lower) for t in held], tok.encode_batch, tok.eos_id)  # as `data prepare` packs
    t2 = time.time()
    score = bits_per_byte(lambda x: run.model(x), ids, n_bytes, run.config.model.seq_len)
    m, tc = run.config.model, run.config.train
    own = json.loads((run_dir / "eval.json").read_text(encoding="utf-8")) if (run_dir / "eval.json").exists() else {}
    plan = json.loads((run_dir / "plan.json").read_text(encoding="utf-8")) if (run_dir / "plan.json").exists() else {}
    record = {
        "system": "budgetlm", "corpus": corpus, "budget_s": budget_s, "label": label,
        "config": {"sets": sets, "n_layer": m.n_layer, "n_embd": m.n_embd, "n_head": m.n_head, "vocab": tok.vocab_size, "seq_len": m.seq_len,
                   "batch_tokens": run.config.train.batch_tokens, "lr": run.config.train.lr, "schedule": run.config.train.schedule},
        "config_label": f"{m.n_layer}x{m.n_embd} h{m.n_head} V{tok.vocab_size} B{tc.batch_tokens} T{m.seq_len} lr{tc.lr:g}",
        "steps": summary.get("steps"), "tokens": summary.get("tokens"), "planned_tokens": summary.get("planned_tokens"),
        "speed_vs_plan": summary.get("speed_vs_plan"), "speed_calibration": plan.get("speed_calibration"),
        "calibration_runs": plan.get("calibration_runs"),
        "train_s": summary.get("elapsed_s"), "budget_used": summary.get("budget_used"), "compile": run.config.train.compile,
        "params": summary.get("params"), "pretrain_wall_s": pretrain_wall and round(pretrain_wall, 1), "prepare_s": prepare_s and round(prepare_s, 1),
        "heldout_bpb": round(score["bpb"], 5), "heldout": score, "score_s": round(time.time() - t2, 1), "own": own,
        "torch_threads": env.get("torch_threads", env.get("environment", {}).get("torch_threads")), "run_dir": str(run_dir.relative_to(ROOT)),
        "threads": DEVICE_NOTE if pin else "unpinned", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(), "command": shlex.join(cmd) if cmd else None,
    }  # fmt: skip
    return record


# ---------------------------------------------------------------------------------------------
# report


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def report(results: Path = RESULTS, out: Path = REPORT) -> str:
    rows = read_jsonl(results) if results.exists() else []
    lines = [
        "# Quality per second: budgetlm defaults against a swept Hugging Face Trainer baseline",
        "",
        "Bits per byte over every byte of the same held-out documents (`bench/scoring.py`; lower is better), each system",
        "tokenizing them the way it tokenizes its training text: documents whole, each followed by its end-of-text token,",
        "scored in non-overlapping windows of the model's context length. Held-out documents come from a seeded shuffle",
        "of the corpus cut into documents by budgetlm's reader (`python bench/quality.py split`); both systems train",
        "only on the rest. HF budget = wall time of `trainer.train()`; budgetlm budget = `pretrain --budget` (its clock).",
        "",
        f"Device: {'; '.join(sorted({r['threads'] for r in rows})) or DEVICE_NOTE}. Every timed run ran alone on core 0 with `OMP_NUM_THREADS=1` and",
        "`torch.set_num_threads(1)` under `flock /tmp/budgetlm-core0.lock`; a second engineer's untimed work may have",
        "run on core 1 meanwhile (shared L3 and memory bandwidth), so step rates vary by a few per cent between runs.",
        "",
    ]
    if rows:
        v = rows[-1]["versions"]
        lines += [f"Versions: Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, tokenizers {v['tokenizers']}.", ""]
    notes = out.with_name(out.stem + "_notes.md")  # hand-written findings, kept next to the generated tables
    if notes.exists():
        lines += [notes.read_text(encoding="utf-8").strip(), ""]
    groups = sorted({(r["budget_s"], r["corpus"]) for r in rows})
    for budget_s, corpus in groups:
        rs = [r for r in rows if r["budget_s"] == budget_s and r["corpus"] == corpus]
        # a run that overran its budget by more than OVERRUN_OK had more time than the rest: listed, never "best"
        hf = sorted((r for r in rs if r["system"] == "hf-trainer"), key=lambda r: (r["budget_used"] > 1 + OVERRUN_OK, r["heldout_bpb"]))
        bl = [r for r in rs if r["system"] == "budgetlm"]
        lines += [f"## {corpus}, {budget_s:g} s", ""]
        if hf:
            lines += [
                f"Hugging Face Trainer sweep, {len(hf)} runs, best first (**bold** = the best; † = overran the budget by more than "
                f"{OVERRUN_OK:.0%}, not eligible as best):",
                "",
            ]
            lines += [
                "| config (layers x width, heads, vocab, batch tokens, seq, lr) | params | precision | steps | tokens | train s | budget used "
                "| held-out bpb |",
                "|---|---:|---|---:|---:|---:|---:|---:|",
            ]
            for i, r in enumerate(hf):
                b = "**" if i == 0 and r["budget_used"] <= 1 + OVERRUN_OK else ""
                dagger = " †" if r["budget_used"] > 1 + OVERRUN_OK else ""
                lines.append(
                    f"| {b}{r['config_label']}{b} | {r['params'] / 1e6:.2f}M | {r['precision']} | {r['steps']} | {r['tokens'] / 1e6:.2f}M | "
                    f"{r['train_s']:.1f} | {r['budget_used']:.1%}{dagger} | {b}{r['heldout_bpb']:.4f}{b} |"
                )
            lines.append("")
        if bl:
            lines += ["budgetlm (no sweep; tokens made over the tokens its plan expected, where it planned, with the factor it scaled its "
                      "timing by, where earlier runs here had taught it one):", "",
                      "| label | chosen config | params | steps | tokens | vs plan | train s | own val bpb | held-out bpb | vs best HF |",
                      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
            for r in bl:
                ratio = f"{r['heldout_bpb'] / hf[0]['heldout_bpb']:.3f}x" if hf and hf[0]["budget_used"] <= 1 + OVERRUN_OK else ""
                params = f"{r['params'] / 1e6:.2f}M" if r.get("params") else ""
                vs_plan = f"{r['tokens'] / r['planned_tokens']:.2f}x" if r.get("planned_tokens") else ""
                if r.get("calibration_runs"):  # the plan expected the timed speed times what earlier runs sustained over theirs
                    vs_plan += f" (timed x{r['speed_calibration']:.2f})"
                lines.append(
                    f"| {r['label']} | {r['config_label']} | {params} | {r['steps']} | {_fmt((r['tokens'] or 0) / 1e6, '.2f')}M | "
                    f"{vs_plan} | "
                    f"{_fmt(r['train_s'], '.1f')} | {_fmt(r['own'].get('val_bpb'), '.4f')} | {r['heldout_bpb']:.4f} | {ratio} |"
                )
            lines.append("")
    lines += [
        "## Reproduce",
        "",
        "```bash",
        "make venv",
        "taskset -c 1 .venv/bin/python bench/quality.py split --corpus shakespeare     # and --corpus django-docs",
        "# every run recorded here, in the order it ran (the queue skips runs already in the results file):",
        "taskset -c 1 .venv/bin/python bench/quality.py queue bench/results/quality_queue.jsonl",
        "# one run of each kind:",
        "taskset -c 1 .venv/bin/python bench/quality.py hf --corpus shakespeare --budget 90 --config '{\"batch_tokens\": 1024}'",
        "taskset -c 1 .venv/bin/python bench/quality.py budgetlm --corpus shakespeare --budget 90",
        "taskset -c 1 .venv/bin/python bench/quality.py report",
        "```",
        "",
        "Every run is one line of `bench/results/quality_runs.jsonl` (config, calibration, steps, tokens, train seconds,",
        "budget used, held-out bpb with token and byte counts, threads, date, versions, the timed command).",
        "",
    ]
    text = "\n".join(lines)
    out.write_text(text, encoding="utf-8")
    return text


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("--corpus", required=True)
    for name in ("hf", "_hf-timed", "sweep", "budgetlm"):
        s = sub.add_parser(name)
        s.add_argument("--corpus", required=True)
        s.add_argument("--budget", type=float, required=True, help="seconds")
        s.add_argument("--no-pin", action="store_true", help="no taskset/flock (a machine of one's own)")
        s.add_argument("--results", default=str(RESULTS))
        s.add_argument("--label", default="")
        if name in ("hf", "_hf-timed"):
            s.add_argument("--config", default="{}", help="JSON overrides of the HF config")
        if name == "sweep":
            s.add_argument("--sweep", choices=sorted(SWEEPS))
            s.add_argument("--configs", help="a JSON file: a list of HF config overrides")
        if name == "budgetlm":
            s.add_argument("--set", action="append", default=[], help="extra pretrain override key=value")
    s = sub.add_parser("record", help="score and record a finished budgetlm run (e.g. one whose scoring was interrupted)")
    s.add_argument("--corpus", required=True)
    s.add_argument("--budget", type=float, required=True)
    s.add_argument("--run", required=True)
    s.add_argument("--label", required=True)
    s.add_argument("--results", default=str(RESULTS))
    s = sub.add_parser("queue")
    s.add_argument("file")
    s.add_argument("--no-pin", action="store_true")
    s.add_argument("--results", default=str(RESULTS))
    s = sub.add_parser("report")
    s.add_argument("--results", default=str(RESULTS))
    s.add_argument("--out", default=str(REPORT), help="the report (Markdown); hand-written notes are read from OUT_notes.md")
    a = p.parse_args(argv)
    if a.cmd == "split":
        print(split(a.corpus))
    elif a.cmd == "_hf-timed":
        print(json.dumps(_hf_timed(a.corpus, a.budget, json.loads(a.config))))
    elif a.cmd == "hf":
        run_hf(a.corpus, a.budget, json.loads(a.config), not a.no_pin, Path(a.results), a.label)
    elif a.cmd == "sweep":
        configs = SWEEPS[a.sweep] if a.sweep else json.loads(Path(a.configs).read_text(encoding="utf-8"))
        sweep(a.corpus, a.budget, configs, not a.no_pin, Path(a.results))
    elif a.cmd == "budgetlm":
        run_budgetlm(a.corpus, a.budget, a.set, not a.no_pin, Path(a.results), a.label)
    elif a.cmd == "record":
        append_result(score_budgetlm(a.corpus, a.budget, Path(a.run).absolute(), [], a.label), Path(a.results))
    elif a.cmd == "queue":
        queue(Path(a.file), not a.no_pin, Path(a.results))
    elif a.cmd == "report":
        print(report(Path(a.results), Path(a.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
