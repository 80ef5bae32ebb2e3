"""Typed configuration: the single source of truth for every setting.

Each section is a dataclass whose fields carry their help text (shown by `--help`). A recipe
is a short YAML file holding only what differs from these defaults; command-line overrides
(`--set train.lr=3e-4` or `--train.lr 3e-4`) go on top. Unknown keys, wrong types and
contradictory settings raise `UserError` naming the key, so a typo never trains silently with
a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from budgetlm.errors import UserError
from budgetlm.files import write_text_atomic

RECIPES_DIR = Path(__file__).parent / "recipes"


def opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A config field with its help text (and allowed values) attached."""
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    objective: str = opt("causal", "causal (GPT/Llama-like) or masked (BERT-like, Cramming)", ("causal", "masked"))
    n_layer: int = opt(4, "number of Transformer blocks")
    n_head: int = opt(4, "attention heads")
    n_kv_head: int = opt(0, "key/value heads for grouped-query attention; 0 = n_head")
    n_embd: int = opt(256, "model width")
    ffn_hidden: int = opt(0, "feed-forward hidden size; 0 = 8/3 n_embd for gated MLPs, 4 n_embd otherwise (rounded to 64)")
    mlp: str = opt("swiglu", "feed-forward kind (relu2: squared ReLU, So et al. 2021, as in nanochat)", ("swiglu", "geglu", "gelu", "relu2"))
    norm: str = opt("rmsnorm", "normalisation layer (pre-norm)", ("rmsnorm", "layernorm"))
    norm_eps: float = opt(1e-5, "epsilon of the normalisation layers")
    vocab_size: int = opt(0, "vocabulary size; 0 = the tokenizer's, padded to a multiple of 64")
    seq_len: int = opt(256, "context length in tokens")
    rope_theta: float = opt(10000.0, "rotary position embedding base")
    tie_embeddings: bool = opt(True, "share the input embedding and output projection")
    qk_norm: bool = opt(False, "RMS-normalise queries and keys per head before attention")
    embed_norm: bool = opt(False, "normalise the token embeddings (model.norm kind) before the first block, as Cramming's crammed BERT")
    dropout: float = opt(0.0, "dropout on attention and residual branches")
    attention: str = opt(
        "auto",
        "attention kernel: sdpa (PyTorch's fused kernels), explicit (matmul, softmax, matmul: faster on CPUs for short contexts), "
        "auto (explicit on CPU in bf16/fp16 up to 512 keys, sdpa otherwise); the same math either way",
        ("auto", "sdpa", "explicit"),
    )
    init_std: float = opt(0.02, "standard deviation of the weight initialisation")
    zero_init_residual: bool = opt(False, "start the projections into the residual stream (attention.wo, feed_forward.w2) at zero")
    logit_softcap: float = opt(0.0, "squash the output logits into (-cap, cap) with cap * tanh(logits / cap) (Gemma 2: 30, nanochat: 15); 0 = off")
    layer_heads: list[int] = opt([], "query heads of each block (a structurally pruned model); [] = n_head in every block")
    layer_ffn: list[int] = opt([], "feed-forward hidden size of each block (a structurally pruned model); [] = the global size in every block")


@dataclass
class PrepareConfig:
    tokenizer: str = opt("bpe", "tokenizer to train: byte-level BPE (causal) or WordPiece (masked)", ("bpe", "wordpiece"))
    tokenizer_file: str = opt("", "reuse this tokenizer.json instead of training one (its kind and vocabulary win over tokenizer/vocab_size)")
    vocab_size: int = opt(0, "vocabulary size to train; 0 = chosen from the corpus size")
    lowercase: bool = opt(False, "lowercase all text")
    normalization: str = opt("NFC", "Unicode normal form applied to every document", ("NFC", "NFKC", "none"))
    text_field: str = opt("text", "field holding the text in .jsonl inputs")
    text_column: str = opt("text", "column (name or 0-based index) holding the text in .csv/.tsv/.parquet inputs")
    csv_header: bool = opt(True, "the first row of .csv/.tsv inputs holds column names")
    txt_document_chars: int = opt(16384, "cut .txt files into documents of about this many characters at blank lines; 0 = one per file")
    tokenizer_sample_bytes: int = opt(100_000_000, "train the tokenizer on about this many bytes sampled evenly from the corpus")
    val_fraction: float = opt(0.01, "fraction of documents held out for validation")
    min_val_documents: int = opt(1, "at least this many documents are held out")
    dedup: bool = opt(True, "drop exact duplicate documents")
    max_tokens_per_char: float = opt(0.0, "drop documents that tokenize worse than this (Cramming's filter); 0 = off")
    min_chars: int = opt(1, "drop documents shorter than this after cleaning")
    shard_tokens: int = opt(1 << 26, "tokens per shard file")
    workers: int = opt(0, "tokenization processes; 0 = all cores")
    seed: int = opt(1234, "seed of the validation split")


@dataclass
class TrainConfig:
    batch_tokens: int = opt(32768, "global batch in tokens per optimizer step (fixed across GPU counts)")
    micro_batch: int = opt(0, "sequences per forward pass on one device; 0 = chosen to fit")
    optimizer: str = opt(
        "adamw",
        "adamw; muon: Muon for the hidden matrices and AdamW for embeddings, head and gains; adamw8bit: AdamW with 8-bit states (torchao)",
        ("adamw", "muon", "adamw8bit"),
    )
    lr: float = opt(1e-3, "peak learning rate (with muon, the RMS-matched rate of every group)")
    min_lr_ratio: float = opt(0.0, "final learning rate as a fraction of the peak")
    schedule: str = opt("linear", "learning-rate shape over budget progress", ("one-cycle", "linear", "wsd", "cosine", "constant"))
    warmup: float = opt(0.02, "warm-up length as a fraction of the budget")
    cooldown: float = opt(0.2, "decay length of the wsd schedule as a fraction of the budget")
    batch_ramp: float = opt(0.0, "grow the batch linearly from 1/8 to full over this fraction of the budget; 0 = off")
    seq_warmup: float = opt(0.0, "grow the context from seq_len/8 to seq_len over this fraction of the budget, same tokens per batch; 0 = off")
    z_loss: float = opt(0.0, "weight of PaLM's z-loss, the mean of log(softmax normaliser)^2 (PaLM: 1e-4; included in the logged loss); 0 = off")
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices only)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    muon_momentum: float = opt(0.95, "Muon momentum (Nesterov)")
    grad_clip: float = opt(1.0, "clip the gradient norm to this; 0 = off")
    precision: str = opt("auto", "bf16 where supported, fp16 with a scaler on older GPUs, fp32 on CPU", ("auto", "bf16", "fp16", "fp32"))
    compile: str = opt("auto", "torch.compile the model (auto = on GPU only)", ("auto", "true", "false"))
    mlm_rate: float = opt(0.15, "masking rate of the masked objective")
    seed: int = opt(1337, "seed of initialisation and data order")
    eval_every: float = opt(0.1, "evaluate every this fraction of the budget")
    eval_tokens: int = opt(65536, "held-out tokens per evaluation (fixed, so evaluations compare)")
    checkpoint_every: float = opt(600.0, "seconds between periodic checkpoints")
    log_every: int = opt(10, "optimizer steps between progress lines")
    max_nan_skips: int = opt(5, "consecutive non-finite losses before rolling back to the last checkpoint")


@dataclass
class BudgetConfig:
    limit: str = opt("300s", "wall-clock (24h, 90m, 300s), tokens:N or steps:N")
    reserve: float = opt(0.03, "fraction of a wall-clock budget kept for the final evaluation and save")


@dataclass
class ParallelConfig:
    dp: int = opt(-1, "data-parallel degree in all (dp_replicate x dp_shard); -1 = world size / (tp * pp)")
    dp_replicate: int = opt(-1, "replicated data-parallel degree: DDP, or the replicas of HSDP; -1 = what dp_shard, tp and pp leave")
    dp_shard: int = opt(1, "sharded data-parallel degree (FSDP2: parameters, gradients and optimizer state split); -1 = what the others leave")
    tp: int = opt(1, "tensor-parallel degree (attention heads and MLP columns split over ranks, DTensor)")
    pp: int = opt(1, "pipeline-parallel degree: layers cut into this many stages, one per rank (needs model.tie_embeddings=false)")
    pp_schedule: str = opt("1F1B", "pipeline schedule", ("GPipe", "1F1B", "Interleaved1F1B"))
    pp_virtual_stages: int = opt(2, "with pp_schedule=Interleaved1F1B: stages per rank (rank r runs stages r, r + pp, ...)")
    pp_microbatches: int = opt(0, "pieces each micro-batch is cut into for the pipeline; 0 = parallel.pp")
    sequence_parallel: bool = opt(True, "with tp > 1: also split norms and residuals along the sequence")
    loss_parallel: bool = opt(True, "with tp > 1: compute the loss on vocabulary-sharded logits, never gathering them")
    reshard_after_forward: bool = opt(True, "FSDP2: free gathered parameters after forward (less memory, one more all-gather in backward)")
    fsdp_cpu_offload: bool = opt(False, "FSDP2: keep parameters, gradients and optimizer state in CPU memory (works on one process too)")
    activation_checkpointing: str = opt(
        "none", "recompute activations in backward: whole blocks (full), or all but matmul outputs (selective)", ("none", "full", "selective")
    )
    ddp_comm_hook: str = opt("none", "DDP gradient compression", ("none", "bf16", "fp16", "powersgd"))
    backend: str = opt("auto", "process-group backend (auto = nccl on GPU, gloo on CPU)", ("auto", "nccl", "gloo"))


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: str = opt("", "prepared data directory (from `budgetlm data prepare`)")
    recipe: str = opt("", "recipe this config started from")
    auto: bool = opt(
        True,
        "choose every model, vocabulary, batch and learning-rate key you did not set from the budget and this device's "
        "measured speed (off under a recipe unless it sets auto: true)",
    )


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass, strictly


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` to type `tp` or raise UserError naming `key`."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except UserError:
                pass
        raise UserError(f"config key '{key}': cannot use {value!r} as {tp}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}': expected a list, got {value!r}")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise UserError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise UserError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"config key '{key}': expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"config key '{key}': expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"config key '{key}': expected a string, got {value!r}")
        if isinstance(value, bool):  # YAML reads `compile: true` and `--set train.compile=false` as booleans
            return "true" if value else "false"
        return "" if value is None else str(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key + ".")
    return value


def _unknown(key: str, known: list[str]) -> UserError:
    close = difflib.get_close_matches(key.split(".")[-1], known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"unknown config key '{key}'{hint}")


def from_dict(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build dataclass `cls` from a (possibly partial) mapping; unknown keys are errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix.rstrip('.') or 'root'}' must be a mapping, got {data!r}")
    hints = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown(prefix + str(key), list(fields))
        value = _coerce(value, hints[key], prefix + key)
        choices = fields[key].metadata.get("choices")
        if choices and value not in choices:
            raise UserError(f"config key '{prefix}{key}': {value!r} is not one of {', '.join(map(str, choices))}")
        kwargs[key] = value
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def set_key(cfg: Any, dotted: str, raw: Any) -> None:
    """Set `cfg.a.b = raw` (parsed as YAML when a string), checking the key and type."""
    parts = dotted.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj):
            raise _unknown(dotted, [])
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if part not in fields:
            raise _unknown(".".join(parts[: i + 1]), list(fields))
        if i == len(parts) - 1:
            value = yaml.safe_load(raw) if isinstance(raw, str) and raw != "" else raw
            hint = _field_types(type(obj))[part]
            if dataclasses.is_dataclass(hint):
                raise UserError(f"config key '{dotted}' is a section; set one of its keys, e.g. {dotted}.{dataclasses.fields(hint)[0].name}=...")
            value = _coerce(value, hint, dotted)
            choices = fields[part].metadata.get("choices")
            if choices and value not in choices:
                raise UserError(f"config key '{dotted}': {value!r} is not one of {', '.join(map(str, choices))}")
            setattr(obj, part, value)
        else:
            obj = getattr(obj, part)


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply `key=value` strings in order."""
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like key=value (e.g. train.lr=3e-4)")
        key, raw = item.split("=", 1)
        set_key(cfg, key.strip(), raw.strip())
    return cfg


def config_overrides(args) -> list[str]:
    """The `key=value` overrides from a parsed command line: dotted flags (`--train.lr 3e-4`, kept
    under `cfg::` names) followed by `--set` ones (later wins)."""
    out = [f"{k[5:]}={v}" for k, v in vars(args).items() if k.startswith("cfg::")]
    return out + list(getattr(args, "set", None) or [])


def iter_fields(cls: type, prefix: str = ""):
    """Yield (dotted_key, field, type) for every leaf field of a config dataclass."""
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, prefix + f.name + ".")
        else:
            yield prefix + f.name, f, tp


# ---------------------------------------------------------------------------------------------
# recipes and files


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def read_yaml(path: Path) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping at the top level")
    return data


def load_recipe(name_or_path: str) -> RunConfig:
    """A recipe by name (budgetlm/recipes/NAME.yaml) or by path; its keys override the defaults."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = RECIPES_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise UserError(f"unknown recipe '{name_or_path}' (built-in: {', '.join(list_recipes())})")
    data = read_yaml(path)
    data.pop("about", None)  # free-text provenance note kept in recipe files
    data.setdefault("auto", False)  # a recipe is a complete configuration: a published reproduction
    cfg = from_dict(RunConfig, data)
    cfg.recipe = cfg.recipe or str(name_or_path)
    return cfg


def save_config(cfg: Any, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_config(cls: type, path: Path) -> Any:
    return from_dict(cls, read_yaml(path))
