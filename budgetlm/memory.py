"""How much memory one training step of budgetlm's Transformer needs, per device, from the config alone.

Pure arithmetic: nothing is allocated, torch is not imported. The estimate is of the peak of live
tensor bytes (what `torch.cuda.max_memory_allocated` reports on a GPU; on a CPU, the profiler's
running total of tensor allocations), not of the process's resident memory or the caching
allocator's reserve. Checked against measured peaks by `bench/plan_memory.py`
(`bench/results/plan_memory.md`).

The terms, for P parameters, N = micro_batch x seq_len tokens, width C, feed-forward width F,
padded vocabulary V, element size e of the activations (2 under bf16/fp16 autocast, 4 in fp32):

- weights: 4P. Autocast keeps fp32 master weights; it also caches a 2-byte copy of every matrix a
  matmul uses, which the backward pass holds until it has used it (`autocast_weights`).
- gradients: 4P (fp32, like the weights), all live after the backward pass.
- optimizer state: AdamW two fp32 moments (8P); 8-bit AdamW (torchao, block-wise) ~2P plus one fp32
  scale per 256 values per moment; Muon one fp32 momentum per hidden matrix (4 bytes) and AdamW's
  8 bytes for the embeddings, output, norms.
- activations: what autograd saves per block, counted from this model's forward (Korthikanti et al.
  2022, "Reducing Activation Recomputation in Large Transformer Models", count 34 s b h + 5 a s^2 b
  per layer for GPT with dropout; here there is no dropout, SDPA/flash attention stores no s x s
  scores, the residual stream stays fp32 under autocast, and a norm's output is cast once to the
  autocast dtype for all the linears that read it). Per block, bytes per token:
    attention, autocast: 4C (norm input) + 2C (the linears' input) + 2C (q) + 2C (rotated q)
                         + 2C (attention output) + 2C (wo input) + 3 x 2 C_kv (k, rotated k, v)
    attention, fp32:     4C + 4C (norm output, shared) + 4 x 4C + 3 x 4 C_kv
    gated MLP:           4C (norm input) + {2C autocast | 4C fp32} + 4 x eF (w1 out, act out,
                         w3 out, product); plain GELU MLP: 2 x eF
  plus QK-norm's inputs (e(C + C_kv)) and SDPA's log-sum-exp (4 bytes per head), or, where
  attention is explicit (CPUs in bf16 for short contexts), the softmax output: e x n_head x T.
- logits and loss: with the chunked loss (`budgetlm.linear_cross_entropy`) the logits in the
  compute dtype (B T V x e, turned in place into their gradient), the gradients of the hidden states
  and of the output weight, and under autocast low-precision copies of both; with a logit soft-cap,
  tensor parallelism or torch.compile the plain path's fp32 logits, log-softmax output and their gradients (12
  bytes per token per vocabulary entry, 16 with the soft-cap). Predicted positions only (all tokens
  for causal, the masked ones for masked models). At width 128 and a 2048 vocabulary this is the
  biggest term.
- activation checkpointing (`torch.utils.checkpoint` per block): 'full' keeps each block's fp32
  input (4C per token) and recomputes one block at a time in the backward pass; 'selective'
  checkpoints every second block (torchtitan's `selective_ac_option="2"`).

The peak is the largest of three moments: the start of the backward pass (weights, optimizer
state, all saved activations, the loss buffers, autocast's weight copies); with checkpointing, the
backward of the last checkpointed block (its activations rebuilt, the loss buffers already freed);
and the end of the backward pass (weights, optimizer state, all gradients, plus the dense gradient
of a tied embedding that is added into the output projection's). Sharding (`dp_shard`, FSDP2), tensor (`tp`, with sequence parallelism) and pipeline
(`pp`, 1F1B) parallelism divide these terms the standard way (torchtitan, Megatron-LM); those
paths and `cpu_offload` are arithmetic only: only the single-device terms are validated by
measurement so far.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from budgetlm.config import EXPLICIT_ATTENTION_MAX_KEYS, ModelConfig
from budgetlm.model import SMEAR_GATE_CHANNELS, VALUE_GATE_CHANNELS, value_embedding_layers

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit", "muon")
CHECKPOINTING = ("none", "full", "selective")
ADAM8BIT_BLOCK = 256  # torchao's AdamW8bit quantisation block: one fp32 scale per 256 values per moment
CUDA_OVERHEAD = 64 * 2**20  # cuBLAS workspaces and the allocator's rounding seen by max_memory_allocated (not measured yet)


def _padded_vocab(vocab_size: int, multiple: int = 64) -> int:
    return (vocab_size + multiple - 1) // multiple * multiple  # = budgetlm.model.padded_vocab_size


def _ffn_hidden(cfg: ModelConfig) -> int:
    if cfg.ffn_hidden > 0:  # = budgetlm.model.ffn_hidden_size
        return cfg.ffn_hidden
    hidden = int(8 * cfg.n_embd / 3) if cfg.mlp in ("swiglu", "geglu") else 4 * cfg.n_embd
    return (hidden + 63) // 64 * 64


@dataclass(frozen=True)
class ParamCount:
    """Parameters by where they sit, counted from the config the way `Transformer.num_params` does."""

    embedding: int  # token embedding table (also the output projection when tied)
    output: int  # untied output projection (0 when tied)
    per_block: int  # one Transformer block
    block_matrices: int  # of which in 2-D matrices (Muon's share; what tensor parallelism shards)
    other: int  # final norm (+ embedding norm), the smear and the value embeddings' gates
    n_layer: int
    value_embeddings: int = 0  # value-embedding tables (lookups, like the token embedding)

    @property
    def blocks(self) -> int:
        return self.per_block * self.n_layer

    @property
    def total(self) -> int:
        return self.embedding + self.output + self.blocks + self.other + self.value_embeddings

    @property
    def matmul(self) -> int:
        """Parameters that go through a matmul (autocast caches a low-precision copy of each)."""
        return self.block_matrices * self.n_layer + (self.output or self.embedding)


def count_params(cfg: ModelConfig) -> ParamCount:
    C, F = cfg.n_embd, _ffn_hidden(cfg)
    head_dim = C // cfg.n_head
    c_kv = (cfg.n_kv_head or cfg.n_head) * head_dim
    V = _padded_vocab(cfg.vocab_size)
    attn = C * C + 2 * C * c_kv + C * C  # wq, wk, wv, wo
    mlp = (3 if cfg.mlp in ("swiglu", "geglu") else 2) * C * F
    norms = 2 * C + (2 * head_dim if cfg.qk_norm else 0)
    other = C + (C if cfg.embed_norm else 0) + (C * C + C if cfg.mlm_head else 0) - (0 if cfg.first_attention_norm else C)
    ve_layers = len(value_embedding_layers(cfg))
    other += ve_layers * min(VALUE_GATE_CHANNELS, C) * (cfg.n_kv_head or cfg.n_head) + (min(SMEAR_GATE_CHANNELS, C) + 1 if cfg.smear else 0)
    return ParamCount(
        embedding=V * C,
        output=0 if cfg.tie_embeddings else V * C,
        per_block=attn + mlp + norms,
        block_matrices=attn + mlp,
        other=other,
        n_layer=cfg.n_layer,
        value_embeddings=ve_layers * V * c_kv,
    )


@dataclass
class MemoryEstimate:
    """Bytes per device at the peak of one training step (see the module docstring for each term)."""

    weights: int
    gradients: int
    optimizer_state: int
    activations: int  # saved for the backward pass by the blocks, all micro-batches in flight
    recompute: int  # one checkpointed block's activations, rebuilt in the backward pass (0 without checkpointing)
    logits_loss: int  # logits, log-softmax and their gradients around the loss
    autocast_weights: int  # low-precision weight copies held by autocast for the backward pass
    overhead: int  # framework: workspaces, allocator rounding (0 on CPU)
    total: int  # the peak: max(backward start, backward end) + overhead
    peak_at: str  # "backward start", "recompute" (inside a checkpointed block's backward) or "backward end"
    host: int = 0  # bytes kept in host memory instead (cpu_offload)
    params: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A short human-readable breakdown (MiB)."""
        names = ("weights", "gradients", "optimizer_state", "activations", "recompute", "logits_loss", "autocast_weights", "overhead")
        rows = [(k, getattr(self, k)) for k in names]
        rows.append(("total (peak at " + self.peak_at + ")", self.total))
        if self.host:
            rows.append(("host (offloaded)", self.host))
        return "\n".join(f"{k:<34} {v / 2**20:10.1f} MiB" for k, v in rows)


def explicit_attention_used(cfg: ModelConfig, precision: str, device_type: str, seq_len: int) -> bool:
    """Whether training takes the model's explicit (B, nh, T, T) attention instead of SDPA's kernel
    (`budgetlm.model.Attention._explicit`: CPUs in bf16/fp16 up to EXPLICIT_ATTENTION_MAX_KEYS keys, or asked for)."""
    if cfg.attention == "sdpa" or (cfg.dropout and cfg.attention != "explicit"):
        return False
    return cfg.attention == "explicit" or (device_type == "cpu" and precision != "fp32" and seq_len <= EXPLICIT_ATTENTION_MAX_KEYS)


def block_activation_bytes_per_token(cfg: ModelConfig, precision: str, device_type: str = "cuda", seq_len: int | None = None) -> float:
    """Bytes autograd saves per token for one block (no checkpointing)."""
    C, F = cfg.n_embd, _ffn_hidden(cfg)
    T = cfg.seq_len if seq_len is None else seq_len
    head_dim = C // cfg.n_head
    n_kv = cfg.n_kv_head or cfg.n_head
    c_kv = n_kv * head_dim
    low = precision != "fp32"
    e = 2 if low else 4
    gated = cfg.mlp in ("swiglu", "geglu")
    # attention: norm input (fp32 residual); the linears' input (the fp32 norm output, or its one
    # low-precision copy under autocast, shared by the three linears); q, rotated q, attention output,
    # wo input; k, rotated k, v; and the kernel's own: SDPA's log-sum-exp (fp32, one per head), or the
    # explicit path's softmax output (nh x T per token) and grouped-query heads repeated to nh
    attn = 4 * C + (2 * C if low else 4 * C) + 4 * e * C + 3 * e * c_kv
    if explicit_attention_used(cfg, precision, device_type, T):
        attn += e * cfg.n_head * T + (2 * e * (C - c_kv) if c_kv != C else 0)
    else:
        attn += 4 * cfg.n_head
    if cfg.qk_norm:
        attn += e * (C + c_kv)
    mlp = 4 * C + (2 * C if low else 4 * C) + (4 if gated else 2) * e * F
    # spread over the blocks: a value embedding (fp32 lookup, its compute-dtype copy) where a block has one,
    # and the smear's embedding and shifted copy once before the first block
    extras = len(value_embedding_layers(cfg)) * (4 + e) * c_kv + (2 * 4 * C if cfg.smear else 0)
    return attn + mlp + extras / cfg.n_layer


def estimate_memory(
    model_cfg: ModelConfig,
    *,
    micro_batch: int,
    seq_len: int | None = None,
    precision: str = "bf16",
    optimizer: str = "adamw",
    activation_checkpointing: str = "none",
    cpu_offload: bool = False,
    dp_shard: int = 1,
    tp: int = 1,
    pp: int = 1,
    device_type: str = "cuda",
    mlm_rate: float = 0.15,
    compiled: bool = False,
) -> MemoryEstimate:
    """Peak bytes per device of a training step (forward, backward, clipping, optimizer step) of
    `Transformer(model_cfg)` on `micro_batch` sequences of `seq_len` tokens (default: the config's).

    precision: fp32, or bf16/fp16 autocast over fp32 weights. optimizer: adamw | adamw8bit | muon.
    activation_checkpointing: none | full (every block) | selective (every second block).
    dp_shard: FSDP2 shards of weights, gradients and optimizer state; tp: tensor-parallel degree
    (with sequence parallelism); pp: pipeline stages (1F1B: the first stage holds pp micro-batches).
    cpu_offload: FSDP2-style offload of weights, gradients and optimizer state to the host.
    mlm_rate: the predicted share of tokens for masked models (only those reach the output).
    compiled: torch.compile'd model and loss, which keeps the plain loss (its buffers are counted as eager's)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if activation_checkpointing not in CHECKPOINTING:
        raise ValueError(f"activation_checkpointing must be one of {CHECKPOINTING}, got {activation_checkpointing!r}")
    if min(micro_batch, dp_shard, tp, pp) < 1:
        raise ValueError("micro_batch, dp_shard, tp and pp must be >= 1")
    T = model_cfg.seq_len if seq_len is None else seq_len
    N = micro_batch * T
    C = model_cfg.n_embd
    V = _padded_vocab(model_cfg.vocab_size)
    pc = count_params(model_cfg)
    low = precision != "fp32"

    # -- parameters on this device: pipeline stage (the first holds the embedding; with tp, matrices split)
    layers_here = math.ceil(model_cfg.n_layer / pp)
    block_params = layers_here * (pc.block_matrices // tp + (pc.per_block - pc.block_matrices))
    embed_params = pc.embedding // tp
    out_params = (pc.output // tp) if pp == 1 else (pc.output or pc.embedding) // tp  # separate stages cannot share
    local = block_params + embed_params + out_params + pc.other + pc.value_embeddings
    hidden_matrices = layers_here * pc.block_matrices // tp
    shard = dp_shard
    weights = 4 * local // shard
    gradients = 4 * local // shard
    if optimizer == "adamw":
        opt_state = 8 * local // shard
    elif optimizer == "adamw8bit":
        opt_state = (2 * local + 2 * 4 * math.ceil(local / ADAM8BIT_BLOCK)) // shard
    else:  # muon: momentum on hidden matrices, AdamW on the rest
        opt_state = (4 * hidden_matrices + 8 * (local - hidden_matrices)) // shard
    host = 0
    if cpu_offload:
        host = weights + gradients + opt_state
        # on the device: one block's weights and gradients unsharded at a time, and the next one prefetched
        one_block = pc.block_matrices // tp + (pc.per_block - pc.block_matrices)
        weights = gradients = 2 * 4 * one_block
        opt_state = 0
    if dp_shard > 1 and not cpu_offload:
        # FSDP2 all-gathers one block (and prefetches the next) in full
        weights += 2 * 4 * (pc.block_matrices // tp + (pc.per_block - pc.block_matrices))

    # -- activations, for the micro-batches this stage holds (1F1B: pp on the first stage)
    per_block = block_activation_bytes_per_token(model_cfg, precision, device_type, T) * N / tp
    ckpt_in = 4 * C * N / tp  # a checkpointed block keeps its fp32 input
    in_flight = pp
    if activation_checkpointing == "none":
        saved_per_mb = layers_here * per_block
        recompute = 0
    elif activation_checkpointing == "full":
        saved_per_mb = layers_here * ckpt_in
        recompute = int(per_block)  # one block's activations, rebuilt during its backward
    else:
        n_ckpt = layers_here // 2
        saved_per_mb = n_ckpt * ckpt_in + (layers_here - n_ckpt) * per_block
        recompute = int(per_block) if n_ckpt else 0
    activations = int(in_flight * saved_per_mb)

    # -- logits and loss
    n_pred = N if model_cfg.objective == "causal" else math.ceil(N * mlm_rate)
    e = 2 if low else 4
    if tp == 1 and not model_cfg.logit_softcap and not compiled:
        # the chunked loss (budgetlm.linear_cross_entropy): the logits in the compute dtype, turned in place
        # into their gradient, beside the gradients of the hidden states and the output weight and, under
        # autocast, low-precision copies of both inputs
        logits_loss = int(n_pred * V * e + (n_pred * C + V * C) * e * (2 if low else 1))
    else:
        # fp32 logits, log-softmax output, and at backward start their gradients (low-precision logits freed by .float())
        logits_loss = int(n_pred * V / tp * (12 + (4 if model_cfg.logit_softcap else 0)))
    if model_cfg.objective == "masked":
        logits_loss += int(n_pred * C * (4 + 4 + (2 if low else 0)))  # gathered hidden states, norm output, copy

    autocast_w = 0
    if low and not cpu_offload:
        # a checkpointed block saves nothing, so its weight copies are dropped after its forward
        kept = {"none": layers_here, "full": 0, "selective": layers_here - layers_here // 2}[activation_checkpointing]
        autocast_w = 2 * (kept * pc.block_matrices // tp + (pc.output or pc.embedding) // tp) // shard

    overhead = CUDA_OVERHEAD if device_type == "cuda" else 0
    moments = {"backward start": weights + opt_state + activations + logits_loss + autocast_w}
    if recompute:
        # the last checkpointed block is rebuilt after the loss buffers are freed; by then the output
        # projection has its gradient and two fp32 (N, C) gradients flow through the block
        out_grad = 4 * (pc.output or pc.embedding) // tp // shard
        moments["recompute"] = weights + opt_state + activations + recompute + autocast_w + out_grad + int(2 * ckpt_in)
    tied_transient = 4 * pc.embedding // tp // shard if model_cfg.tie_embeddings and not cpu_offload else 0
    moments["backward end"] = weights + opt_state + gradients + tied_transient
    where = max(moments, key=moments.get)
    peak = moments[where]
    return MemoryEstimate(
        weights=weights,
        gradients=gradients,
        optimizer_state=opt_state,
        activations=activations,
        recompute=recompute,
        logits_loss=logits_loss,
        autocast_weights=autocast_w,
        overhead=overhead,
        total=peak + overhead,
        peak_at=where,
        host=host,
        params=pc.total,
    )
