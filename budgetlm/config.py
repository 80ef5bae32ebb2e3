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


def opt(default: Any, help: str, choices: tuple | None = None, aliases: tuple[str, ...] = (), switch: bool = False) -> Any:
    """A config field with its help text (and allowed values) attached.

    `aliases` are the names other tools use for the same setting (`learning_rate` for `lr`): accepted
    as flags, `--set` keys and keyword arguments, always stored under the field's own name."""
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    if aliases:
        meta["aliases"] = tuple(aliases)
    if switch:  # a bare `--flag` turns it on (it takes no value on the command line)
        meta["switch"] = True
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# Up to this many keys, `model.attention=auto` computes attention explicitly on CPUs in bf16/fp16 (the
# measurements are in budgetlm/model.py); here because the model and the torch-free memory estimate both need it.
EXPLICIT_ATTENTION_MAX_KEYS = 512


@dataclass
class ModelConfig:
    objective: str = opt("causal", "causal (GPT/Llama-like) or masked (BERT-like, Cramming)", ("causal", "masked"))
    n_layer: int = opt(4, "number of Transformer blocks", aliases=("num_hidden_layers", "n_layers", "num_layers"))
    n_head: int = opt(4, "attention heads", aliases=("num_attention_heads", "n_heads"))
    n_kv_head: int = opt(0, "key/value heads for grouped-query attention; 0 = n_head", aliases=("num_key_value_heads", "n_kv_heads"))
    n_embd: int = opt(256, "model width", aliases=("hidden_size", "d_model", "n_embed", "dim"))
    ffn_hidden: int = opt(
        0, "feed-forward hidden size; 0 = 8/3 n_embd for gated MLPs, 4 n_embd otherwise (rounded to 64)", aliases=("intermediate_size",)
    )
    mlp: str = opt("swiglu", "feed-forward kind (relu2: squared ReLU, So et al. 2021, as in nanochat)", ("swiglu", "geglu", "gelu", "relu2"))
    norm: str = opt("rmsnorm", "normalisation layer (pre-norm)", ("rmsnorm", "layernorm"))
    norm_eps: float = opt(1e-5, "epsilon of the normalisation layers", aliases=("rms_norm_eps", "layer_norm_eps"))
    vocab_size: int = opt(0, "vocabulary size; 0 = the tokenizer's, padded to a multiple of 64")
    seq_len: int = opt(256, "context length in tokens", aliases=("block_size", "max_seq_len", "max_position_embeddings", "context_length"))
    rope_theta: float = opt(10000.0, "rotary position embedding base")
    tie_embeddings: bool = opt(True, "share the input embedding and output projection", aliases=("tie_word_embeddings",))
    qk_norm: bool = opt(False, "RMS-normalise queries and keys per head before attention")
    embed_norm: bool = opt(False, "normalise the token embeddings (model.norm kind) before the first block, as Cramming's crammed BERT")
    first_attention_norm: bool = opt(
        True, "the first block normalises its attention input; false (needs embed_norm, whose output it then reads as it is) as in ModernBERT"
    )
    mlm_head: bool = opt(
        False, "masked: a prediction head (dense without bias, GELU, norm) between the final norm and the decoder, as BERT and ModernBERT; "
        "fine-tuned heads start from it too",
    )  # fmt: skip
    dropout: float = opt(0.0, "dropout on attention and residual branches")
    attention: str = opt(
        "auto",
        "attention kernel: sdpa (PyTorch's fused kernels), explicit (matmul, softmax, matmul: faster on CPUs for short contexts), "
        "auto (explicit on CPU in bf16/fp16 up to 512 keys, sdpa otherwise); the same math either way",
        ("auto", "sdpa", "explicit"),
    )
    init_std: float = opt(0.02, "standard deviation of the weight initialisation")
    zero_init_residual: bool = opt(False, "start the projections into the residual stream (attention.wo, feed_forward.w2) at zero")
    value_embeddings: str = opt(
        "none",
        "a second token embedding per block, added to the attention values through a learned gate (ResFormer, Zhou et al. 2024; "
        "modded-nanogpt, nanochat): in every block, in every other block ending with the last (nanochat), or none",
        ("none", "all", "alternate"),
    )
    smear: bool = opt(False, "add to each token's embedding a gated share of the previous token's before the first block (modded-nanogpt)")
    logit_softcap: float = opt(0.0, "squash the output logits into (-cap, cap) with cap * tanh(logits / cap) (Gemma 2: 30, nanochat: 15); 0 = off")
    layer_heads: list[int] = opt([], "query heads of each block (a structurally pruned model); [] = n_head in every block")
    layer_ffn: list[int] = opt([], "feed-forward hidden size of each block (a structurally pruned model); [] = the global size in every block")


@dataclass
class PrepareConfig:
    tokenizer: str = opt("bpe", "tokenizer to train: byte-level BPE (causal) or WordPiece (masked)", ("bpe", "wordpiece"))
    tokenizer_file: str = opt("", "reuse this tokenizer.json instead of training one (its kind and vocabulary win over tokenizer/vocab_size)")
    eos_token: str = opt("", "the document separator of a tokenizer_file without <|endoftext|> or [SEP] (e.g. </s>)")
    vocab_size: int = opt(0, "vocabulary size to train; 0 = chosen from the corpus size")
    lowercase: bool = opt(False, "lowercase all text")
    normalization: str = opt("NFC", "Unicode normal form applied to every document", ("NFC", "NFKC", "none"))
    text_field: str = opt("text", "field holding the text in .jsonl, .arrow, saved `datasets` folders and hf:NAME inputs")
    text_column: str = opt("text", "column (name or 0-based index) holding the text in .csv/.tsv/.parquet inputs")
    csv_header: bool = opt(True, "the first row of .csv/.tsv inputs holds column names")
    txt_document_chars: int = opt(16384, "cut .txt files into documents of about this many characters at blank lines; 0 = one per file")
    tokenizer_sample_bytes: int = opt(100_000_000, "train the tokenizer on about this many bytes sampled evenly from the corpus")
    val_fraction: float = opt(0.01, "fraction of documents held out for validation")
    min_val_documents: int = opt(1, "at least this many documents are held out")
    min_val_tokens: int = opt(
        65536,
        "at least this many tokens are held out (the default train.eval_tokens), cutting a document if it must; "
        "never more than a tenth of the corpus",
    )
    dedup: bool = opt(True, "drop exact duplicate documents")
    max_tokens_per_char: float = opt(0.0, "drop documents that tokenize worse than this (Cramming's filter); 0 = off")
    min_chars: int = opt(1, "drop documents shorter than this after cleaning")
    shard_tokens: int = opt(1 << 26, "tokens per shard file")
    workers: int = opt(0, "tokenization processes; 0 = all cores")
    seed: int = opt(1234, "seed of the validation split")


@dataclass
class TrainConfig:
    batch_tokens: int = opt(32768, "global batch in tokens per optimizer step (fixed across GPU counts)", aliases=("total_batch_size",))
    micro_batch: int = opt(0, "sequences per forward pass on one device; 0 = chosen to fit", aliases=("micro_batch_size", "device_batch_size"))
    optimizer: str = opt(
        "adamw",
        "adamw; muon: Muon for the hidden matrices and AdamW for embeddings, head and gains; adamw8bit: AdamW with 8-bit states (torchao)",
        ("adamw", "muon", "adamw8bit"),
    )
    lr: float = opt(1e-3, "peak learning rate (with muon, the RMS-matched rate of every group)", aliases=("learning_rate",))
    min_lr_ratio: float = opt(0.0, "final learning rate as a fraction of the peak")
    schedule: str = opt("linear", "learning-rate shape over budget progress", ("one-cycle", "linear", "wsd", "cosine", "constant"))
    warmup: float = opt(0.02, "warm-up length as a fraction of the budget", aliases=("warmup_ratio",))
    cooldown: float = opt(0.2, "decay length of the wsd schedule as a fraction of the budget")
    batch_ramp: float = opt(0.0, "grow the batch linearly from 1/8 to full over this fraction of the budget; 0 = off")
    seq_warmup: float = opt(0.0, "grow the context from seq_len/8 to seq_len over this fraction of the budget, same tokens per batch; 0 = off")
    z_loss: float = opt(0.0, "weight of PaLM's z-loss, the mean of log(softmax normaliser)^2 (PaLM: 1e-4; included in the logged loss); 0 = off")
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices only)")
    beta1: float = opt(0.9, "AdamW beta1", aliases=("adam_beta1",))
    beta2: float = opt(0.95, "AdamW beta2", aliases=("adam_beta2",))
    eps: float = opt(1e-8, "AdamW epsilon", aliases=("adam_epsilon",))
    muon_momentum: float = opt(0.95, "Muon momentum (Nesterov)")
    embedding_lr_ratio: float = opt(1.0, "the token embedding's learning rate as a multiple of train.lr (tied: the shared matrix's)")
    head_lr_ratio: float = opt(1.0, "an untied output head's learning rate as a multiple of train.lr")
    grad_clip: float = opt(1.0, "clip the gradient norm to this; 0 = off", aliases=("max_grad_norm", "gradient_clip_val"))
    precision: str = opt("auto", "bf16 where supported, fp16 with a scaler on older GPUs, fp32 on CPU", ("auto", "bf16", "fp16", "fp32"))
    compile: str = opt("auto", "torch.compile the model (auto = on GPU only)", ("auto", "true", "false"))
    mlm_rate: float = opt(0.15, "masking rate of the masked objective")
    seed: int = opt(1337, "seed of initialisation and data order")
    eval_every: float = opt(0.1, "evaluate every this fraction of the budget")
    eval_tokens: int = opt(65536, "held-out tokens per evaluation (fixed, so evaluations compare)")
    checkpoint_every: float = opt(600.0, "seconds between periodic checkpoints")
    log_every: int = opt(10, "optimizer steps between progress lines")
    trackers: str = opt(
        "tensorboard",
        "where metrics, settings and samples also go, besides metrics.jsonl (always written): comma-separated tensorboard (RUN/tb), "
        "wandb (offline in RUN/wandb unless WANDB_MODE or WANDB_API_KEY say otherwise), mlflow (MLFLOW_TRACKING_URI, else RUN/mlflow.db); none",
        aliases=("report_to", "logger"),
    )
    max_nan_skips: int = opt(5, "consecutive non-finite losses before rolling back to the last checkpoint")


@dataclass
class BudgetConfig:
    limit: str = opt("300s", "wall-clock (24h, 90m, 300s), tokens:N or steps:N")
    reserve: float = opt(
        0.005, "least fraction of a wall-clock budget kept for the final evaluation and save (more when their measured cost is more)"
    )
    max_tokens: int = opt(
        0, "a wall-clock run also ends after this many tokens, its schedule at whichever comes first (the plan sets it where the "
        "training text supports fewer passes than the time buys); 0 = no such limit"
    )


@dataclass
class ParallelConfig:
    """degrees above 1 need that many processes: torchrun --nproc_per_node=N -m budgetlm pretrain ...; one process runs them all at 1"""

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
# the settings of the other verbs: the same rules (help, defaults, both spellings, aliases, --set)

TASKS = ("classify", "pair", "regress", "tag")
METHODS = ("full", "lora", "adapter", "prefix")
FILE_FORMATS = ("auto", "csv", "tsv", "jsonl", "conll", "tagged")
LR_HELP = "peak learning rate; unset = by method: full 1e-4 x 768 / model width, lora and adapter 1e-3, prefix 1e-2"


@dataclass
class FetchConfig:
    dest: str = opt("", "cache folder; empty = $BUDGETLM_CACHE or ~/.cache/budgetlm")


@dataclass
class PlanConfig:
    device: str = opt("auto", "time candidates on this machine's CPU or GPU; auto = the GPU if there is one", ("auto", "cpu", "cuda"))
    gpu: str = opt("", "plan for a GPU that is not here (H100, A100, 4090, ...): speeds estimated from its peak")
    memory: str = opt("", "memory of one device (e.g. 24GB); empty = this GPU's, half this machine's RAM, or the GPU table's")
    data: str = opt("", "prepared data directory: its vocabulary caps the model's, its size the passes over it")
    params: str = opt("", "plan a model of about this size instead (e.g. 124M, 1.5e9)")


@dataclass
class EvalConfig:
    data: str = opt("", "prepared data directory to evaluate on; empty = the run's own validation split")
    tokens: int = opt(0, "held-out tokens to evaluate; 0 = the run's train.eval_tokens", aliases=("eval_tokens",))
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto (the GPU if there is one)")


@dataclass
class GenerateConfig:
    max_new_tokens: int = opt(200, "tokens to sample after the prompt", aliases=("max_tokens", "num_tokens", "n_tokens"))
    temperature: float = opt(0.8, "softmax temperature; 0 = greedy")
    top_k: int = opt(0, "sample among the k most likely tokens; 0 = off")
    top_p: float = opt(1.0, "nucleus sampling: the smallest set of tokens holding this probability; 1.0 = off")
    seed: int = opt(0, "seed of the sampler")
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto (the GPU if there is one)")


@dataclass
class FinetuneConfig:
    task: str = opt("classify", "classify (one label per text), pair (two texts), regress (a number), tag (one label per word)", TASKS)
    method: str = opt("full", "full: every weight trains; lora, adapter, prefix: a few new parameters on a frozen body", METHODS)
    format: str = opt("auto", "input file format; auto = from the file extension", FILE_FORMATS)
    text_column: str = opt("", "column/field of the text (name or 0-based index); empty = the usual names (text, sentence, ...)")
    text2_column: str = opt("", "column/field of the second text (pair task); empty = the usual names")
    label_column: str = opt("", "column/field of the label (name or 0-based index); empty = the usual names (label, ...)")
    no_header: bool = opt(False, "CSV/TSV files have no header row", switch=True)
    epochs: float = opt(3.0, "passes over the training data", aliases=("num_train_epochs", "num_epochs", "max_epochs"))
    lr: float | None = opt(None, LR_HELP, aliases=("learning_rate",))
    batch_size: int = opt(32, "examples per optimizer step", aliases=("per_device_train_batch_size", "train_batch_size"))
    max_len: int = opt(128, "maximum tokens per example (capped at the run's context)", aliases=("max_seq_length", "max_length", "block_size"))
    dropout: float = opt(0.1, "dropout on the body's attention and residual branches and before the head")
    weight_decay: float = opt(0.01, "AdamW weight decay (matrices only)")
    warmup: float = opt(0.06, "warm-up length as a fraction of training", aliases=("warmup_ratio",))
    grad_clip: float = opt(1.0, "clip the gradient norm to this; 0 = off", aliases=("max_grad_norm",))
    patience: int = opt(3, "evaluations without improvement before stopping", aliases=("early_stopping_patience",))
    evals_per_epoch: int = opt(2, "validations per epoch (early stopping keeps the best)")
    valid_fraction: float = opt(0.1, "share of the training file held out when no validation file is given")
    budget: str | None = opt(None, "stop after this wall-clock (90s, 5m), tokens:N or steps:N budget; unset = after the epochs")
    precision: str = opt("auto", "bf16 where supported, fp16 on older GPUs, fp32 on CPU", ("auto", "bf16", "fp16", "fp32"))
    pooling: str = opt("auto", "how a text becomes one vector; auto: last token (causal), mean (masked)", ("auto", "last", "mean", "first"))
    lora_rank: int = opt(8, "rank of the LoRA updates", aliases=("lora_r",))
    lora_alpha: float = opt(16.0, "LoRA scale numerator (the update is scaled by alpha / rank)")
    lora_targets: str = opt("wq,wv", "comma-separated module names LoRA adapts", aliases=("target_modules",))
    lora_dropout: float = opt(0.0, "dropout on the LoRA input")
    adapter_size: int = opt(64, "bottleneck width of the adapters")
    prefix_len: int = opt(16, "learned key/value positions per layer (prefix tuning)", aliases=("num_virtual_tokens",))
    seed: int = opt(0, "seed of the head, the method's parameters, the hold-out and the data order")
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto (the GPU if there is one)")

    def peak_lr(self, n_embd: int) -> float:
        from budgetlm.finetune.train import default_lr

        return self.lr if self.lr is not None else default_lr(self.method, n_embd)

    @property
    def method_options(self):
        """The settings of the method transform (`budgetlm.finetune.methods.MethodOptions`)."""
        from budgetlm.finetune.methods import MethodOptions

        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        return MethodOptions(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, lora_targets=targets, lora_dropout=self.lora_dropout,
                             adapter_size=self.adapter_size, prefix_len=self.prefix_len, seed=self.seed)  # fmt: skip


@dataclass
class PredictConfig:
    output: str = opt("", "file to write the predictions to; empty = standard output")
    format: str = opt("auto", "input (and output) format; auto = from the file extension, else the training file's", FILE_FORMATS)
    device: str = opt("cpu", "cpu, cuda, cuda:N, or auto (the GPU if there is one)")


@dataclass
class SuiteConfig:
    tasks: str = opt("", "comma-separated subset of tasks; empty = all (sentiment, pos)")
    seeds: int = opt(3, "fine-tuning runs per task, each on another training subsample and initialisation")
    method: str = opt("full", "fine-tuning method", METHODS)
    baseline: bool = opt(False, "also fine-tune a randomly initialised body of the same shape", switch=True)
    budget: str = opt("60s", "budget of each fine-tuning run")
    max_train: int = opt(4000, "training examples per task and seed (subsampled)")
    max_test: int = opt(1000, "test examples per task (a fixed split)")
    epochs: float = opt(3.0, "passes over the training data", aliases=("num_train_epochs",))
    lr: float | None = opt(None, LR_HELP, aliases=("learning_rate",))
    batch_size: int = opt(32, "examples per optimizer step", aliases=("per_device_train_batch_size",))
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto (the GPU if there is one)")


@dataclass
class ServeConfig:
    """the key itself (--api-key KEY) is not a setting: --print-config never shows it"""

    host: str = opt("127.0.0.1", "address to listen on (loopback only by default)")
    port: int = opt(8000, "port; 0 = any free port (printed at start)")
    api_keys_file: str = opt("", "require one of the keys in this file (one a line); empty = none, unless --api-key")
    rate_limit: float = opt(0.0, "requests a minute per key; 0 = none")
    max_batch: int = opt(32, "sequences decoded together (continuous batching); 1 = one request at a time")
    max_queue: int = opt(256, "sequences waiting for a slot before requests get 503")
    max_tokens: int = opt(1024, "the most tokens a request may ask for")
    max_prompt_tokens: int = opt(0, "longest prompt accepted; 0 = the model's context length")
    max_n: int = opt(8, "the most choices (n) a request may ask for")
    max_body_bytes: int = opt(1 << 20, "largest request body")
    drain_timeout: float = opt(60.0, "on SIGTERM, seconds to let in-flight requests finish")
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto (the GPU if there is one)")
    log_level: str = opt("warning", "uvicorn's log level (debug also logs every request)", ("debug", "info", "warning", "error"))


@dataclass
class RunsConfig:
    sort: str = opt("started", "order of the rows (unknown values last)", ("started", "val_bpb", "name"))


@dataclass
class ExportConfig:
    format: str = opt("hf", "hf: a transformers directory; gguf: one llama.cpp file", ("hf", "gguf"))
    dtype: str = opt("auto", "gguf weight type; auto = f16 (hf directories always hold fp32 weights)", ("auto", "f32", "f16", "q8_0"))
    peft: bool = opt(False, "a LoRA fine-tune as an unmerged PEFT adapter (its base model in OUT/base)", switch=True)


@dataclass
class ImportConfig:
    seq_len: int = opt(0, "context length of the run; 0 = config.json's max_position_embeddings", aliases=("max_position_embeddings",))
    data: str = opt("", "prepared data directory the run names (what eval, finetune and compress read by default); empty = none")


COMPRESS_METHODS = ("int8", "int8-dyn", "int4", "sparse", "prune", "distill")  # budgetlm.compress.METHODS (torch-free here)


@dataclass
class CompressConfig:
    """the run keys of the model that trains (distill's student, prune's recovery) are --train-set KEY=VALUE"""

    method: str = opt("", "int8 | int8-dyn | int4 (GPU) | sparse | prune | distill (required)", COMPRESS_METHODS)
    budget: str = opt("", "prune: recovery training, empty = none; distill: the student's training, empty = 300s")
    keep: float | None = opt(None, "prune: fraction of the blocks' parameters to keep; unset = 0.5 (or from speedup)")
    speedup: float | None = opt(None, "prune: target forward speed-up instead of keep (estimated from FLOPs)")
    units: str = opt("", "prune: what may go, a comma-separated subset of heads,neurons,layers; empty = all")
    importance_batches: int = opt(8, "prune: batches of 8 sequences that score importance")
    sparsity: float = opt(0.5, "sparse: fraction of the blocks' weights set to zero")
    pattern: str = opt("unstructured", "sparse: which weights may be zero (2:4 needs a CUDA GPU with sparse tensor cores)", ("unstructured", "2:4"))
    temperature: float = opt(2.0, "distill: softmax temperature of the soft targets")
    alpha: float = opt(0.5, "distill: weight of the soft-target loss (1 - alpha: the LM loss)")
    data: str = opt("", "prune, distill: prepared data to score and train on; empty = the run's")
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto (the GPU if there is one)")


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


def _field_named(cls: type, name: str) -> dataclasses.Field | None:
    """The field of `cls` called `name` (either spelling, `-` or `_`) or having it as an alias."""
    name = name.replace("-", "_")
    for f in dataclasses.fields(cls):
        if f.name == name or name in f.metadata.get("aliases", ()):
            return f
    return None


def all_keys(cls: type) -> dict[str, str]:
    """Every spelling a key of `cls` is accepted under (dotted, aliases included) -> its own dotted name."""
    out = {}
    for key, f, _ in iter_fields(cls):
        out[key] = key
        section = key.rsplit(".", 1)[0] + "." if "." in key else ""
        for alias in f.metadata.get("aliases", ()):
            out[section + alias] = key
    return out


def suggest(key: str, root: type | None) -> str | None:
    """The full key (`train.lr`, never the bare `lr`) a mistyped or misplaced `key` most likely means."""
    if root is None:
        return None
    spellings = all_keys(root)
    key = key.replace("-", "_")
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = sorted({full for spelled, full in spellings.items() if spelled.rsplit(".", 1)[-1] == leaf})
    if len(same_leaf) == 1:  # a key in the wrong section, or without its section
        return same_leaf[0]
    close = difflib.get_close_matches(key, list(spellings), n=1, cutoff=0.6)
    if close:
        return spellings[close[0]]
    by_leaf: dict[str, str] = {}
    for spelled, full in spellings.items():
        by_leaf.setdefault(spelled.rsplit(".", 1)[-1], full)
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    return by_leaf[close[0]] if close else None


def _unknown(key: str, root: type | None) -> UserError:
    close = suggest(key, root)
    hint = f" (did you mean '{close}'?)" if close and close != key else ""
    return UserError(f"unknown config key '{key}'{hint}")


def _check_choice(f: dataclasses.Field, value: Any, key: str) -> None:
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise UserError(f"config key '{key}': {value!r} is not one of {', '.join(map(str, choices))}")


def from_dict(cls: type, data: dict | None, prefix: str = "", root: type | None = None) -> Any:
    """Build dataclass `cls` from a (possibly partial) mapping; unknown keys are errors, aliases are accepted."""
    root = root or cls
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix.rstrip('.') or 'root'}' must be a mapping, got {data!r}")
    hints = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        f = _field_named(cls, str(key))
        if f is None:
            raise _unknown(prefix + str(key), root)
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, value, prefix=prefix + f.name + ".", root=root)
        else:
            value = _coerce(value, hint, prefix + f.name)
            _check_choice(f, value, prefix + f.name)
        kwargs[f.name] = value
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _is_text(tp: Any) -> bool:
    """str or str | None: a value typed on the command line is taken as written, never read as YAML."""
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))


def set_key(cfg: Any, dotted: str, raw: Any, parse: bool = True) -> str:
    """Set `cfg.a.b = raw`, checking the key and type; returns the key's own dotted name.

    Either spelling (`max-new-tokens`, `max_new_tokens`) and the aliases of a field are accepted. With
    `parse` a string value is read as YAML (`3e-4`, `true`, `[a, b]`) unless the field holds text."""
    parts = dotted.strip().replace("-", "_").split(".")
    obj, done = cfg, []
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj):
            raise _unknown(dotted, type(cfg))
        f = _field_named(type(obj), part)
        if f is None:
            raise _unknown(".".join(done + parts[i:]), type(cfg))
        done.append(f.name)
        hint = _field_types(type(obj))[f.name]
        if i < len(parts) - 1:
            obj = getattr(obj, f.name)
            continue
        key = ".".join(done)
        if dataclasses.is_dataclass(hint):
            raise UserError(f"config key '{key}' is a section; set one of its keys, e.g. {key}.{dataclasses.fields(hint)[0].name}=...")
        value = raw
        if parse and isinstance(raw, str) and raw != "" and not _is_text(hint):
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                value = raw  # not YAML: let the type check below say what was expected
        value = _coerce(value, hint, key)
        _check_choice(f, value, key)
        setattr(obj, f.name, value)
        return key
    raise _unknown(dotted, type(cfg))


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply `key=value` strings in order."""
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like key=value (e.g. train.lr=3e-4)")
        key, raw = item.split("=", 1)
        set_key(cfg, key.strip(), raw.strip())
    return cfg


def override_keys(cls: type, overrides: list[str]) -> set[str]:
    """The keys (own dotted names, whatever spelling or alias was typed) a list of `key=value` overrides sets."""
    spellings = all_keys(cls)
    keys = {item.split("=", 1)[0].strip().replace("-", "_") for item in overrides or []}
    return {spellings.get(k, k) for k in keys}


def check_type(cfg: Any, cls: type) -> None:
    if not isinstance(cfg, cls):
        raise UserError(f"config must be a budgetlm.config.{cls.__name__}, got {type(cfg).__name__}")


def apply_settings(cfg: Any, settings: dict) -> set[str]:
    """Python values by key (`lr=3e-4`, `train={"lr": 3e-4}`, `learning_rate=3e-4`), as the API takes
    them; a bare leaf name is looked up in every section when only one has it. Returns the keys set."""
    keys = set()
    sections = {f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))}
    for name, value in settings.items():
        if name in sections and isinstance(value, dict):
            keys |= {set_key(cfg, f"{name}.{k}", v, parse=False) for k, v in value.items()}
            continue
        key = name.replace("__", ".")
        if "." not in key and _field_named(type(cfg), key) is None and sections:
            matches = {full for spelled, full in all_keys(type(cfg)).items() if spelled.rsplit(".", 1)[-1] == key.replace("-", "_")}
            if len(matches) > 1:
                raise UserError(f"setting '{name}' is ambiguous ({', '.join(sorted(matches))}); pass it in its section, e.g. "
                                f"{sorted(matches)[0].split('.')[0]}={{'{key}': ...}}")  # fmt: skip
            if matches:
                key = matches.pop()
        keys.add(set_key(cfg, key, value, parse=False))
    return keys


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
