"""The Transformer: single-device, pure PyTorch, causal (Llama-like) or masked (BERT-like).

Causal: pre-norm RMSNorm, rotary positions (Su et al. 2021), SwiGLU feed-forward (Shazeer 2020),
no biases, optionally grouped-query attention (Ainslie et al. 2023) -- the Llama recipe
(Touvron et al. 2023). Masked: the same blocks without the causal mask, trained on masked
positions only, following Cramming (Geiping & Goldstein 2022): gated GELU, pre-norm LayerNorm,
no biases, and "sparse prediction" -- only the masked positions go through the final norm and
the output projection, so no compute is spent predicting the ~85% of tokens that carry no loss.
Two optional token features from the GPT-2 speedrun lineage (modded-nanogpt, nanochat), which the
budget's plan turns on for causal models: value embeddings (a second token embedding per block,
gated into the attention values) and the smear (each token's embedding mixed with the previous one's).

Rules (as in torchtitan): the model knows nothing about ranks, logging, files or
the CLI; it is built on the `meta` device and materialised by `init_weights()`; parameter names
follow Llama/torchtitan (`tok_embeddings`, `layers.{i}.attention.wq`, ...), so the Hugging Face
export is the short name map in `budgetlm/hf_names.py`; layers sit in an `nn.ModuleDict` keyed
"0".."n-1" so pipeline stages can drop layers without renaming parameters.
"""

from __future__ import annotations

import math
import zlib
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from budgetlm.config import EXPLICIT_ATTENTION_MAX_KEYS, ModelConfig
from budgetlm.linear_cross_entropy import IGNORE_INDEX, linear_cross_entropy  # noqa: F401 (IGNORE_INDEX: re-exported)

VOCAB_MULTIPLE = 64  # padding the vocabulary to a multiple of 64 keeps the output matmul on fast tiles (nanoGPT: ~25% faster)


def padded_vocab_size(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """The embedding/output size: `vocab_size` rounded up to a multiple of 64."""
    return (vocab_size + multiple - 1) // multiple * multiple


def ffn_hidden_size(cfg: ModelConfig) -> int:
    """Feed-forward width: the config's, else 8/3 n_embd for gated MLPs (same parameters as a 4x MLP; Shazeer 2020)
    or 4 n_embd for a plain one, rounded up to a multiple of 64."""
    if cfg.ffn_hidden > 0:
        return cfg.ffn_hidden
    hidden = int(8 * cfg.n_embd / 3) if cfg.mlp in ("swiglu", "geglu") else 4 * cfg.n_embd
    return (hidden + 63) // 64 * 64


def layer_sizes(cfg: ModelConfig, layer_id: int) -> tuple[int, int, int]:
    """(query heads, key/value heads, feed-forward width) of block `layer_id`: the global sizes, or the
    per-layer ones of a structurally pruned model (`model.layer_heads` / `model.layer_ffn`). Pruning
    removes whole key/value groups, so each block keeps the global query-per-key/value ratio."""
    n_kv = cfg.n_kv_head or cfg.n_head
    n_head = cfg.layer_heads[layer_id] if cfg.layer_heads else cfg.n_head
    ffn = cfg.layer_ffn[layer_id] if cfg.layer_ffn else ffn_hidden_size(cfg)
    return n_head, n_head * n_kv // cfg.n_head, ffn


VALUE_GATE_CHANNELS = 32  # the value-embedding gate reads this many channels of its block's input (nanochat)
SMEAR_GATE_CHANNELS = 12  # the smear gate reads this many channels of the embedding (modded-nanogpt)


def value_embedding_layers(cfg: ModelConfig) -> list[int]:
    """Blocks with a value embedding (`model.value_embeddings`): all, every other one ending with the last, or none."""
    n = cfg.n_layer
    if cfg.value_embeddings == "all":
        return list(range(n))
    if cfg.value_embeddings == "alternate":
        return [i for i in range(n) if i % 2 == (n - 1) % 2]
    return []


def check_config(cfg: ModelConfig) -> None:
    """Shape rules the model needs; raise ValueError naming the field."""
    if cfg.vocab_size <= 0:
        raise ValueError("model.vocab_size must be set (the tokenizer's size) before building the model")
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"model.n_embd ({cfg.n_embd}) must be divisible by model.n_head ({cfg.n_head})")
    if (cfg.n_embd // cfg.n_head) % 2:
        raise ValueError(f"head size n_embd/n_head = {cfg.n_embd // cfg.n_head} must be even for rotary positions")
    if cfg.mlm_head and cfg.objective != "masked":
        raise ValueError("model.mlm_head is the masked objective's prediction head (a causal model has none)")
    if not cfg.first_attention_norm and not cfg.embed_norm:
        raise ValueError("model.first_attention_norm=false needs model.embed_norm=true (the first block reads the normalised embeddings)")
    n_kv = cfg.n_kv_head or cfg.n_head
    if cfg.n_head % n_kv:
        raise ValueError(f"model.n_head ({cfg.n_head}) must be a multiple of model.n_kv_head ({n_kv})")
    if cfg.logit_softcap < 0:
        raise ValueError(f"model.logit_softcap ({cfg.logit_softcap}) must be positive, or 0 for none")
    group = cfg.n_head // n_kv
    for key, sizes in (("layer_heads", cfg.layer_heads), ("layer_ffn", cfg.layer_ffn)):
        if sizes and len(sizes) != cfg.n_layer:
            raise ValueError(f"model.{key} lists {len(sizes)} blocks, model.n_layer is {cfg.n_layer}")
        if any(n <= 0 for n in sizes):
            raise ValueError(f"model.{key} entries must be positive, got {sizes}")
    if any(h % group or h > cfg.n_head for h in cfg.layer_heads):
        raise ValueError(f"model.layer_heads entries must be multiples of n_head/n_kv_head = {group}, at most n_head, got {cfg.layer_heads}")


class KVCacheLike(Protocol):
    """What attention needs from a key/value cache (implemented by `budgetlm.generate.KVCache`)."""

    def update(self, layer_id: int, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv_head, T, hs) at positions start_pos.. (an int, or (B,) per row) and return
        the keys/values attention should see (B, n_kv_head, L, hs)."""
        ...


def previous_positions(x: torch.Tensor, kv_cache, start_pos: int | torch.Tensor) -> torch.Tensor:
    """For each position of x (B, T, C), the embedding at the position before it, zeros at position 0:
    within x for a whole sequence, or from a cache that keeps them (`shift`) when decoding goes on
    from earlier positions. A cache without `shift` (a fine-tuning prefix) serves whole sequences only."""
    if kv_cache is not None and hasattr(kv_cache, "shift"):
        return kv_cache.shift(start_pos, x)
    if not isinstance(start_pos, int) or start_pos != 0:
        raise ValueError("model.smear needs the previous token's embedding: decode with a cache that keeps them (budgetlm.generate.KVCache)")
    return F.pad(x[:, :-1], (0, 0, 1, 0))


# ---------------------------------------------------------------------------------------------
# building blocks


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    # RMSNorm (Zhang & Sennrich 2019) as in Llama; LayerNorm without bias as in Cramming.
    # Both call fused kernels (F.rms_norm / F.layer_norm) rather than composing pow/mean/rsqrt.
    if cfg.norm == "layernorm":
        return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=False)
    return RMSNorm(dim, eps=cfg.norm_eps)


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` whose gain follows the input's dtype: under CPU bf16 autocast the input is bf16,
    and an fp32 gain would send every call to the unfused kernel (with a warning each time)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) if self.weight is not None else None
        if _own_rms_norm_backward(x, weight):
            return _RMSNormCPU.apply(x, weight, self.eps)
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


_HAS_FUSED_RMS_NORM = hasattr(torch.ops.aten, "_fused_rms_norm")  # PyTorch >= 2.8


def _own_rms_norm_backward(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Eager fp32 training on a CPU, where PyTorch's RMSNorm has a fused forward kernel but composes its
    backward from a dozen elementwise ops. Compiled graphs, other devices, sharded (DTensor) inputs
    and PyTorch without the fused forward keep `F.rms_norm`."""
    if not _HAS_FUSED_RMS_NORM:
        return False
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))
    plain = not hasattr(x, "device_mesh") and (weight is None or not hasattr(weight, "device_mesh"))
    return needs_grad and plain and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling()


class _RMSNormCPU(torch.autograd.Function):
    """RMSNorm over the last dimension: PyTorch's fused forward, which also returns 1 / rms, and the
    backward written out, dx = (g - x_hat mean(g x_hat)) / rms with g = dy * weight, in seven operations
    where autograd of PyTorch's composite formula takes about twenty.
    On one core of an Intel Xeon (torch 2.13, fp32, 16 x 128 x 128) forward + backward took 2.8 ms
    against 4.0 for `F.rms_norm`: a 0.7M-parameter model's step has five norms, and nine with QK-norm."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float | None) -> torch.Tensor:
        y, rstd = torch.ops.aten._fused_rms_norm(x, [x.size(-1)], weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        width = x.size(-1)
        x_hat = x * rstd
        grad_w = None
        if weight is not None:
            if ctx.needs_input_grad[1]:
                grad_w = torch.linalg.vecdot(dy.reshape(-1, width), x_hat.reshape(-1, width), dim=0)
            dy = dy * weight
        grad_x = None
        if ctx.needs_input_grad[0]:
            mean_dot = torch.linalg.vecdot(dy, x_hat, dim=-1).unsqueeze(-1).div_(width)
            grad_x = torch.addcmul(dy, x_hat, mean_dot, value=-1).mul_(rstd)
        return grad_x, grad_w, None


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (seq_len, head_dim / 2), in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hs) by position. "rotate-half" layout: dimension i pairs with i + hs/2, as in
    Hugging Face Llama (GPT-NeoX), so its checkpoints load without permuting wq/wk rows."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # (T, hs/2) broadcast over B and nh, or (B, 1, T, hs/2) per row
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# Up to this many keys, `model.attention=auto` computes attention explicitly on CPUs in bf16/fp16.
# Measured on one core of an AMD EPYC (torch 2.13, head size 64, forward + backward, a fixed 1-2K
# tokens): in bf16 explicit took 3.7 ms against 15.6
# for SDPA at 128 keys, 23.6 against 47.9 at 256, 64 against 101 at 512, 115 against 129 at 1024.
# Beyond 512 the (T, T) scores it saves for the backward pass cost more memory than the time is
# worth. In fp32 SDPA's kernel is as fast or faster from 256 keys on (0.90x, 0.62x, 0.46x at 256,
# 512, 1024), so fp32 keeps SDPA.
EXPLICIT_MAX_KEYS = EXPLICIT_ATTENTION_MAX_KEYS


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) + causal mask) v as plain batched matmuls: what SDPA computes.

    q (B, nh, T, hs); k, v (B, nkv, T, hs) with nkv dividing nh (grouped-query heads are repeated).
    The scale and the mask go into the scores' matmul (`baddbmm`: no separate pass over the (T, T)
    scores for either), and the softmax runs in the input's dtype: PyTorch's CPU softmax kernels
    accumulate a bf16 row in fp32 and round once, which gives the same forward values as an fp32
    softmax cast back to bf16, without the four casts of the (B, nh, T, T) scores (forward and
    backward) that cost as much as the softmax itself (measured: 2x the attention step at 256 keys)."""
    if k.size(1) != q.size(1):
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
        v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    B, nh, T, hs = q.shape
    S = k.size(-2)
    if causal:
        bias = torch.zeros(T, S, dtype=q.dtype, device=q.device)
        bias.masked_fill_(torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    else:
        bias = torch.zeros(1, 1, dtype=q.dtype, device=q.device)
    scores = torch.baddbmm(bias, q.reshape(B * nh, T, hs), k.reshape(B * nh, S, hs).transpose(1, 2), alpha=hs**-0.5)
    return (scores.softmax(dim=-1) @ v.reshape(B * nh, S, hs)).view(B, nh, T, hs)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.kernel = cfg.attention
        self.n_head, self.n_kv_head, _ = layer_sizes(cfg, layer_id)
        self.head_dim = cfg.n_embd // cfg.n_head
        self.causal = cfg.objective == "causal"
        self.dropout = cfg.dropout
        self.wq = nn.Linear(cfg.n_embd, self.n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_head * self.head_dim, cfg.n_embd, bias=False)
        # QK-norm (Dehghani et al. 2023; OLMo 2, Qwen3) keeps attention logits bounded at high learning rates.
        self.q_norm = RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        # Value embeddings: a gate per key/value head, from the first channels of the block's input, scales the token's
        # value embedding into v. It starts at zero weights, so at 1 (2 sigmoid(0)), as nanochat's.
        has_ve = layer_id in value_embedding_layers(cfg)
        self.ve_gate = nn.Linear(min(VALUE_GATE_CHANNELS, cfg.n_embd), self.n_kv_head, bias=False) if has_ve else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCacheLike | None = None,
        start_pos: int | torch.Tensor = 0,
        attn_mask: torch.Tensor | None = None,
        ve: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`ve` (B, T, nkv * hs): the tokens' value embeddings, for a block that has them."""
        B, T, _ = x.shape
        # Head counts come from the projections' shapes, not the config: under tensor parallelism
        # wq/wk/wv are column shards holding n_head / tp heads on each rank.
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, nh, hs)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, nkv, hs)
        if self.q_norm is not None:  # before the transpose: the norm reads contiguous rows (the same values)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hs), (B, nkv, T, hs)
        v = self.wv(x).view(B, T, -1, self.head_dim)  # (B, T, nkv, hs)
        if ve is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate.in_features]))  # (B, T, nkv), in (0, 2)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, -1, self.head_dim)
        v = v.transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        is_causal = self.causal and T > 1
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_id, start_pos, k, v)  # (B, nkv, start_pos+T, hs)
            if is_causal and attn_mask is None and start_pos > 0:  # per-row (tensor) positions always come with a mask
                # a chunk after cached tokens: query i sees keys 0 .. start_pos+i (is_causal would align to the top-left)
                attn_mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
                is_causal = False
        if attn_mask is not None:
            is_causal = False  # an explicit mask (padding or cache offset) already carries causality
        if self._explicit(q, k, kv_cache, attn_mask):
            y = explicit_attention(q, k, v, is_causal)
        else:
            dropout_p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=k.size(1) != q.size(1)
            )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh * hs)
        return self.wo(y)

    def _explicit(self, q, k, kv_cache, attn_mask) -> bool:
        """Whether this call takes `explicit_attention`: the training path only (no cache, mask or
        attention dropout, which SDPA handles), on CPU for short contexts under `auto`."""
        if self.kernel == "sdpa" or kv_cache is not None or attn_mask is not None or (self.dropout and self.training):
            return False
        auto = q.device.type == "cpu" and q.dtype != torch.float32 and k.size(-2) <= EXPLICIT_MAX_KEYS
        return self.kernel == "explicit" or auto


class FeedForward(nn.Module):
    """w2(act(w1 x) * w3 x) for gated kinds (SwiGLU: SiLU, GEGLU: GELU; Shazeer 2020); w2(gelu(w1 x)) or
    w2(relu(w1 x)^2) (squared ReLU, So et al. 2021 "Primer") for plain ones."""

    def __init__(self, cfg: ModelConfig, hidden: int | None = None):
        super().__init__()
        hidden = hidden or ffn_hidden_size(cfg)
        self.kind = cfg.mlp
        self.w1 = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.n_embd, bias=False)
        self.w3 = nn.Linear(cfg.n_embd, hidden, bias=False) if cfg.mlp in ("swiglu", "geglu") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        if self.kind == "geglu":
            return self.w2(F.gelu(self.w1(x)) * self.w3(x))
        if self.kind == "relu2":
            return self.w2(F.relu(self.w1(x)).square())
        return self.w2(F.gelu(self.w1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        # ModernBERT's first block has no attention norm: the embedding norm's output is its input and the residual stream
        self.attention_norm = make_norm(cfg, cfg.n_embd) if layer_id > 0 or cfg.first_attention_norm else nn.Identity()
        self.attention = Attention(cfg, layer_id)
        self.ffn_norm = make_norm(cfg, cfg.n_embd)
        self.feed_forward = FeedForward(cfg, layer_sizes(cfg, layer_id)[2])
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x, cos, sin, kv_cache=None, start_pos=0, attn_mask=None, ve=None):
        ve = compute_dtype(ve) if ve is not None else None
        x = x + self.dropout(self.attention(compute_dtype(self.attention_norm(x)), cos, sin, kv_cache, start_pos, attn_mask, ve=ve))
        return x + self.dropout(self.feed_forward(compute_dtype(self.ffn_norm(x))))


class PredictionHead(nn.Module):
    """BERT's and ModernBERT's transform before the decoder: norm(GELU(dense(h))), dense without a bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.norm = make_norm(cfg, cfg.n_embd)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(h)))


class Smear(nn.Module):
    """x_t + scale * sigmoid(gate(x_t[:12])) * x_{t-1} over the token embeddings: each token sees the one
    before it before the first block, a bigram feature that attention would otherwise have to learn
    (modded-nanogpt's "smear"). Scale and gate start at zero: the embeddings pass unchanged at first."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(min(SMEAR_GATE_CHANNELS, cfg.n_embd), 1, bias=False)
        self.scale = nn.Parameter(torch.empty(1))

    def forward(self, x: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) embeddings; `previous` (B, T, C) the embedding at the position before each (zeros at position 0)."""
        return x + self.scale * torch.sigmoid(self.gate(x[..., : self.gate.in_features])) * previous


def compute_dtype(h: torch.Tensor) -> torch.Tensor:
    """`h` in autocast's dtype, when autocast is on. A norm's output (fp32: the residual stream is fp32)
    feeds several projections, and autocast would cast it once per projection, forward and backward
    (q, k, v; gate and up): one cast here gives the same values at a third to a half of the copies."""
    if torch.is_autocast_enabled(h.device.type):
        return h.to(torch.get_autocast_dtype(h.device.type))
    return h


# ---------------------------------------------------------------------------------------------
# the loss, outside the model (a pipeline's last stage and tensor parallel's loss_parallel need it there)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy in fp32 over targets that are not IGNORE_INDEX, plus `z_loss` times the
    mean of log(Z)^2, Z the softmax normaliser (PaLM, Chowdhery et al. 2022: it keeps log Z near 0
    and the output logits from drifting; 1e-4 there).

    logits (B, T, V) against targets (B, T); or sparse logits (M, V) from the masked objective
    against the (B, T) targets whose M non-ignored entries they predict, in row-major order."""
    if logits.dim() == 2 and targets.dim() == 2:
        targets = targets[targets != IGNORE_INDEX]  # (M,), the order of forward's index_select
    logits, targets = logits.flatten(0, -2).float(), targets.reshape(-1)  # (N, V), (N,)
    if not z_loss:
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    # cross-entropy = log Z - logit[target]: one logsumexp serves both terms
    keep = targets != IGNORE_INDEX
    lse = torch.logsumexp(logits, dim=-1)  # (N,) log Z
    picked = logits.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)  # (N,)
    n = keep.sum()
    return (((lse - picked) + z_loss * lse.square()) * keep).sum() / n


def compute_loss(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0) -> torch.Tensor:
    """The training loss of a (possibly wrapped) Transformer on one batch."""
    return model(idx, targets=targets, loss=True, z_loss=z_loss)


# ---------------------------------------------------------------------------------------------
# the model


def _init_normal(p: torch.Tensor, std: float, seed: int) -> None:
    """Fill `p` (a tensor or a sharded DTensor) with N(0, std) drawn from a generator seeded by `seed`."""
    local = p.to_local() if hasattr(p, "device_mesh") else p
    gen = torch.Generator(device=local.device).manual_seed(seed)
    full = torch.empty(p.shape, dtype=p.dtype, device=local.device).normal_(0.0, std, generator=gen)
    if local is not p:
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()  # this rank's slice
    local.copy_(full)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size  # real ids are < vocab_size; ids up to padded_vocab_size are never produced
        self.padded_vocab_size = padded_vocab_size(cfg.vocab_size)
        self.head_dim = cfg.n_embd // cfg.n_head
        self.tok_embeddings = nn.Embedding(self.padded_vocab_size, cfg.n_embd)
        self.embed_norm = make_norm(cfg, cfg.n_embd) if cfg.embed_norm else None  # Cramming's embedding LayerNorm
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layer)})
        self.norm = make_norm(cfg, cfg.n_embd)
        self.mlm_head = PredictionHead(cfg) if cfg.mlm_head else None
        self.output = nn.Linear(cfg.n_embd, self.padded_vocab_size, bias=False)
        self.tie_weights()
        self.smear = Smear(cfg) if cfg.smear else None
        # one table per block that has them, as wide as that block's keys/values (empty: no parameters, no checkpoint keys)
        self.value_embeddings = nn.ModuleDict(
            {str(i): nn.Embedding(self.padded_vocab_size, layer_sizes(cfg, i)[1] * self.head_dim) for i in value_embedding_layers(cfg)}
        )
        # Rotary tables are derived state, not weights: non-persistent, recomputed by init_weights().
        cos, sin = rope_tables(cfg.seq_len, self.head_dim, cfg.rope_theta, device=self.tok_embeddings.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @classmethod
    def build(cls, cfg: ModelConfig, device: torch.device | str = "cpu", seed: int | None = None) -> Transformer:
        """Construct on `meta` (no memory, no init cost), allocate on `device`, then initialise.

        Deterministic given `torch.manual_seed` (or `seed`). Parallelism goes between the two halves:
        `on_meta`, then `budgetlm.distributed.parallelize`, then `materialize`, so no rank ever
        allocates the whole unsharded model."""
        model = cls.on_meta(cfg)
        model.materialize(device, seed)
        return model

    @classmethod
    def on_meta(cls, cfg: ModelConfig) -> Transformer:
        with torch.device("meta"):
            return cls(cfg)

    def materialize(self, device: torch.device | str, seed: int | None = None) -> Transformer:
        """Allocate the (possibly sharded) parameters on `device` and initialise them."""
        self.to_empty(device=device)
        self.tie_weights()  # to_empty allocates a fresh tensor per module, which unties shared parameters
        self.init_weights(seed)
        return self

    def tie_weights(self) -> None:
        # Weight tying (Press & Wolf 2017): the output projection reuses the input embedding.
        if self.cfg.tie_embeddings and self.output is not None and self.tok_embeddings is not None:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """N(0, init_std) for every matrix; the two projections that write into the residual stream
        (attention.wo, feed_forward.w2) scaled by 1/sqrt(2 n_layer) as in GPT-2 (Radford et al. 2019),
        so the residual's variance does not grow with depth. Norm weights 1 (embed_norm included), rotary tables recomputed.

        Value embeddings are drawn like the token embedding; their gates and the smear start at zero.

        Each matrix is drawn from its own generator, seeded by `seed` (default: one draw from torch's
        global generator) and the parameter's name, so the values do not depend on the layout: a
        pipeline stage that lacks other layers, or a rank holding one shard (each rank draws the whole
        matrix, one at a time, and keeps its own slice), gets exactly the single-process weights."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("ve_gate.weight", "smear.gate.weight", "smear.scale")):
                p.zero_()  # gates that start neutral: value embeddings at 1, no smear
                continue
            if p.dim() == 1:
                p.fill_(1.0)  # norm weights (no biases anywhere)
                continue
            residual = name.endswith(("attention.wo.weight", "feed_forward.w2.weight"))
            if residual and self.cfg.zero_init_residual:  # each block starts as the identity (modded-nanogpt, nanochat)
                p.zero_()
                continue
            sd = residual_std if residual else std
            name = name.replace("_checkpoint_wrapped_module.", "")  # activation checkpointing's wrapper
            _init_normal(p, sd, (seed + zlib.crc32(name.encode())) % 2**63)
        cos, sin = rope_tables(self.cfg.seq_len, self.head_dim, self.cfg.rope_theta, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    # -- forward -------------------------------------------------------------------------------

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        kv_cache: KVCacheLike | None = None,
        start_pos: int | torch.Tensor = 0,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The residual stream after the last block, before the final norm: (B, T, C).

        `idx` is (B, T) token ids, or (B, T, C) hidden states on a pipeline stage that does not own
        the embedding (`tok_embeddings` is None there). `attn_mask` (bool, broadcastable to
        (B, nh, T, T), True = may attend) is for callers such as fine-tuning heads that batch padded
        sequences; pretraining packs sequences and needs none.

        `start_pos` is the position of idx[:, 0]: one int for the batch, or a (B,) tensor when the rows
        sit at different positions (a server decoding sequences of unequal lengths together). Per-row
        positions need an `attn_mask` (B, 1, T, L) saying which of the cache's L keys each query sees."""
        B, T = idx.shape[:2]
        if isinstance(start_pos, torch.Tensor):
            last = int(start_pos.max()) + T
            pos = start_pos[:, None] + torch.arange(T, device=start_pos.device)  # (B, T)
            cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]  # (B, 1, T, hs/2)
        else:
            last = start_pos + T
            cos = self.rope_cos[start_pos : start_pos + T]  # (T, hs/2)
            sin = self.rope_sin[start_pos : start_pos + T]
        if last > self.cfg.seq_len:
            raise ValueError(f"positions up to {last - 1} exceed the context length {self.cfg.seq_len}")
        if self.tok_embeddings is not None:  # a pipeline stage after the first gets hidden states
            x = self.tok_embeddings(idx)  # (B, T, C)
            x = x if self.embed_norm is None else self.embed_norm(x)
            if self.smear is not None:
                x = self.smear(x, previous_positions(x, kv_cache, start_pos))
            x = self.dropout(x)
        else:
            x = idx
        for key, layer in self.layers.items():  # a pipeline stage holds only its own layers (keys unchanged)
            ve = self.value_embeddings[key](idx) if key in self.value_embeddings else None
            x = layer(x, cos, sin, kv_cache, start_pos, attn_mask, ve=ve)
        return x

    def forward(
        self,
        idx: torch.Tensor,
        *,
        targets: torch.Tensor | None = None,
        kv_cache: KVCacheLike | None = None,
        start_pos: int | torch.Tensor = 0,
        attn_mask: torch.Tensor | None = None,
        loss: bool = False,
        z_loss: float = 0.0,
    ) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, padded_vocab_size) in fp32 (the loss is `lm_loss`),
        soft-capped to (-cap, cap) when `model.logit_softcap` is set. With `loss=True` (and `targets`),
        the scalar `lm_loss(logits, targets, z_loss)` instead, computed without materialising the
        logits where it can (`budgetlm.linear_cross_entropy`); the loss is computed here, inside
        forward, so data-parallel wrappers (DDP, FSDP2) see the output weight used in their forward.

        Masked objective with `targets` (B, T; IGNORE_INDEX = no loss): only the masked positions are
        normed and projected (Cramming's sparse prediction), giving (M, padded_vocab_size) logits in
        the row-major order of the masked positions; `lm_loss(logits, targets)` pairs them up. The
        causal objective ignores `targets` (the caller shifts: idx = w[:, :-1], targets = w[:, 1:]).

        A pipeline stage without the final norm / output projection returns its hidden states.
        `start_pos` and `attn_mask` are as for `hidden_states`."""
        x = self.hidden_states(idx, kv_cache=kv_cache, start_pos=start_pos, attn_mask=attn_mask)  # (B, T, C)
        if self.output is None:
            return x
        if targets is not None and self.cfg.objective == "masked":
            keep = (targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)  # (M,) masked positions only
            x = x.reshape(-1, x.size(-1)).index_select(0, keep)  # (M, C)
        h = self.norm(x)
        if self.mlm_head is not None:
            h = self.mlm_head(h)
        if loss:
            if self._chunked_loss_ok():
                kept = targets[targets != IGNORE_INDEX] if self.cfg.objective == "masked" else targets
                return linear_cross_entropy(h, self.output.weight, kept, z_loss)
            return lm_loss(self._logits(h), targets, z_loss)
        return self._logits(h)

    def _chunked_loss_ok(self) -> bool:
        """The chunked loss needs the whole output matrix as a plain tensor (tensor parallelism shards it
        into a DTensor), no soft-capping, and eager mode (compiled, the plain loss fuses as well)."""
        w = self.output.weight
        return not hasattr(w, "device_mesh") and self.cfg.logit_softcap == 0 and not torch.compiler.is_compiling()

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.output(h).float()  # fp32 logits: a stable softmax in bf16 training
        if self.cfg.logit_softcap > 0:  # Gemma 2 (Team et al. 2024), nanochat: smooth bound on the logits
            cap = self.cfg.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    # -- accounting ----------------------------------------------------------------------------

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters, counting a tied embedding once. `exclude_embeddings` drops the embedding tables (the
        token embedding, shared with the output projection when tied, and any value embeddings), Kaplan
        et al. 2020's "non-embedding" count.
        Counts global shapes, so a sharded (FSDP/TP) model reports its whole size."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if exclude_embeddings and self.tok_embeddings is not None:
            n -= self.tok_embeddings.weight.numel()
        if exclude_embeddings:
            n -= sum(p.numel() for p in self.value_embeddings.parameters())  # lookups, like the token embedding
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), the PaLM (Chowdhery et al. 2022, appendix B)
        and nanoGPT convention: 6 N for the matmuls with N = non-embedding parameters including the
        output projection, plus 12 * n_layer * n_embd * seq_len for attention scores and values
        (2 matmuls of T x hs per head, x3 for backward, full T: the causal half is not discounted).
        Norms, activations and the softmax are ignored; the masked objective's sparse prediction
        makes the true count a little lower (the output matmul runs on masked positions only)."""
        T = self.cfg.seq_len if seq_len is None else seq_len
        N = self.num_params(exclude_embeddings=True)
        if self.cfg.tie_embeddings:
            N += self.output.weight.numel()  # the tied matrix is not a lookup on the output side: it is a matmul
        attn_width = sum(layer_sizes(self.cfg, i)[0] for i in range(self.cfg.n_layer)) * self.head_dim  # n_layer * n_embd unpruned
        return 6 * N + 12 * attn_width * T
