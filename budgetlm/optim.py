"""Parameter groups, AdamW and Muon, and the learning-rate and batch schedules as functions of progress.

Schedules take budget progress in [0, 1] (from `budgetlm.budget.Clock.progress`), never a step
count, so the decay ends exactly at the deadline whatever the throughput (Cramming, section 3).
The loop sets the rate itself before every optimizer step:

    set_lr(optimizer, lr_at(clock.progress(tokens, steps), cfg.train) * lr_scale)

where `lr_scale` is the loop's own factor after NaN rollbacks (1.0 normally).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from budgetlm.config import TrainConfig
from budgetlm.errors import UserError
from budgetlm.muon import Muon

SCHEDULES = ("one-cycle", "linear", "wsd", "cosine", "constant")

# Where the smallest batch of the ramp starts, as a fraction of the full batch (Cramming ramps
# its batch up over the first part of the budget; we start at 1/8).
BATCH_RAMP_START = 1 / 8


def _is_norm(module: nn.Module) -> bool:
    # Our own RMSNorm, torch's nn.RMSNorm/LayerNorm/GroupNorm and most third-party norms
    # follow the naming convention; a norm's gain must not be pulled toward zero.
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()


def _owned_by(model: nn.Module, kind) -> set[int]:
    """The ids of the parameters held directly by the modules for which `kind(module)` holds."""
    return {id(p) for m in model.modules() if kind(m) for p in m.parameters(recurse=False)}


def param_groups(model: nn.Module, weight_decay: float, *, decay_embeddings: bool = False) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed AdamW group.

    Decayed: matrices (ndim >= 2) of linear/attention/MLP layers. Not decayed: 1-D parameters
    (biases, norm gains), anything owned by a normalisation module, and embedding tables.

    Embeddings are not decayed by default: OLMo 2 (Team OLMo 2024, "2 OLMo 2 Furious", section
    3) removed weight decay from embeddings for stability, and nanochat's AdamW groups for the
    embedding and unembedding use weight decay 0. nanoGPT does decay them (every 2-D tensor);
    pass `decay_embeddings=True` for that. With tied input/output embeddings the shared matrix
    is owned by an `nn.Embedding` and follows the embedding rule whichever name sees it first.

    Shared (tied) parameters appear once; frozen parameters (requires_grad=False) are left out.
    """
    embedding_ids = _owned_by(model, lambda m: isinstance(m, nn.Embedding))
    norm_ids = _owned_by(model, lambda m: not isinstance(m, nn.Embedding) and _is_norm(m))
    decay, no_decay = [], []
    seen = set()
    for _, p in model.named_parameters():  # named_parameters() already drops duplicates
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or id(p) in norm_ids or (id(p) in embedding_ids and not decay_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def is_output_head(name: str) -> bool:
    """The output projection to the vocabulary (`Transformer.output`, under any wrapper's prefix)."""
    return name == "output.weight" or (name.endswith(".output.weight") and "layers." not in name)


def with_lr_ratios(model: nn.Module, groups: list[dict], cfg: TrainConfig) -> list[dict]:
    """`groups` with the token embedding and the output head split off at their own rate: train.lr
    times `embedding_lr_ratio` / `head_lr_ratio`. The ratio stays in the group ("lr_ratio"), where
    `set_lr` applies it to the scheduled rate. At ratios of 1 the groups stay as they are, so
    checkpoints of runs that never split them resume.

    Why: nanochat and modded-nanogpt train the embedding at 10-50x the head's rate, and on
    budgetlm's small CPU models 3-5x `train.lr` scored 0.025 bits per byte better at equal steps
    than 1x (bench/results/embedding_lr.md); an embedding row only learns where its token occurs."""
    ratios = {"embedding": cfg.embedding_lr_ratio, "head": cfg.head_lr_ratio}
    if all(r == 1.0 for r in ratios.values()):
        return groups
    if cfg.head_lr_ratio != 1.0 and getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        raise UserError("train.head_lr_ratio needs an output head of its own (model.tie_embeddings=false); tied, it is the embedding")
    embedding_ids = _owned_by(model, lambda m: isinstance(m, nn.Embedding))
    role = {}
    for n, p in model.named_parameters():
        if id(p) in embedding_ids or is_output_head(n):
            role.setdefault(id(p), "embedding" if id(p) in embedding_ids else "head")
    out = []
    for g in groups:
        for name, ratio in ratios.items():
            mine = [p for p in g["params"] if role.get(id(p)) == name]
            if mine and ratio != 1.0:
                out.append({**g, "params": mine, "lr": cfg.lr * ratio, "lr_ratio": ratio})
        rest = [p for p in g["params"] if ratios.get(role.get(id(p), ""), 1.0) == 1.0]
        if rest:
            out.append({**g, "params": rest})
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` names, with every group's initial lr at the peak `cfg.lr`.

    adamw: AdamW over `param_groups(model, cfg.weight_decay)`. The fused kernel is used on CUDA
    and CPU: on torch 2.13 with 2 CPU cores it steps ~6-10x faster than foreach or the
    per-parameter loop (17 512x512 matrices plus an 8192x512 embedding: 4 ms fused, 25-54 ms
    foreach, 37-67 ms loop). Elsewhere (mps, xla, ...) foreach.

    muon: see `build_muon`.

    adamw8bit: torchao's AdamW8bit, the same update with both moments stored in 8 bits
    (block-wise quantised, Dettmers et al. 2022): the optimizer state shrinks from 8 to about
    2 bytes per parameter, a memory saver for the largest model a device can hold.
    """
    if cfg.optimizer == "muon":
        return build_muon(model, cfg, device_type)
    groups = with_lr_ratios(model, param_groups(model, cfg.weight_decay), cfg)
    if not groups:
        raise UserError("the model has no trainable parameters")
    if cfg.optimizer == "adamw8bit":
        try:
            from torchao.optim import AdamW8bit
        except ImportError:
            raise UserError("train.optimizer=adamw8bit needs torchao (pip install torchao)") from None
        return AdamW8bit(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    return _adamw(groups, cfg, device_type)


def _adamw(groups: list[dict], cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if device_type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except RuntimeError:
            pass  # a dtype/device the fused kernel does not cover: fall back below
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """The 2-D weights inside the Transformer blocks: what Muon orthogonalises. Embeddings and the
    output head are not hidden matrices (Jordan et al. 2024 keep them on AdamW: an embedding's rows
    are looked up one at a time, and the head's update is better left per-class)."""
    return p.ndim == 2 and name.startswith("layers.")


def build_muon(model: nn.Module, cfg: TrainConfig, device_type: str) -> HybridOptimizer:
    """Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers") for the hidden matrices,
    AdamW for embeddings, head and gains, stepping together as one optimizer.

    Muon takes SGD-momentum (Nesterov) updates and replaces each matrix update by its nearest
    semi-orthogonal matrix (5 Newton-Schulz iterations). Its update is scaled to match AdamW's
    RMS (0.2 sqrt(max(fan_in, fan_out)); Liu et al. 2025, "Muon is Scalable for LLM Training"),
    so both groups share one learning rate and one weight decay, and the rules that set AdamW's
    rate set this one. `budgetlm.muon.Muon` does the update: `torch.optim.Muon`'s, batched by shape.
    """
    hidden = [p for n, p in model.named_parameters() if p.requires_grad and is_hidden_matrix(n, p)]
    if any(hasattr(p, "device_mesh") for p in hidden):
        raise UserError("train.optimizer=muon needs whole matrices on each rank; with FSDP2 or tensor parallelism use train.optimizer=adamw")
    hidden_ids = {id(p) for p in hidden}
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in hidden_ids]} for g in param_groups(model, cfg.weight_decay)]
    rest = with_lr_ratios(model, [g for g in rest if g["params"]], cfg)
    optimizers = []
    if rest:
        optimizers.append(_adamw(rest, cfg, device_type))
    if hidden:
        optimizers.append(
            Muon(
                hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum, nesterov=True,
                adjust_lr_fn="match_rms_adamw", ns_dtype=newton_schulz_dtype(cfg.precision, device_type),
            )  # fmt: skip
        )
    if not optimizers:
        raise UserError("the model has no trainable parameters")
    return HybridOptimizer(optimizers)


def newton_schulz_dtype(precision: str, device_type: str) -> torch.dtype:
    """What Muon's Newton-Schulz iterations run in: bf16 (as `torch.optim.Muon`) on GPUs with bf16 and on
    CPUs that train in bf16, which are the ones whose bf16 matmuls are fast; fp32 on CPUs that train in
    fp32. Without bf16 matrix instructions, bf16 is emulated: on one core of an Intel Xeon (torch 2.13)
    the iterations of a 2 x 128 model's eight 128 x 128 matrices took 18.9 ms in bf16 and 7.8 in fp32."""
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


class HybridOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, seen as one: `param_groups` are the children's
    own group dicts (so setting a group's lr reaches the child), `step`/`zero_grad` call each
    child, and the state dict is one flat `{"state", "param_groups"}` with parameters numbered
    across the children in order, the layout `torch.optim.Optimizer.state_dict` uses, so
    checkpoints and their checks treat it like any optimizer."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        self.defaults = {}
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for o in self.optimizers:
            sd = o.state_dict()
            state.update({i + offset: s for i, s in sd["state"].items()})
            groups += [{**g, "params": [i + offset for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in o.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the state has {len(groups)} parameter groups, this optimizer {len(self.param_groups)}")
        start = 0
        for o in self.optimizers:
            # a child maps the saved ids (indices, or names from torch.distributed.checkpoint.state_dict)
            # to its parameters by their position in its groups, so its share of ids is all it needs
            mine = groups[start : start + len(o.param_groups)]
            ids = {i for g in mine for i in g["params"]}
            o.load_state_dict({"state": {i: s for i, s in state_dict["state"].items() if i in ids}, "param_groups": mine})
            start += len(o.param_groups)

    def __repr__(self) -> str:
        return f"HybridOptimizer({', '.join(type(o).__name__ for o in self.optimizers)})"


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group: `lr` times the group's own ratio (see
    `with_lr_ratios`), in place where it is a tensor, as torchao's 8-bit AdamW keeps it, which
    refuses a float in its place."""
    for group in optimizer.param_groups:
        group_lr = lr * group.get("lr_ratio", 1.0)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(group_lr)
        else:
            group["lr"] = group_lr


def check_schedule(cfg: TrainConfig) -> None:
    """Raise UserError for schedule settings that cannot describe a schedule."""
    for key in ("embedding_lr_ratio", "head_lr_ratio"):
        if not (math.isfinite(getattr(cfg, key)) and getattr(cfg, key) > 0):
            raise UserError(f"train.{key} must be a positive number (got {getattr(cfg, key)})")
    if cfg.schedule not in SCHEDULES:
        raise UserError(f"train.schedule '{cfg.schedule}' is not one of {', '.join(SCHEDULES)}")
    if not 0.0 <= cfg.warmup < 1.0:
        raise UserError(f"train.warmup must be a fraction of the budget in [0, 1), got {cfg.warmup}")
    if not 0.0 <= cfg.cooldown <= 1.0:
        raise UserError(f"train.cooldown must be a fraction of the budget in [0, 1], got {cfg.cooldown}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise UserError(f"train.min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if not 0.0 <= cfg.batch_ramp <= 1.0:
        raise UserError(f"train.batch_ramp must be a fraction of the budget in [0, 1], got {cfg.batch_ramp}")


def lr_multiplier(progress: float, cfg: TrainConfig) -> float:
    """The schedule's factor on the peak learning rate at `progress` in [0, 1].

    Every schedule warms up linearly from 0 at progress 0 to 1 at `warmup`, then:
    - linear: straight down to `min_lr_ratio` at progress 1.
    - one-cycle: the same triangle, meant with a long warm-up (Cramming's `budget-triangle2`
      peaks at 75% of the budget; our bert-24h recipe sets warmup 0.75). Cramming's starts at
      25% of the peak instead of 0.
    - wsd (warmup-stable-decay, Hu et al. 2024 "MiniCPM"; Hägele et al. 2024): flat at 1, then
      linear down to `min_lr_ratio` over the last `cooldown` of the budget (the decay starts at
      warm-up end if the two overlap). Linear rather than MiniCPM's exponential decay, so it
      reaches the minimum exactly at the deadline.
    - cosine: half a cosine from 1 to `min_lr_ratio` between warm-up end and progress 1.
    - constant: flat at 1 (min_lr_ratio unused).
    Progress outside [0, 1] is clamped, so the decaying schedules hold their minimum after 1.
    """
    check_schedule(cfg)
    p = min(1.0, max(0.0, float(progress)))
    w, lo = cfg.warmup, cfg.min_lr_ratio
    if p < w:
        return p / w
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule in ("linear", "one-cycle"):
        decay_start = w
    elif cfg.schedule == "wsd":
        decay_start = max(w, 1.0 - cfg.cooldown)
        if p < decay_start:
            return 1.0
    else:  # cosine
        t = (p - w) / (1.0 - w)
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * t))
    if decay_start >= 1.0:  # wsd with cooldown 0: no decay
        return 1.0
    t = (p - decay_start) / (1.0 - decay_start)
    return 1.0 - (1.0 - lo) * t


def lr_at(progress: float, cfg: TrainConfig, extension: dict | None = None) -> float:
    """The absolute learning rate at `progress`: `cfg.lr * lr_multiplier(progress, cfg)`, or the
    continued schedule of an extended run (`extended_multiplier`) when `extension` is given."""
    if extension:
        return cfg.lr * extended_multiplier(progress, cfg, extension["progress"], extension["multiplier"])
    return cfg.lr * lr_multiplier(progress, cfg)


def extended_multiplier(progress: float, cfg: TrainConfig, start: float, start_multiplier: float) -> float:
    """The schedule of a run given a new budget at `start` (its progress under the new budget),
    where it last trained at `start_multiplier` of the peak: re-warm, then decay again.

    The stretch from `start` to the new deadline runs the configured schedule as a budget of its
    own, except that its warm-up climbs from `start_multiplier` instead of 0: linearly back to
    the peak over the first `warmup` of the stretch, then flat and/or decaying as the schedule
    says, reaching `min_lr_ratio` exactly at the new deadline. For warmup-stable-decay this is
    MiniCPM's continuation (Hu et al. 2024): a run stopped in its stable phase (multiplier 1)
    stays at the peak and decays before the new deadline; a finished run (at its minimum)
    re-warms and re-decays, which continued-pretraining studies found better than carrying on
    at the small final rate (Gupta et al. 2023, "Continual Pre-Training of Large Language
    Models: How to (re)warm your model?"; Ibrahim et al. 2024, "Simple and Scalable Strategies
    to Continually Pre-train Large Language Models"). Stretching the old schedule instead
    (nanochat's resume with a larger `num_iterations`) makes the rate jump at the resume point.
    """
    p = min(1.0, max(0.0, float(progress)))
    if start >= 1.0:
        return lr_multiplier(1.0, cfg)
    q = max(0.0, (p - start) / (1.0 - start))  # progress through the extension
    if cfg.warmup > 0 and q < cfg.warmup:
        return start_multiplier + (1.0 - start_multiplier) * q / cfg.warmup
    return lr_multiplier(q, cfg)


def ramp_progress(progress: float, extension: dict | None) -> float:
    """The progress the batch ramp and sequence warm-up follow: after an extension they never go
    back (a finished run keeps its full batch and context); a run stopped mid-ramp continues its
    ramp over the extension from where it stood."""
    if not extension:
        return progress
    start = extension["progress"]
    q = max(0.0, (progress - start) / (1.0 - start)) if start < 1.0 else 1.0
    return max(q, float(extension.get("ramp_progress", 1.0)))


def batch_size_at(progress: float, cfg: TrainConfig, full: int, unit: int = 1) -> int:
    """The batch to use at `progress` under the optional batch ramp, in the units of `full`.

    With `cfg.batch_ramp` = r > 0 the batch grows linearly from `full / 8` at progress 0 to
    `full` at progress r and stays there. It is rounded down to a whole number of `unit`s and
    is never below one unit, so pass `full` = global batch in sequences and `unit` =
    micro-batch x world size: the result divided by `unit` is the number of gradient
    accumulation steps (a ramp cannot go below one micro-batch per rank). `full` must be a
    multiple of `unit`. Returns `full` when the ramp is off.
    """
    if unit < 1 or full < unit or full % unit:
        raise ValueError(f"full batch {full} must be a positive multiple of the unit {unit}")
    check_schedule(cfg)
    r = cfg.batch_ramp
    p = min(1.0, max(0.0, float(progress)))
    if r <= 0.0 or p >= r:
        return full
    start = full * BATCH_RAMP_START
    size = start + (full - start) * (p / r)
    return max(unit, min(full, int(size // unit) * unit))
