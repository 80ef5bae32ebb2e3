"""The right model for the budget: what `pretrain` trains when the user does not say, and why.

One complexity knob, as in nanochat: the depth d. A depth-d model is d blocks of width 64 d
with 64-wide heads (d = 12 is GPT-2 small's 12 x 768); its context, vocabulary, batch and
learning rate follow from it and from the compute the budget buys. For a wall-clock budget the
depth is chosen by *measurement*: each candidate is timed on this device for a few real steps
(`budgetlm.speed`, cached per machine), which gives the tokens it would see in the budget, and a
scaling law turns (parameters, tokens) into a predicted loss; the lowest wins. Timing matters
most where the papers never looked: a 0.5M-parameter model on a CPU is bound by per-operation
overhead, so halving it buys far fewer than twice the tokens, and a FLOP count would choose a
model much too small.

Every rule, with its source, lands in the run's report and in `budgetlm plan`:
- loss(N, D) = E + A / N^alpha + B / D^beta with Chinchilla's constants (Hoffmann et al. 2022,
  approach 3: E 1.69, A 406.4, B 410.7, alpha 0.34, beta 0.28; D tokens), which rank the depths
  the way this project measured them. N counts the parameters every token multiplies by, the head
  included, but not the lookup tables (`scaling_params`), which are most of a model this small.
- repeated data: where the training text is known, tokens beyond one pass over it and parameters
  beyond the size the text supports count less, as Muennighoff et al. 2023 ("Scaling
  Data-Constrained Language Models") fit (D and N replaced by their effective counts, decay
  constants 15.4 and 5.3). The supported size is the text's tokens over TEXT_TOKENS_PER_PARAM,
  5 (measured here), not Chinchilla's 20, which rejected the better model at 90 s on a CPU. A
  fast device and a small corpus otherwise choose a model that memorises the text: on an H200
  at 60 s on Shakespeare, 24.4M parameters for 14 passes.
- compile: a GPU always compiles, on the clock (seconds and speed-up measured on an H200); a CPU
  compiles where the speed-up pays for the compile time.
- vocabulary: Tao et al. 2024 ("Scaling Laws with Vocabulary") find the optimal vocabulary
  parameters grow as the non-vocabulary parameters to the power 0.83; with width growing as
  N_nv^(1/3) in this family that is V proportional to N_nv^0.5, anchored at this project's
  measurement (`bench/results/quality.md`), and at least 2048, which beat the rule's 1024 at depth 1.
- batch and learning rate: the compute power laws of DeepSeek LLM (DeepSeek-AI 2024, section
  3.1: B_opt proportional to C^0.327, eta_opt to C^-0.125), with the constants refitted to this
  project's measured optimum at 90 seconds on a CPU; they land on GPT-2 small's 6e-4 at a GPU day.
- context: the next power of two at or above the width, 128 to 2048 (GPT-2 small: 768 -> 1024;
  nanochat d20: 1280 -> 2048); short runs cannot use long contexts and pay for them in attention.
- schedule: warm-up, then linear decay to zero at the deadline, or at the data limit where that
  comes first (Hägele et al. 2024; Bergsma et al. 2025, "Straight to Zero"), driven by budget progress.
- optimizer and architecture: what this project measured to be best at equal wall clock.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from budgetlm.budget import Budget, parse_budget
from budgetlm.config import BudgetConfig, ModelConfig, RunConfig, TrainConfig
from budgetlm.errors import UserError
from budgetlm.memory import count_params
from budgetlm.model import padded_vocab_size

ASPECT = 64  # width per layer: nanochat's model_dim = 64 x depth
HEAD_DIM = 64
MAX_DEPTH = 40
# context: the next power of two at or above the width (GPT-2 small 768 -> 1024), at least MIN_SEQ. On one
# Xeon core, 2 x 128 at 20 minutes scored 1.864 bits per byte with a 256-token context against 1.874 with
# 128, in 3% fewer tokens (bench/results/quality_xeon.md): the narrowest models' attention is cheap, and
# held-out text is read in windows of the context, so a longer one gives every token more to go on
MIN_SEQ, MAX_SEQ = 256, 2048
# Hoffmann et al. 2022 ("Chinchilla"), approach 3: L = E + A / N^alpha + B / D^beta. Measured here at 90 s
# on a CPU (bench/results/quality.md): depth 1 / 2 / 3 reached 2.29 / 2.16 / 2.31 bits per byte; these
# constants rank them the same way, while the replication's (Besiroglu et al. 2024: 1.82, 482, 2085,
# 0.348, 0.366) weighs data more and picks depth 1.
LOSS_E, LOSS_A, LOSS_B, LOSS_ALPHA, LOSS_BETA = 1.69, 406.4, 410.7, 0.34, 0.28
CHINCHILLA_TOKENS_PER_PARAM = 20  # for token and step budgets, where no clock trades size for speed
# Muennighoff et al. 2023 ("Scaling Data-Constrained Language Models", eq. 5): a token seen again is worth
# less, and so is a parameter beyond the size the data supports (TEXT_TOKENS_PER_PARAM); each decays with its constant
REPEAT_TOKENS_STAR, REPEAT_PARAMS_STAR = 15.4, 5.3
# The size a text supports, from which Muennighoff et al.'s parameter discount starts: its tokens over this.
# They take the compute-optimal size (Chinchilla's 20 tokens per parameter), which on one core of this
# project's EPYC chose the worse of two measured depths at 90 s on both corpora and at 20 minutes: at 90 s, 2 x 128
# (0.95M parameters counted, 1.5M tokens) scored 2.091 bits per byte on Shakespeare and 1.286 on Django's
# docs against 2.170 and 1.428 for the planned 1 x 64 (5.4-5.7M tokens), yet 20 counts its parameters as
# 0.72M and 0.46M. At 5 the plan picks 2 x 128 there, still picks it over 3 x 192 at 5 minutes, where 3 x 192
# scored 0.07 worse, and picks 3 x 192 at 20 minutes on Shakespeare, which scored 1.762-1.774 against 1.832
# for 2 x 128; 2 to 5 rank every measured pair right, 7 and up miss the last (bench/results/plan_fit.md).
TEXT_TOKENS_PER_PARAM = 5
# Past some number of passes over the training text held-out loss rises, the sooner the more parameters
# per token of text. This project's runs on 0.7 MB of Shakespeare (bench/results/data_limited.md) bottomed
# at 17.5 passes with 0.8 parameters per token, 4.1 with 4.6 and 2.4 with 15.4 (then 0.8 bits/byte worse at
# 12.6 passes with 4.6): a least-squares power law through the three, PASSES_K x (tokens / parameters)^PASSES_EXP,
# at most MAX_PASSES, where Muennighoff et al.'s repeated tokens are worth little (R* = 15.4).
PASSES_K, PASSES_EXP, MAX_PASSES = 14.0, 0.68, 16.0
# vocabulary: V = VOCAB_ANCHOR x sqrt(N_nv / VOCAB_ANCHOR_NNV), rounded to a power of two, at least MIN_VOCAB.
# Below the anchor the rule undershoots: there a token's bytes matter more than its embedding's cost. On one
# EPYC core 1 x 64 (N_nv 50K, where the rule says 1024) scored better at 2048 on both corpora, at 60 s 2.137
# against 2.199 bits per byte on Shakespeare and 1.367 against 1.455 on Django's docs, at 90 s 1.327 against
# 1.428 on Django's docs (bench/results/quality.md)
VOCAB_ANCHOR, VOCAB_ANCHOR_NNV = 2048, 426_000
MIN_VOCAB, MAX_VOCAB = 2048, 65536
# batch tokens = BATCH_K x C^0.3271 and lr = LR_K x C^-0.125 (DeepSeek's exponents; C in FLOPs)
BATCH_K, BATCH_EXP = 0.125, 0.3271
LR_K, LR_EXP = 0.165, -0.125  # AdamW
MUON_LR_K = 0.62  # Muon (RMS-matched): 1.6e-2 at 90 s on a CPU, where 8e-3 and 3.2e-2 did worse without QK-norm
CPU_MICRO_TOKENS = 8192  # one forward of this many tokens keeps a CPU busy without swapping
GPU_MICRO_TOKENS = 16384
MEMORY_HEADROOM = 0.9  # of a device's memory the estimate may fill (fragmentation, the framework, data)
ASSUMED_GPU_MFU = 0.40  # for planning a GPU that is not here: public single-GPU PyTorch anchors sit near 40%
# the architecture and optimizer measured best at equal wall clock (bench/results/defaults_ab.md; value embeddings and smear:
# bench/results/token_features.md)
DEFAULT_ARCH = {"mlp": "swiglu", "zero_init_residual": False, "qk_norm": True, "tie_embeddings": False, "value_embeddings": "all", "smear": True}
# value embeddings (in every block: 2 x 128 scored better with one in each of its two blocks than in the last only) and the
# smear, up to the depth where they paid at equal wall clock. At depth 3 they gained 0.030 bits per byte at equal steps but
# nothing at 20 minutes of wall clock (1.7728 with, 1.7737 without), so deeper models, whose tables would be a larger
# share of the parameters (an 11 x 704 model at vocabulary 32768 would carry 138M in nanochat's layout), go without
TOKEN_FEATURES_MAX_DEPTH = 2
TOKEN_FEATURES_OFF = {"value_embeddings": "none", "smear": False}
ARCH_EVIDENCE = "measured best at equal wall clock (bench/results/defaults_ab.md)"
TOKEN_FEATURES_EVIDENCE = "measured at depths 1-2, at equal steps and at equal wall clock (bench/results/token_features.md)"
DEFAULT_OPTIMIZER = "muon"
# with Muon, the token embedding's AdamW rate as a multiple of train.lr: 2 x 128 at the 20-minute CPU settings, 600 steps,
# scored 1.998 bits per byte at 3x and 2.002 at 5x, against 2.026 at 1x and 2.012-2.014 at 10-20x (bench/results/embedding_lr.md)
MUON_EMBEDDING_LR_RATIO = 3.0
WARMUP = 0.02
EVAL_SHARE = 0.03  # of the budget spent on periodic evaluation
# torch.compile on a CPU, the model and its loss as one graph. Measured on one core of this project's
# EPYC (torch 2.13, an empty inductor cache, bf16, bench/train_speed.py): 2 x 128 compiled in 33 s and
# then stepped 1.35x faster than eager, 3 x 192 31 s / 1.20x, 6 x 384 44 s / 1.24x, 8 x 512 60 s /
# 1.22x. (Before the eager step got its chunked loss and cheaper attention, the first three gained
# 1.72x, 1.41x and 1.16x.) The compile runs on the clock, so it is chosen only where it buys
# COMPILE_MIN_GAIN more tokens: in bf16 from about 5 minutes at width 128, 10 minutes at 192; in fp32,
# where it gains less (see cpu_compile_speedup), from about an hour at width 128 and not at 384 and up.
CPU_COMPILE_BASE_S, CPU_COMPILE_PER_LAYER_S = 33.0, 5.0
# torch.compile on a GPU, always on: measured on an H200 (torch 2.11, bench/results/gpu/notes.md), the first
# step came 17 s into a 60 s run of a 7-layer model and 22 s into timing a 12-layer one; the compiled
# training loop then ran 1.55x the eager step the plan times (1.18M against 763K tokens/s at 24.4M).
GPU_COMPILE_BASE_S, GPU_COMPILE_PER_LAYER_S = 10.0, 1.0
GPU_COMPILE_SPEEDUP = 1.55
COMPILE_MIN_GAIN = 1.15
EVAL_TOKENS_SHORT = 32768  # held-out tokens per evaluation for runs of under 20M tokens


@dataclass
class Reason:
    key: str
    value: object
    rule: str


@dataclass(frozen=True)
class Corpus:
    """The prepared training text, so the plan can count how often a candidate would repeat it."""

    tokens: int  # training tokens at the prepared vocabulary
    vocab_size: int

    @classmethod
    def of(cls, data) -> Corpus:
        """From a `PreparedData` directory."""
        return cls(len(data.tokens("train")), data.vocab_size)

    def tokens_at(self, vocab_size: int) -> float:
        """Training tokens at a vocabulary derived from the prepared one (a smaller one cuts the text
        into more tokens). Bytes per token are taken to grow as ln V: on Shakespeare they are 2.72 at
        2048 and 3.33 at 8192, where ln V predicts 2.81."""
        if vocab_size >= self.vocab_size:
            return float(self.tokens)
        return self.tokens * math.log(self.vocab_size) / math.log(max(vocab_size, 2))


@dataclass
class Candidate:
    depth: int
    model: ModelConfig
    params: int  # as the size rules count them (`scaling_params`)
    flops_per_token: float
    tokens_per_s: float
    tokens: float
    loss: float
    compile: bool = False  # torch.compile pays for itself in this budget (CPU; always on for GPUs)


@dataclass
class Plan:
    budget: str
    device: str
    measured: bool
    model: dict
    train: dict
    vocab_size: int
    params: int
    non_embedding_params: int
    flops_per_token: float
    tokens_per_s: float
    tokens: float
    flops: float
    mfu: float | None
    micro_batch: int
    accumulation: int
    memory: dict = field(default_factory=dict)  # per device, bytes: {saver: {term: bytes}}
    device_memory: float = 0
    data_tokens: float = 0  # the training text at the chosen vocabulary (0 = no data given)
    data_limit: int = 0  # > 0: the text supports fewer tokens than the time buys; the run trains this many
    reasons: list[Reason] = field(default_factory=list)
    candidates: list[dict] = field(default_factory=list)
    cpu_wait: float = 0  # > 0: other work disturbed the timings; their threads waited this share of the time for a CPU
    speed_key: str = ""  # the chosen model's timing (`budgetlm.speed.timing_key`); "" where nothing was timed
    speed_calibration: float = 1.0  # tokens_per_s is its timed speed times this: what runs here sustained over their timings
    calibration_runs: int = 0  # how many runs that factor is the median ratio of
    calibration_same_model: bool = False  # runs of this model (else of others on this device)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# the rules


def next_pow2(x: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1.0, x))))


def nearest_pow2(x: float) -> int:
    return 1 << max(0, round(math.log2(max(1.0, x))))


def shape(depth: int) -> dict:
    width = ASPECT * depth
    return {"n_layer": depth, "n_embd": width, "n_head": max(1, width // HEAD_DIM), "seq_len": min(MAX_SEQ, max(MIN_SEQ, next_pow2(width)))}


def non_embedding_params(cfg: ModelConfig) -> int:
    """Block parameters (attention, feed-forward, norms) and the final norm: what the vocabulary rule scales with."""
    count = count_params(cfg)
    return count.blocks + count.other


def total_params(cfg: ModelConfig) -> int:
    return count_params(cfg).total


def scaling_params(cfg: ModelConfig) -> int:
    """The parameters the loss, pass and tokens-per-parameter rules count: all but the lookup tables, the
    token embedding (where the head has its own matrix) and the value embeddings. A lookup reads one row
    per token and is worth far less than a parameter every token multiplies by, as Kaplan et al. 2020
    found in leaving embeddings out of their size law; the head, a matmul, counts (as in Chinchilla's).
    At the sizes a CPU budget buys the tables are most of the model, and counted they chose the wrong
    depth: the value embeddings add 56% to 2 x 128 and 0.02 bits per byte at equal steps, and tipped 5
    minutes on this project's Xeon to 1 x 64 (2.129 bits per byte, where 2 x 128 scored 2.017); the
    token embedding, once the vocabulary floor rose to 2048, tipped 90 s on this project's EPYC to 1 x 64
    (1.327 on Django's docs, where 2 x 128 scored 1.286). Without both the measured depths rank as they
    scored whatever the text's supported size from 2 to 7 tokens per parameter (bench/results/plan_fit.md)."""
    count = count_params(cfg)
    return count.total - count.value_embeddings - (count.embedding if count.output else 0)


def flops_per_token(cfg: ModelConfig) -> float:
    """6 N (matmul parameters, the output projection included) + attention, as `Transformer.flops_per_token`."""
    matmul = non_embedding_params(cfg) + padded_vocab_size(cfg.vocab_size) * cfg.n_embd
    return 6 * matmul + 12 * cfg.n_layer * cfg.n_embd * cfg.seq_len


def sqrt_vocab(n_nv: int) -> int:
    """Tao et al.'s square-root rule alone, anchored here, before the floor and the cap."""
    return nearest_pow2(VOCAB_ANCHOR * math.sqrt(n_nv / VOCAB_ANCHOR_NNV))


def vocab_rule(n_nv: int) -> int:
    return min(MAX_VOCAB, max(MIN_VOCAB, sqrt_vocab(n_nv)))


def batch_rule(compute: float, seq_len: int) -> int:
    tokens = nearest_pow2(BATCH_K * compute**BATCH_EXP)
    return max(seq_len, tokens // seq_len * seq_len)


def lr_rule(compute: float, optimizer: str = "adamw") -> float:
    return float(f"{(MUON_LR_K if optimizer == 'muon' else LR_K) * compute**LR_EXP:.2g}")


def effective(unique: float, total: float, star: float) -> float:
    """Muennighoff et al.'s effective count: the first `unique` count fully, R = total / unique - 1
    repetitions add unique x star x (1 - exp(-R / star)), at most star x unique however many."""
    if unique <= 0 or total <= unique:
        return total
    return unique * (1 + star * (1 - math.exp(-(total / unique - 1) / star)))


def max_passes(params: float, unique_tokens: float) -> float:
    """The passes over `unique_tokens` of text after which a model of `params` stops gaining."""
    return min(MAX_PASSES, PASSES_K * (unique_tokens / params) ** PASSES_EXP)


def predicted_loss(params: float, tokens: float, unique_tokens: float = 0) -> float:
    """Chinchilla's loss; with `unique_tokens` (the training text, when it is known) repeated tokens and
    parameters beyond the size that text supports count as Muennighoff et al. 2023 find."""
    if unique_tokens:
        tokens = effective(unique_tokens, tokens, REPEAT_TOKENS_STAR)
        params = effective(unique_tokens / TEXT_TOKENS_PER_PARAM, params, REPEAT_PARAMS_STAR)
    return LOSS_E + LOSS_A / params**LOSS_ALPHA + LOSS_B / max(tokens, 1.0) ** LOSS_BETA


def cpu_compile_seconds(cfg: ModelConfig) -> float:
    return CPU_COMPILE_BASE_S + CPU_COMPILE_PER_LAYER_S * cfg.n_layer


def gpu_compile_seconds(cfg: ModelConfig) -> float:
    return GPU_COMPILE_BASE_S + GPU_COMPILE_PER_LAYER_S * cfg.n_layer


def cpu_compile_speedup(cfg: ModelConfig, precision: str = "bf16") -> float:
    """Compiled over eager step speed on a CPU: in bf16 about 1.22x from width 192 to 512 (fused
    elementwise work around the matmuls), more for the narrowest models, whose step is mostly such work.
    In fp32 the eager step has fewer casts to lose and its matmuls are the larger share: 1.17x at width
    128 (2 x 128 with Muon and QK-norm, batch 4096, on one core of an Intel Xeon), 1.16x, 1.10x, 1.05x and
    1.06x at widths 128, 192, 384 and 512 (bench/results/train_speed.md, the EPYC, AdamW)."""
    narrow = 128 / max(cfg.n_embd, 128)  # not extrapolated below the narrowest measured
    if precision == "fp32":
        return 1.05 + 0.12 * narrow**2
    return 1.22 + 0.13 * narrow**4


def have_cpp_compiler() -> bool:
    """What torch.compile's CPU backend needs: a C++ compiler and Python's headers (inductor builds
    extension modules)."""
    import os
    import shutil
    import sysconfig

    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return headers.is_file() and any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++", "c++") if c)


def micro_batch_for(batch_seqs: int, seq_len: int, device_type: str) -> int:
    """The largest divisor of the batch whose tokens stay under the device's micro-batch cap."""
    cap = CPU_MICRO_TOKENS if device_type != "cuda" else GPU_MICRO_TOKENS
    return next(d for d in range(batch_seqs, 0, -1) if batch_seqs % d == 0 and (d * seq_len <= cap or d == 1))


# ---------------------------------------------------------------------------------------------
# the search


class Planner:
    """Chooses the model for a budget on a device, timing candidates there (or, for a device that
    is not here, estimating their speed from its peak FLOP/s and a typical MFU)."""

    def __init__(
        self,
        device: torch.device | None,
        *,
        gpu_name: str = "",
        memory: float = 0,
        vocab_cap: int = 0,
        vocab_derivable: bool = True,
        corpus: Corpus | None = None,
        world_size: int = 1,
        log=None,
    ):
        self.device = device
        self.memory = memory or self._default_memory(device, gpu_name)  # bytes one device may use
        self.world_size = world_size  # data-parallel processes: each trains at the measured speed
        self.gpu_name = gpu_name
        self.vocab_cap = vocab_cap  # the prepared vocabulary: the largest a run can use (0 = unknown)
        self.vocab_derivable = vocab_derivable
        self.corpus = corpus  # the training text, where known: repeating it is worth less
        self.log = log or (lambda msg: None)
        self.device_type = device.type if device is not None else "cuda"
        self.measured = device is not None
        self.cpu_wait = 0.0  # the most a disturbed timing's threads waited for a CPU, as a share of their time

    @staticmethod
    def _default_memory(device, gpu_name: str) -> float:
        from budgetlm.hardware import device_memory, gpu_memory

        if device is not None:
            return device_memory(device)
        known = gpu_memory(gpu_name)
        if known is None:
            raise UserError(f"memory of GPU '{gpu_name}' unknown; pass --memory (e.g. --memory 24GB)")
        return known

    def fits(self, cfg: ModelConfig, micro: int, precision: str, optimizer: str, checkpointing: str = "none") -> bool:
        from budgetlm.memory import estimate_memory

        # GPUs always compile, and a compiled step keeps the plain loss; on a CPU the eager (chunked) loss is assumed
        est = estimate_memory(
            cfg, micro_batch=micro, precision=precision, optimizer=optimizer, activation_checkpointing=checkpointing,
            device_type=self.device_type, compiled=self.device_type == "cuda",
        )
        return est.total <= MEMORY_HEADROOM * self.memory

    def vocab_for(self, n_nv: int) -> int:
        v = vocab_rule(n_nv)
        if self.vocab_cap:
            v = self.vocab_cap if not self.vocab_derivable else min(v, self.vocab_cap)
        return v

    def candidate_model(self, depth: int, fixed: dict, arch: dict) -> ModelConfig:
        if fixed.get("n_layer", depth) > TOKEN_FEATURES_MAX_DEPTH:
            arch = {**arch, **{k: v for k, v in TOKEN_FEATURES_OFF.items() if k in arch}}
        cfg = ModelConfig(**{**shape(depth), **arch, **fixed})
        cfg.vocab_size = fixed.get("vocab_size") or self.vocab_for(non_embedding_params(dataclasses.replace(cfg, vocab_size=1)))
        return cfg

    def unique_tokens(self, cfg: ModelConfig) -> float:
        """The training text's tokens at `cfg`'s vocabulary; 0 where no data was given, or for a masked
        model (which learns from a fraction of the positions per pass: the passes rules were fit on
        causal ones)."""
        return self.corpus.tokens_at(cfg.vocab_size) if self.corpus and cfg.objective == "causal" else 0.0

    def data_cap(self, cfg: ModelConfig, params: float) -> float:
        """The most tokens `cfg` (of `params` parameters) should train on this text: `max_passes` over
        it; unbounded where the text is not known."""
        unique = self.unique_tokens(cfg)
        return max_passes(params, unique) * unique if unique else math.inf

    def tokens_per_s(self, cfg: ModelConfig, micro: int, precision: str, optimizer: str) -> float:
        if not self.measured:
            from budgetlm.hardware import gpu_peak_flops

            peak = gpu_peak_flops(self.gpu_name)
            if peak is None:
                raise UserError(f"no peak FLOP/s known for GPU '{self.gpu_name}'; plan on the machine itself with --device cuda")
            return self.world_size * peak * ASSUMED_GPU_MFU / flops_per_token(cfg)
        from budgetlm.speed import step_seconds

        while True:
            try:
                timing = step_seconds(cfg, micro, precision=precision, optimizer=optimizer, device=self.device)
                if not timing.clean:
                    if not self.cpu_wait:
                        self.log(f"  note: {contention_note(timing.waited)}")
                    self.cpu_wait = max(self.cpu_wait, timing.waited)
                return self.world_size * micro * cfg.seq_len / timing.seconds
            except torch.OutOfMemoryError:
                if micro == 1:
                    return 0.0
                micro //= 2

    def probe_micro(self, cfg: ModelConfig) -> int:
        """Sequences per timing step: a full micro-batch for small models, fewer for large ones so
        that timing a candidate costs about a second on a CPU."""
        cap = (CPU_MICRO_TOKENS if self.device_type != "cuda" else GPU_MICRO_TOKENS) // cfg.seq_len
        if self.device_type == "cuda":
            return max(1, cap)
        step_flops = 1e10  # ~0.2 s on a 2-core CPU; at least 2048 tokens, so per-step overhead stays amortised as in training
        return int(max(1, 2048 // cfg.seq_len, min(cap, step_flops // (flops_per_token(cfg) * cfg.seq_len))))

    def speed(self, cfg: ModelConfig, micro: int, precision: str, optimizer: str) -> tuple[float, str, dict]:
        """(tokens/s, precision, every precision's tokens/s). With precision "auto" on a CPU both fp32
        and bf16 autocast are timed and the faster wins, bf16 only by more than 5% since it changes the
        numerics. Which one wins depends on the CPU: with bf16 matrix units (AVX-512 BF16, AMX) bf16
        made 1.4x the tokens of fp32 already at 0.7M parameters on this project's EPYC; without them
        autocast only adds casts."""
        if precision != "auto" or self.device_type == "cuda" or not self.measured:
            p = precision if precision != "auto" else "bf16"
            tps = self.tokens_per_s(cfg, micro, p, optimizer)
            return tps, p, {p: tps}
        fp32, bf16 = (self.tokens_per_s(cfg, micro, p, optimizer) for p in ("fp32", "bf16"))
        return (bf16, "bf16", {"fp32": fp32, "bf16": bf16}) if bf16 > 1.05 * fp32 else (fp32, "fp32", {"fp32": fp32, "bf16": bf16})

    def compile_pays(self, cfg: ModelConfig, seconds: float, preference: str, precision: str) -> bool:
        """Whether to torch.compile: asked for ("true"), always on a GPU unless told not to, and on a CPU
        under "auto" where the compile time, spent on the clock, buys at least COMPILE_MIN_GAIN more
        tokens (causal models only: the masked objective's data-dependent shapes would recompile)."""
        if preference == "false":
            return False
        if preference == "true" or self.device_type == "cuda":  # GPUs compile unless told not to
            return True
        if cfg.objective != "causal" or self.world_size > 1 or not have_cpp_compiler():
            return False  # measured for one process only
        return (seconds - cpu_compile_seconds(cfg)) * cpu_compile_speedup(cfg, precision) >= COMPILE_MIN_GAIN * seconds

    def tokens_in(self, cfg: ModelConfig, tps: float, seconds: float, compiled: bool, precision: str) -> float:
        """Tokens trained in `seconds` at eager speed `tps`, compiled or not; the compile runs on the clock."""
        if not compiled:
            return tps * seconds
        compile_s = gpu_compile_seconds(cfg) if self.device_type == "cuda" else cpu_compile_seconds(cfg)
        return tps * self.compile_speedup(cfg, precision) * max(0.0, seconds - compile_s)

    def compile_speedup(self, cfg: ModelConfig, precision: str) -> float:
        """Compiled over timed speed; a GPU's speed from its datasheet is already a compiled step's."""
        if self.device_type == "cuda":
            return GPU_COMPILE_SPEEDUP if self.measured else 1.0
        return cpu_compile_speedup(cfg, precision)

    def search(self, seconds: float, fixed: dict, arch: dict, precision: str, optimizer: str, compile_pref: str = "auto") -> list[Candidate]:
        """Candidates by increasing depth until the predicted loss has risen twice in a row."""
        out: list[Candidate] = []
        rises = 0
        depths = [fixed["n_layer"]] if "n_layer" in fixed else range(1, MAX_DEPTH + 1)
        for depth in depths:
            cfg = self.candidate_model(depth, fixed, arch)
            fits = self.fits(cfg, 1, "bf16" if precision == "auto" else precision, optimizer, "full")
            if not fits and "n_layer" not in fixed:
                self.log(f"  depth {depth:2d}: does not fit in {self.memory / 1e9:.0f} GB even with activation checkpointing")
                break
            tps, run_precision = self.speed(cfg, self.probe_micro(cfg), precision, optimizer)[:2] if fits else (0.0, precision)
            if tps <= 0 and "n_layer" in fixed:  # the size asked for does not fit one device: estimate its speed
                tps = self.world_size * (peak_of(self) or 0) * ASSUMED_GPU_MFU / flops_per_token(cfg)
            if tps <= 0:
                break  # does not fit in memory: larger ones will not either
            n = scaling_params(cfg)
            compiled = self.compile_pays(cfg, seconds, compile_pref, run_precision)
            speedup = self.compile_speedup(cfg, run_precision)
            tokens = self.tokens_in(cfg, tps, seconds, compiled, run_precision)
            unique, cap = self.unique_tokens(cfg), self.data_cap(cfg, n)
            capped = tokens > cap  # the run would end when the data is used up, before the deadline
            if capped and compiled and compile_pref == "auto" and self.device_type != "cuda":  # compile only if it ends sooner
                compiled = cpu_compile_seconds(cfg) + cap / (tps * speedup) < cap / tps
            tokens = min(tokens, cap)
            c = Candidate(depth, cfg, n, flops_per_token(cfg), tps, tokens, predicted_loss(n, tokens, unique), compiled)
            speed = f"{tps:,.0f} tokens/s" + (f" eager, x{speedup:.2f} compiled" if compiled and self.measured else "")
            passes = f" ({tokens / unique:.1f} passes over the data{', its limit' if capped else ''})" if unique else ""
            size = total_params(cfg)  # shown whole; the rules count `n`
            self.log(f"  depth {depth:2d}: {size / 1e6:7.2f}M parameters, {speed}, {tokens / 1e6:,.1f}M tokens{passes}, predicted loss {c.loss:.3f}")
            best = min((x.loss for x in out), default=math.inf)
            rises = rises + 1 if c.loss > best else 0
            out.append(c)
            if rises >= 2 or c.loss > best + 0.1 * abs(best):  # past the optimum: larger ones only get worse
                break
        if not out:
            raise UserError("not even the smallest model fits on this device")
        return out


def peak_of(planner: Planner, precision: str = "bf16") -> float | None:
    """The device's peak FLOP/s: the datasheet's for a GPU that is not here, else measured in `precision`."""
    from budgetlm.hardware import gpu_peak_flops, peak_flops

    if planner.device is None:
        return gpu_peak_flops(planner.gpu_name)
    return peak_flops(planner.device, torch.bfloat16 if precision == "bf16" else torch.float32)[0]


def user_fixed(cfg: RunConfig, user_keys: set[str]) -> tuple[dict, dict]:
    """The model and train keys the user set (they win over every rule)."""
    model = {k: getattr(cfg.model, k) for k in ModelConfig.__dataclass_fields__ if f"model.{k}" in user_keys}
    train = {k: getattr(cfg.train, k) for k in TrainConfig.__dataclass_fields__ if f"train.{k}" in user_keys}
    if "n_embd" in model and "n_head" not in model:
        model["n_head"] = max(1, model["n_embd"] // HEAD_DIM)
    if "n_layer" in model and "n_embd" not in model:
        model.update({k: v for k, v in shape(model["n_layer"]).items() if k not in model})
    if cfg.parallel.tp > 1 or cfg.parallel.pp > 1 or cfg.model.objective == "masked":
        # data parallelism only; and measured on causal models only
        model = {**TOKEN_FEATURES_OFF, **model}
    return model, train


def make_plan(
    budget: Budget | str,
    planner: Planner,
    *,
    fixed_model: dict | None = None,
    fixed_train: dict | None = None,
    reserve: float = BudgetConfig.reserve,
    target_params: float = 0,
) -> Plan:
    """The configuration for `budget` on the planner's device; `fixed_*` are the user's own keys."""
    budget = parse_budget(budget) if isinstance(budget, str) else budget
    fixed_model, fixed_train = dict(fixed_model or {}), dict(fixed_train or {})
    arch = {k: v for k, v in DEFAULT_ARCH.items() if k not in fixed_model}
    optimizer = fixed_train.get("optimizer", DEFAULT_OPTIMIZER)
    precision = fixed_train.get("precision", "auto")
    reasons: list[Reason] = []

    if target_params:  # `plan --params N`: the depth whose size is nearest
        depth = min(range(1, MAX_DEPTH + 1), key=lambda d: abs(math.log(total_params(planner.candidate_model(d, fixed_model, arch)) / target_params)))
        fixed_model.setdefault("n_layer", depth)
        fixed_model.update({k: v for k, v in shape(depth).items() if k not in fixed_model})

    if budget.kind == "time":
        seconds = budget.limit * (1 - reserve - EVAL_SHARE)
        cands = planner.search(seconds, fixed_model, arch, precision, optimizer, fixed_train.get("compile", "auto"))
        best = min(cands, key=lambda c: c.loss)
        why = (
            f"lowest predicted loss of {len(cands)} depths timed on this device"
            if planner.measured
            else f"lowest predicted loss of {len(cands)} depths, speed estimated at {ASSUMED_GPU_MFU:.0%} MFU of {planner.gpu_name}'s peak"
        )
    else:
        cands = []
        depths = [fixed_model["n_layer"]] if "n_layer" in fixed_model else range(1, MAX_DEPTH + 1)
        models = [planner.candidate_model(d, fixed_model, arch) for d in depths]
        tokens, best_batch = budget.limit, fixed_train.get("batch_tokens", 2048)
        for _ in range(4):  # steps budgets: tokens depend on the batch, which depends on the model
            if budget.kind == "steps":
                tokens = budget.limit * best_batch
            best_model = min(models, key=lambda m: abs(math.log(tokens / scaling_params(m) / CHINCHILLA_TOKENS_PER_PARAM)))
            n = scaling_params(best_model)
            loss = predicted_loss(n, tokens, planner.unique_tokens(best_model))
            best = Candidate(best_model.n_layer, best_model, n, flops_per_token(best_model), 0.0, tokens, loss)
            cands = [best]
            best_batch = fixed_train.get("batch_tokens") or batch_rule(flops_per_token(best_model) * tokens, best_model.seq_len)
        why = f"about {CHINCHILLA_TOKENS_PER_PARAM} tokens per parameter (Hoffmann et al. 2022) for a {budget} budget"

    model = best.model
    compute = best.flops_per_token * best.tokens
    batch = fixed_train.get("batch_tokens") or batch_rule(compute, model.seq_len)
    lr = fixed_train.get("lr") or lr_rule(compute, optimizer)
    micro = micro_batch_for(max(1, batch // model.seq_len), model.seq_len, planner.device_type)
    prec_guess = precision if precision != "auto" else "bf16"
    while micro > 1 and not planner.fits(model, micro, prec_guess, optimizer):
        micro = max(d for d in range(1, micro) if (batch // model.seq_len) % d == 0)
    accum = max(1, batch // model.seq_len // micro)
    tps, run_precision, speeds = best.tokens_per_s, (precision if precision != "auto" else "bf16"), {}
    speed_key, calib = "", None
    if planner.measured and budget.kind == "time":  # the chosen one at its real micro-batch, as fast as runs here went against their timings
        from budgetlm.speed import calibration, timing_key

        tps, run_precision, speeds = planner.speed(model, micro, precision, optimizer)
        speed_key = timing_key(model, micro, precision=run_precision, optimizer=optimizer, device=planner.device)
        calib = calibration(planner.device, speed_key, planner.world_size)
        tps *= calib.factor
    elif precision == "auto" and planner.device_type != "cuda":
        run_precision = "fp32"
    if precision == "auto":
        measured = ", ".join(f"{k} {v:,.0f} tokens/s" for k, v in speeds.items())
        rule = f"the faster on this device ({measured})" if len(speeds) > 1 else "bf16 autocast on GPUs, fp32 on CPUs unless timed"
        reasons.append(Reason("train.precision", run_precision, rule))
    seconds_left = budget.limit * (1 - reserve - EVAL_SHARE)
    tokens = planner.tokens_in(model, tps, seconds_left, best.compile, run_precision) if budget.kind == "time" else best.tokens
    unique, cap, data_limit = planner.unique_tokens(model), planner.data_cap(model, best.params), 0
    if budget.kind == "time" and tokens > cap:
        data_limit = max(1, math.ceil(cap))  # the run ends there, before the deadline
        tokens = data_limit
    if best.compile:
        tps *= planner.compile_speedup(model, run_precision)  # what the compiled steps run at, once compiled

    for key in ("n_layer", "n_embd", "n_head"):
        if key not in fixed_model:
            family = f"depth {best.depth} of the one-knob family (width 64 x depth, 64-wide heads)"
            reasons.append(Reason(f"model.{key}", getattr(model, key), f"{family}: {why}"))
    if "seq_len" not in fixed_model:
        rule = f"the next power of two at or above the width, {MIN_SEQ}..{MAX_SEQ} (GPT-2 small 768 -> 1024; 256 measured better at width 128)"
        reasons.append(Reason("model.seq_len", model.seq_len, rule))
    if "vocab_size" not in fixed_model:
        n_nv = non_embedding_params(model)
        raw = vocab_rule(n_nv)
        rule = f"Tao et al. 2024: V grows as sqrt(non-embedding parameters), {VOCAB_ANCHOR} at {VOCAB_ANCHOR_NNV / 1e6:.2f}M (measured here)"
        if sqrt_vocab(n_nv) < MIN_VOCAB:
            rule += f"; at least {MIN_VOCAB}: smaller models scored better with it than with the rule's smaller one (measured here)"
        if planner.vocab_cap and model.vocab_size != raw:
            rule += f"; the rule says {raw}, the prepared data has {planner.vocab_cap}" + ("" if planner.vocab_derivable else " (not derivable)")
        reasons.append(Reason("model.vocab_size", model.vocab_size, rule))
    if unique:
        rule = (
            f"{tokens / unique:.1f} passes over the training text ({unique / 1e6:.3g}M tokens at this vocabulary): repeated tokens, "
            f"and parameters beyond {TEXT_TOKENS_PER_PARAM} tokens of it per parameter, count less in the predicted loss "
            "(Muennighoff et al. 2023; the ratio measured here)"
        )
        if data_limit:
            rule += (
                f"; the budget buys more, but past {max_passes(best.params, unique):.1f} passes (at {best.params / unique:.2g} parameters "
                f"per token of text) held-out loss rose in this project's runs: training stops after {data_limit:,} tokens"
            )
        reasons.append(Reason("data.passes", round(tokens / unique, 2), rule))
    if "batch_tokens" not in fixed_train:
        rule = f"{BATCH_K} x C^{BATCH_EXP} tokens for C = {compute:.2g} FLOPs (DeepSeek-AI 2024 exponent, constant fit here)"
        reasons.append(Reason("train.batch_tokens", batch, rule))
    if "lr" not in fixed_train:
        k = MUON_LR_K if optimizer == "muon" else LR_K
        rule = f"{k} x C^{LR_EXP} (DeepSeek-AI 2024 exponent; constant fit here for {optimizer}; AdamW's gives GPT-2 small's 6e-4 at a GPU day)"
        reasons.append(Reason("train.lr", lr, rule))
    train = {"batch_tokens": batch, "lr": lr, "optimizer": optimizer, "precision": run_precision}
    if optimizer == "muon" and not model.tie_embeddings and "embedding_lr_ratio" not in fixed_train:  # measured untied only
        train["embedding_lr_ratio"] = MUON_EMBEDDING_LR_RATIO
        rule = "the embedding's rows learn from sparse gradients: measured best at equal steps (bench/results/embedding_lr.md)"
        reasons.append(Reason("train.embedding_lr_ratio", MUON_EMBEDDING_LR_RATIO, rule))
    if best.compile and "compile" not in fixed_train and planner.device_type != "cuda":
        train["compile"] = "true"
        rule = (
            f"torch.compile on this CPU: about {cpu_compile_seconds(model):.0f} s to compile, on the clock, for "
            f"{cpu_compile_speedup(model, run_precision):.2f}x the eager speed in {run_precision} "
            "(fit to this project's measurements at widths 128-512)"
        )
        reasons.append(Reason("train.compile", "true", rule))
    if best.compile and planner.device_type == "cuda" and budget.kind == "time" and "compile" not in fixed_train:
        rule = f"GPUs compile: about {gpu_compile_seconds(model):.0f} s on the clock" + (
            f", then {GPU_COMPILE_SPEEDUP}x the eager step timed here (measured on an H200)" if planner.measured else ""
        )
        reasons.append(Reason("train.compile", "auto", rule))
    eval_tokens = fixed_train.get("eval_tokens", EVAL_TOKENS_SHORT if tokens < 20e6 else TrainConfig().eval_tokens)
    # a forward pass costs about a third of a training step: evaluate as often as EVAL_SHARE of the budget allows
    n_evals = max(2, min(10, int(EVAL_SHARE * 3 * tokens / max(eval_tokens, 1)))) if tps > 0 else 10
    for key, value, rule in (
        ("schedule", "linear", "linear decay to zero at the deadline, or the data limit (Hägele et al. 2024; Bergsma et al. 2025)"),
        ("min_lr_ratio", 0.0, "decay to zero"),
        ("warmup", WARMUP, "a short warm-up, as a fraction of the budget"),
        ("eval_tokens", eval_tokens, "held-out tokens per evaluation"),
        ("eval_every", round(1 / n_evals, 3), f"{n_evals} evaluations: the clock counts them, so they take about {EVAL_SHARE:.0%} of the budget"),
    ):
        train[key] = fixed_train.get(key, value)
        if key not in fixed_train:
            reasons.append(Reason(f"train.{key}", value, rule))
    if "optimizer" not in fixed_train:
        reasons.append(Reason("train.optimizer", optimizer, ARCH_EVIDENCE))
    for key in arch:
        evidence = TOKEN_FEATURES_EVIDENCE if key in TOKEN_FEATURES_OFF else ARCH_EVIDENCE
        if key in TOKEN_FEATURES_OFF and model.n_layer > TOKEN_FEATURES_MAX_DEPTH:
            evidence = (
                f"off beyond depth {TOKEN_FEATURES_MAX_DEPTH}: at depth 3 they gained nothing at equal wall clock "
                "(bench/results/token_features.md)"
            )
        reasons.append(Reason(f"model.{key}", getattr(model, key), evidence))
    train = {**train, **fixed_train}

    peak = peak_of(planner, run_precision)
    model_keys = {k: getattr(model, k) for k in ("n_layer", "n_embd", "n_head", "seq_len", *DEFAULT_ARCH)}
    compiled = best.compile or (planner.device_type == "cuda" and fixed_train.get("compile") != "false")
    memory = memory_table(model, micro, run_precision, optimizer, planner, compiled=compiled)
    return Plan(
        budget=str(budget),
        device=planner.gpu_name or (str(planner.device) if planner.device is not None else "?"),
        measured=planner.measured,
        model=model_keys,
        train=train,
        vocab_size=model.vocab_size,
        params=total_params(model),
        non_embedding_params=non_embedding_params(model),
        flops_per_token=flops_per_token(model),
        tokens_per_s=tps,
        tokens=tokens,
        flops=flops_per_token(model) * tokens,
        mfu=(tps * flops_per_token(model) / peak) if peak else None,
        micro_batch=micro,
        accumulation=accum,
        memory=memory,
        device_memory=planner.memory,
        data_tokens=unique,
        data_limit=data_limit,
        cpu_wait=round(planner.cpu_wait, 3),
        speed_key=speed_key,
        speed_calibration=round(calib.factor, 4) if calib else 1.0,
        calibration_runs=calib.runs if calib else 0,
        calibration_same_model=calib.same_model if calib else False,
        reasons=reasons,
        candidates=[
            {
                "depth": c.depth,
                "params": total_params(c.model),
                "vocab_size": c.model.vocab_size,
                "tokens_per_s": round(c.tokens_per_s),
                "tokens": round(c.tokens),
                "loss": round(c.loss, 4),
            }
            for c in cands
        ],
    )


def plan_from_dict(d: dict) -> Plan:
    return Plan(**{**d, "reasons": [Reason(**r) for r in d.get("reasons", [])]})


def memory_table(model: ModelConfig, micro: int, precision: str, optimizer: str, planner: Planner, compiled: bool = False) -> dict:
    """The estimate per device (`budgetlm.memory`) for the plan and for each memory saver alone."""
    from budgetlm.memory import estimate_memory

    variants = {
        "as planned": {},
        "activation checkpointing": {"activation_checkpointing": "full"},
        "8-bit AdamW": {"optimizer": "adamw8bit"},
        "CPU offload": {"cpu_offload": True},
    }
    out = {}
    for name, extra in variants.items():
        kw = {"micro_batch": micro, "precision": precision, "optimizer": optimizer, "device_type": planner.device_type, "compiled": compiled, **extra}
        est = estimate_memory(model, **kw)
        out[name] = {k: est.as_dict()[k] for k in ("weights", "gradients", "optimizer_state", "activations", "logits_loss", "total", "host")}
    if planner.world_size == 1 and out["as planned"]["total"] > MEMORY_HEADROOM * planner.memory:
        est = out["as planned"]["total"]
        out["layout"] = {"dp_shard": math.ceil(est / (MEMORY_HEADROOM * planner.memory))}  # FSDP2 over this many devices
    return out


def apply_plan(cfg: RunConfig, plan: Plan, keep_max_tokens: bool = False) -> None:
    """Write the plan's choices into `cfg` (the user's own keys are already in the plan; a
    budget.max_tokens the user set, `keep_max_tokens`, stays)."""
    for key, value in plan.model.items():
        setattr(cfg.model, key, value)
    for key, value in plan.train.items():
        setattr(cfg.train, key, value)
    if plan.data_limit and not keep_max_tokens:  # the schedule runs to the end of the useful passes, or the deadline if first
        cfg.budget.max_tokens = plan.data_limit


def contention_note(waited: float) -> str:
    return (
        f"other work shared the CPUs while candidates were timed (in the most disturbed timing, its threads waited {waited:.0%} "
        "of a step for one); those timings were retimed, corrected where they could be, and not cached, but the choice is surer "
        "on an idle machine"
    )


def format_plan(plan: Plan) -> str:
    m, t = plan.model, plan.train
    lines = [
        f"budget {plan.budget} on {plan.device} ({'speeds measured here' if plan.measured else 'speeds estimated'})",
        f"model   {m['n_layer']} layers x width {m['n_embd']}, {m['n_head']} heads, context {m['seq_len']}, vocabulary {plan.vocab_size:,}: "
        f"{plan.params / 1e6:.2f}M parameters ({plan.non_embedding_params / 1e6:.2f}M outside the embedding)",
        f"train   batch {t['batch_tokens']:,} tokens = {plan.accumulation} x {plan.micro_batch} sequences, lr {t['lr']:g} ({t['optimizer']}"
        + (f"; embedding x{t['embedding_lr_ratio']:g}" if t.get("embedding_lr_ratio", 1.0) != 1.0 else "")
        + f"), {t['schedule']} schedule, {t['precision']}",
        f"expect  {plan.tokens_per_s:,.0f} tokens/s, {plan.tokens / 1e6:,.1f}M tokens ({plan.tokens / plan.params:.1f} per parameter"
        + (f", {plan.tokens / plan.data_tokens:.1f} passes over the training text" if plan.data_tokens else "")
        + (", the most it supports: the run stops there" if plan.data_limit else "")
        + "), "
        f"{plan.flops:.2g} FLOPs" + (f", MFU {plan.mfu:.0%}" if plan.mfu else ""),
    ]
    if plan.memory:
        gb = lambda b: f"{b / 2**30:,.2f} GiB" if b >= 2**30 else f"{b / 2**20:,.0f} MiB"  # noqa: E731
        p = plan.memory["as planned"]
        lines.append(
            f"memory  {gb(p['total'])} per device of {gb(plan.device_memory)}: weights {gb(p['weights'])}, gradients {gb(p['gradients'])}, "
            f"optimizer {gb(p['optimizer_state'])}, activations {gb(p['activations'])}, logits and loss {gb(p['logits_loss'])} "
            f"(micro-batch {plan.micro_batch})"
        )
        savers = [f"{k} {gb(v['total'])}" for k, v in plan.memory.items() if k not in ("as planned", "layout")]
        lines.append(f"        with {', '.join(savers)}")
        if "layout" in plan.memory:
            lines.append(f"        does not fit one device: shard it with FSDP2 over {plan.memory['layout']['dp_shard']} devices (parallel.dp_shard)")
    if plan.calibration_runs:
        n, which = plan.calibration_runs, "this model" if plan.calibration_same_model else "any model"
        runs = f"the last {n} runs of {which} on this device" if n > 1 else f"the last run of {which} on this device"
        lines.append(f"        the timed speed x {plan.speed_calibration:.2f}: the median of what {runs} sustained over its timing")
    if plan.cpu_wait:
        lines.append(f"note    {contention_note(plan.cpu_wait)}")
    lines += ["why:", *[f"  {r.key} = {r.value}: {r.rule}" for r in plan.reasons]]
    if len(plan.candidates) > 1:
        lines.append("candidates (depth: parameters, tokens/s, tokens in the budget, predicted loss):")
        for c in plan.candidates:
            size = f"{c['params'] / 1e6:7.2f}M, vocab {c['vocab_size']:>6,}"
            lines.append(f"  {c['depth']:2d}: {size}, {c['tokens_per_s']:>10,} tok/s, {c['tokens'] / 1e6:9.1f}M tokens, {c['loss']:.3f}")
    return "\n".join(lines)


def parse_count(text: str) -> float:
    """'124M', '1.5B', '3e8', '500k' -> a number."""
    t = str(text).strip().upper()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(t[-1:], 1)
    try:
        return float(t[:-1] if scale != 1 else t) * scale
    except ValueError:
        raise UserError(f"cannot read '{text}' as a count (e.g. 124M, 1.5B, 3e8)") from None


def parse_bytes(text: str) -> float:
    """'24GB', '80G', '512MiB' -> bytes (decimal units; the i forms binary)."""
    t = str(text).strip().upper().replace(" ", "")
    for suffix, scale in (("GIB", 2**30), ("MIB", 2**20), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if t.endswith(suffix):
            try:
                return float(t[: -len(suffix)]) * scale
            except ValueError:
                break
    raise UserError(f"cannot read '{text}' as a memory size (e.g. 24GB, 80G, 512MiB)")


def plan_command(args) -> int:
    import json

    from budgetlm.config import PlanConfig, apply_overrides, override_keys
    from budgetlm.data.dataset import PreparedData
    from budgetlm.data.vocab import can_derive
    from budgetlm.flags import flag_overrides

    where = apply_overrides(PlanConfig(), flag_overrides(args))  # --set here means pretraining keys, below
    cfg = apply_overrides(RunConfig(), args.set or [])
    user_keys = override_keys(RunConfig, args.set or [])
    fixed_model, fixed_train = user_fixed(cfg, user_keys)
    budget = parse_budget(args.budget)
    vocab_cap, derivable, corpus = 0, True, None
    if where.data:
        data = PreparedData(where.data)
        vocab_cap, derivable, corpus = data.vocab_size, can_derive(data.tokenizer), Corpus.of(data)
    memory = parse_bytes(where.memory) if where.memory else 0
    if where.gpu:
        planner = Planner(None, gpu_name=where.gpu, memory=memory, vocab_cap=vocab_cap, vocab_derivable=derivable, corpus=corpus)
    else:
        if where.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU here; pass --gpu NAME to plan for one from its datasheet")
        device = torch.device(where.device if where.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        planner = Planner(device, memory=memory, vocab_cap=vocab_cap, vocab_derivable=derivable, corpus=corpus, log=None if args.json else _stderr)
    target = parse_count(where.params) if where.params else 0
    plan = make_plan(budget, planner, fixed_model=fixed_model, fixed_train=fixed_train, target_params=target)
    print(json.dumps(plan.to_dict()) if args.json else format_plan(plan))
    return 0


def _stderr(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr)
