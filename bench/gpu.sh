#!/usr/bin/env bash
# Every GPU measurement budgetlm needs, in one command that ends within 9 minutes on one H100.
#
#   bench/gpu.sh              # on a machine with a CUDA GPU; results in bench/results/gpu/ (or $OUT)
#   bench/gpu.sh --dry-run    # (or SMOKE=1) tiny sizes on the CPU: checks the script end to end
#
# Sections (each has its own time limit, log and status; one failing does not lose the others):
#   env       device, driver, torch / CUDA / cuDNN / transformers versions, git commit
#   sdpa      scaled_dot_product_attention at the gpt-124m-1gpu shapes: does the flash kernel run,
#             its time against the memory-efficient and math kernels, and does budgetlm's
#             attention call reach flash (run with only the flash backend allowed)
#   tests     the test suite's GPU-only tests (pytest -m gpu): int4 and int8 weights and 2:4 sparsity
#             compressed on the GPU, saved, reloaded and run (they need torchao: carry its wheel if absent)
#   bf16      bench/train_speed.py on gpt-124m-1gpu's model (12 x 768, seq 1024, batch 16): budgetlm
#             eager and torch.compile'd and HF LlamaForCausalLM eager with the same weights: tokens/s,
#             MFU (target >= 55% for budgetlm compiled), speed-up over HF
#   memory    bench/plan_memory.py --device cuda: torch.cuda.max_memory_allocated of real training
#             steps against budgetlm/memory.py's estimate (target: within 15%)
#   pretrain  the budget-derived defaults end to end on this GPU: `budgetlm plan --device cuda` at 60 s
#             and 24 h, then `budgetlm pretrain --budget 60s` with no recipe and no model keys on
#             $DATA (a prepared data directory; default runs/demo/data, from `make demo`) and `eval`:
#             what the plan chose, and the tokens it trained against the plan's prediction
#   mfu_batch budgetlm compiled at micro-batches 32 and 64 (same model and sequence): how much of the
#             gap to the MFU target the batch closes (a 768-wide model's matmuls are small for a GPU)
#   profile   bench/step_profile.py: the compiled bf16 step of the bf16 section under torch.profiler, GPU time
#             by kernel and by class (matmul, attention, optimizer, other): where the gap to peak is
#   fp16      bf16's measurement in fp16 autocast with a GradScaler, budgetlm only, eager and compiled
#   hf_compile HF LlamaForCausalLM torch.compile'd, same sizes (the fair opponent of budgetlm compiled)
#   summary   summary.md: the numbers above against their targets
#
# Needs no network: PyTorch (CUDA build) and transformers must already be installed; the repository
# is put on PYTHONPATH, so budgetlm need not be. Set PYTHON to choose the interpreter.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)

SMOKE=${SMOKE:-0}
for arg in "$@"; do
  case "$arg" in
    --dry-run|--smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (use --dry-run)" >&2; exit 2 ;;
  esac
done

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ "$SMOKE" = 1 ]; then
  OUT=${OUT:-${TMPDIR:-/tmp}/budgetlm-gpu-smoke}
  DEVICE=cpu CONFIG=smoke BATCH=2 STEPS="--warmup 1 --steps 1 --repeats 1 --peak-n 256"
  COMPILE_FP16=""  # compiling on a CPU takes minutes: fp16 runs eager only
  MEMORY_ARGS="--smoke --steps 2"
  TOTAL=${TOTAL:-900}  # one slow CPU core compiles slowly
  PRETRAIN_BUDGET=10s
  MFU_BATCHES="4"
  PROFILE_STEPS=1
else
  OUT=${OUT:-$ROOT/bench/results/gpu}
  DEVICE=cuda CONFIG=gpt2-124m BATCH=16 STEPS="--warmup 3 --steps 5 --repeats 3"
  COMPILE_FP16="--compile"
  MEMORY_ARGS="--configs gpt2-124m-bf16-b8,gpt2-124m-bf16-b8-ckpt,gpt2-124m-fp16-b8,gpt2-124m-fp32-b4,bert-24h-bf16-b128,30m-bf16-b4-s512"
  TOTAL=${TOTAL:-530}  # seconds for everything: under 9 minutes
  PRETRAIN_BUDGET=60s
  MFU_BATCHES="32 64"
  PROFILE_STEPS=5
fi
export PYTHON DEVICE
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
START=$(date +%s)
STATUS="$OUT/sections.tsv"
printf 'section\tstatus\tseconds\tlog\n' > "$STATUS"
echo "bench/gpu.sh: device $DEVICE, results in $OUT, at most ${TOTAL}s"

# run_section NAME LIMIT_SECONDS COMMAND...: runs with a time limit (never past the overall budget),
# logs stdout+stderr to $OUT/NAME.log, records ok / failed (rc) / timeout, and never stops the script
run_section() {
  local name=$1 limit=$2; shift 2
  local now left rc t0
  now=$(date +%s); left=$((TOTAL - (now - START) - ${RESERVE:-30}))  # 30 s kept for the summary
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -le 5 ]; then
    printf '%s\tskipped (no time left)\t0\t-\n' "$name" >> "$STATUS"; echo "[$name] skipped: no time left"; return 0
  fi
  echo "[$name] up to ${limit}s ..."
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - t0 )) st=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then st="timeout (${limit}s)"; elif [ "$rc" != 0 ]; then st="failed (rc $rc)"; fi
  printf '%s\t%s\t%s\t%s.log\n' "$name" "$st" "$took" "$name" >> "$STATUS"
  echo "[$name] $st in ${took}s"
  return 0
}

run_section env 20 "$PYTHON" - "$OUT" "$DEVICE" <<'EOF'
import json, os, platform, subprocess, sys
out, device = sys.argv[1], sys.argv[2]
import torch
info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            cuda_available=torch.cuda.is_available(), device=device, cpu_count=os.cpu_count())
try:
    import transformers
    info["transformers"] = transformers.__version__
except ImportError:
    info["transformers"] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                bf16_supported=torch.cuda.is_bf16_supported(), gpu_count=torch.cuda.device_count())
for cmd, key in ((["git", "rev-parse", "HEAD"], "commit"), (["nvidia-smi"], "nvidia_smi")):
    try:
        info[key] = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info[key] = None
json.dump(info, open(os.path.join(out, "env.json"), "w"), indent=2)
print(json.dumps({k: v for k, v in info.items() if k != "nvidia_smi"}, indent=2))
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch")
EOF

run_section sdpa 45 "$PYTHON" - "$OUT" "$DEVICE" "$SMOKE" <<'EOF'
import json, os, sys, time
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from budgetlm.config import ModelConfig
from budgetlm.model import Transformer
out, device, smoke = sys.argv[1], torch.device(sys.argv[2]), sys.argv[3] == "1"
B, H, T, D = (2, 2, 64, 32) if smoke else (16, 12, 1024, 64)  # gpt-124m-1gpu: 12 heads of 64, seq 1024
dtype = torch.bfloat16
res = dict(shape=[B, H, T, D], dtype="bf16", backends={})
q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
ref = None
for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)):
    try:
        with sdpa_kernel([backend]):
            for _ in range(2):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True); o.sum().backward()
            if device.type == "cuda": torch.cuda.synchronize()
            t0, n = time.perf_counter(), 3 if smoke else 20
            for _ in range(n):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True); o.sum().backward()
            if device.type == "cuda": torch.cuda.synchronize()
            ms = 1000 * (time.perf_counter() - t0) / n
        ref = o.float() if ref is None else ref
        res["backends"][name] = dict(ok=True, fwd_bwd_ms=round(ms, 3), max_abs_diff_vs_flash=round((o.float() - ref).abs().max().item(), 5))
    except Exception as exc:
        res["backends"][name] = dict(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
# budgetlm's own attention, with only the flash kernel allowed: an error means the model cannot use it
cfg = ModelConfig(n_layer=1, n_head=H, n_embd=H * D, seq_len=T, vocab_size=256)
model = Transformer.build(cfg, device)
try:
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast(device.type, dtype=dtype):
        x = torch.randint(0, 256, (B, T), device=device)
        model(x[:, :-1], targets=x[:, 1:], loss=True).backward()
    res["budgetlm_attention_uses_flash"] = True
except Exception as exc:
    res["budgetlm_attention_uses_flash"] = False
    res["budgetlm_flash_error"] = f"{type(exc).__name__}: {exc}"[:300]
json.dump(res, open(os.path.join(out, "sdpa.json"), "w"), indent=2)
print(json.dumps(res, indent=2))
sys.exit(0 if res["backends"]["flash"]["ok"] and res["budgetlm_attention_uses_flash"] else 1)
EOF

run_section tests 90 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/test_compress_gpu.py

# most important first: a section that finds too little time left is cut short or skipped
run_section bf16 170 "$PYTHON" bench/train_speed.py --device "$DEVICE" --dtype bf16 --configs "$CONFIG" --batch "$BATCH" \
  --compile $STEPS --out "$OUT/train_speed_bf16"
run_section memory 100 "$PYTHON" bench/plan_memory.py --device "$DEVICE" $MEMORY_ARGS --out "$OUT/plan_memory"
DATA=${DATA:-$ROOT/runs/demo/data}
if [ -f "$DATA/manifest.json" ]; then
  run_section pretrain 130 bash -c '
    set -e; out=$1 budget=$2 data=$3; run=$(mktemp -d)/run
    timeout 40 "$PYTHON" -m budgetlm plan --device "$DEVICE" --budget 24h --json > "$out/plan_24h.json" || echo "plan 24h: failed or over 40 s"
    "$PYTHON" -m budgetlm plan --device "$DEVICE" --budget "$budget" --data "$data" --json > "$out/plan_short.json"
    "$PYTHON" -m budgetlm pretrain --data "$data" --out "$run" --budget "$budget"
    "$PYTHON" -m budgetlm eval "$run"
    cp "$run/report.md" "$out/pretrain_report.md"; cp "$run/plan.json" "$out/pretrain_plan.json"' _ "$OUT" "$PRETRAIN_BUDGET" "$DATA"
else
  printf 'pretrain\tskipped (no prepared data at %s: run make demo, or set DATA)\t0\t-\n' "$DATA" >> "$STATUS"
fi
run_section mfu_batch 100 bash -c '
  for b in $2; do "$PYTHON" bench/train_speed.py --device "$DEVICE" --dtype bf16 --configs "$1" --batch "$b" --compile --no-eager --no-hf $3 \
    --out "$4/train_speed_bf16_b$b" || exit; done' _ "$CONFIG" "$MFU_BATCHES" "$STEPS" "$OUT"
run_section profile 90 "$PYTHON" bench/step_profile.py --device "$DEVICE" --config "$CONFIG" --batch "$BATCH" --dtype bf16 \
  --optimizer adamw --llama-shaped --compile --steps "$PROFILE_STEPS" --out "$OUT/step_profile"
run_section fp16 100 "$PYTHON" bench/train_speed.py --device "$DEVICE" --dtype fp16 --configs "$CONFIG" --batch "$BATCH" \
  $COMPILE_FP16 --no-hf $STEPS --out "$OUT/train_speed_fp16"
run_section hf_compile 110 "$PYTHON" bench/train_speed.py --device "$DEVICE" --dtype bf16 --configs "$CONFIG" --batch "$BATCH" \
  --compile-hf --no-eager $STEPS --out "$OUT/train_speed_bf16_hf_compile"
RESERVE=2 run_section summary 20 "$PYTHON" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError):
        return None
lines = ["# bench/gpu.sh summary", ""]
env = load("env.json") or {}
lines.append(f"- device: {env.get('gpu') or 'CPU (dry run)'}; torch {env.get('torch')}, CUDA {env.get('cuda')}, "
             f"transformers {env.get('transformers')}; commit {str(env.get('commit'))[:10]}")
sdpa = load("sdpa.json")
if sdpa:
    b = sdpa["backends"]
    times = ", ".join(f"{k} {v['fwd_bwd_ms']} ms" if v["ok"] else f"{k} failed" for k, v in b.items())
    lines.append(f"- SDPA {sdpa['shape']} bf16 causal, forward+backward: {times}; budgetlm's attention runs on flash: "
                 f"{sdpa.get('budgetlm_attention_uses_flash')}")
tests = [ln for ln in open(os.path.join(out, "tests.log")).read().splitlines() if " in " in ln] if os.path.exists(os.path.join(out, "tests.log")) else []
lines.append(f"- GPU-only tests (pytest -m gpu): {tests[-1].strip('= ') if tests else 'no result (see tests.log)'}")
tps = {}
batches = sorted(n[len("train_speed_bf16_b"):-5] for n in os.listdir(out) if n.startswith("train_speed_bf16_b") and n.endswith(".json"))
for dt, log in (("bf16", "bf16"), *((f"bf16_b{b}", "mfu_batch") for b in batches), ("fp16", "fp16"), ("bf16_hf_compile", "hf_compile")):
    r = load(f"train_speed_{dt}.json")
    if not r:
        lines.append(f"- {dt}: no result (see {log}.log)"); continue
    for row in r["rows"]:
        if "error" not in row and not dt.startswith("bf16_b"):  # compiled against compiled: at the same batch
            tps[(row["dtype"], row["variant"])] = row["tokens_per_s"]
        if "error" in row:
            lines.append(f"- {dt} {row['variant']}: failed: {row['error'][:150]}"); continue
        vs = f", {row['speedup_vs_hf']:.2f}x HF eager" if row.get("speedup_vs_hf") else ""
        target = " (target >= 55%: " + ("met" if row["mfu"] >= 0.55 else "NOT met") + ")" if row["variant"] == "budgetlm+compile" and dt.startswith("bf16") and "hf" not in dt else ""
        lines.append(f"- {row['dtype']} {row['config']} seq {row['seq_len']} x {row['batch']} {row['variant']}: {row['tokens_per_s']:.0f} tokens/s, "
                     f"MFU {100 * row['mfu']:.1f}%{target}{vs}")
if ("bf16", "budgetlm+compile") in tps and ("bf16", "hf+compile") in tps:
    lines.append(f"- bf16 compiled against compiled: budgetlm {tps[('bf16', 'budgetlm+compile')] / tps[('bf16', 'hf+compile')]:.2f}x "
                 "HF's tokens/s (separate processes, not interleaved)")
m = load("plan_memory.json")
if m:
    lines.append(f"- memory estimate vs measured peak ({m['method'].split(':')[0]}): worst {m['worst_error']:+.1%} "
                 f"(target 15%: {'met' if m['all_within_target'] else 'NOT met'})")
    for row in m["rows"]:
        lines.append(f"  - {row['config']}: measured {row['measured_tensor_peak'] / 2**20:.0f} MiB, estimate {row['estimate'] / 2**20:.0f} MiB ({row['error']:+.1%})")
else:
    lines.append("- memory: no result (see memory.log)")
prof = load("step_profile.json")
if prof:
    top = ", ".join(f"{r['name'][:40]} {r['us_per_step'] / 1000:.1f} ms" for r in prof["rows"][:3])
    lines.append(f"- compiled bf16 step under the profiler ({prof['step_ms']:.0f} ms a step): GPU time "
                 + ", ".join(f"{k} {v:.0%}" for k, v in sorted(prof["shares"].items(), key=lambda kv: -kv[1])) + f"; top kernels: {top}")
else:
    lines.append("- profile: no result (see profile.log)")
plan, report = load("pretrain_plan.json"), os.path.join(out, "pretrain_report.md")
if plan and os.path.exists(report):
    cells = (ln.strip().strip("|").split("|") for ln in open(report) if ln.startswith("| "))
    rows = {c[0].strip(): c[1].strip() for c in cells if len(c) == 2}
    m = plan.get("model", {})
    lines.append(f"- pretrain --budget with the defaults: {m.get('n_layer')} x {m.get('n_embd')}, vocabulary {plan.get('vocab_size')}, "
                 f"{plan.get('params', 0) / 1e6:.1f}M parameters, predicted {plan.get('tokens_per_s', 0):,.0f} tokens/s; trained "
                 f"{rows.get('tokens')} tokens in {rows.get('elapsed_s')} s, {rows.get('tokens_vs_plan')} of the plan's tokens; "
                 f"val bits/byte {rows.get('val_bpb')}")
else:
    lines.append("- pretrain: no result (see pretrain.log)")
lines += ["", "Sections:", "", "```", open(os.path.join(out, "sections.tsv")).read().rstrip(), "```"]
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "done in $(( $(date +%s) - START ))s; results in $OUT (summary.md, sections.tsv, *.log, *.json, *.md)"
cat "$STATUS"
