"""budgetlm's masked LayerNorm layout as transformers' ModernBERT (`ModernBertForMaskedLM` and its classifiers).

ModernBERT's blocks, checked against transformers' `modeling_modernbert.py`, and what takes each here:

    embeddings       tok_embeddings, then LayerNorm          model.embed_norm=true
    block 0          no attention norm: it reads the         model.first_attention_norm=false
                     normalised embeddings as they are
    attention        one Wqkv = [wq; wk; wv], rotate-half    separate wq, wk, wv (concatenated here); n_kv_head = n_head
                     rotary positions, no biases
    MLP              Wi = [gate; value] split in halves,     w1 (activation side) and w3, concatenated; geglu -> gelu,
                     Wo(act(gate) * value), no biases        swiglu -> silu
    norms            LayerNorm, norm_bias=false, one eps     model.norm=layernorm (budgetlm's LayerNorms have no bias)
    final norm       LayerNorm                               norm
    masked-LM head   norm(GELU(dense(h))), dense unbiased    model.mlm_head=true
                     (classifier_bias=false)
    decoder          tied or not, decoder_bias=false         output

Attention is global in every block (`layer_types` all "full_attention"; the sliding-window branch is never
built), with the run's rotary base for both kinds. `sparse_prediction` stays off: it only changes which
positions a loss sees. Padding is an `attention_mask` over keys, as budgetlm's fine-tuning masks them.
The classifiers (`...ForSequenceClassification` pools "cls" or "mean", `...ForTokenClassification`) run
`head` (the prediction head: budgetlm's fine-tuning starts from and trains the same one) then `classifier`.
"""

from __future__ import annotations

import re

import torch

from budgetlm.config import ModelConfig

ACT = {"geglu": "gelu", "swiglu": "silu"}  # exact erf GELU in both libraries (transformers' ACT2FN "gelu")
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_RENAME = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.wo.weight": "attn.Wo.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "feed_forward.w2.weight": "mlp.Wo.weight",
}
_TOP = {
    "tok_embeddings.weight": "model.embeddings.tok_embeddings.weight",
    "embed_norm.weight": "model.embeddings.norm.weight",
    "norm.weight": "model.final_norm.weight",
    "mlm_head.dense.weight": "head.dense.weight",
    "mlm_head.norm.weight": "head.norm.weight",
    "output.weight": "decoder.weight",
}


def modernbert_refusal(cfg: ModelConfig) -> str | None:
    """Why `cfg` is not ModernBERT's layout (the first option that differs), or None when it is."""
    wants = [
        ("norm", "layernorm"),
        ("embed_norm", True),
        ("first_attention_norm", False),
        ("mlm_head", True),
        ("qk_norm", False),
        ("logit_softcap", 0.0),
    ]
    for key, want in wants:
        if getattr(cfg, key) != want:
            return f"model.{key}={getattr(cfg, key)!r} (ModernBERT has {key}={want!r})"
    if cfg.mlp not in ACT:
        return f"model.mlp={cfg.mlp!r} (ModernBERT's MLP is gated: geglu or swiglu)"
    if (cfg.n_kv_head or cfg.n_head) != cfg.n_head:
        return f"model.n_kv_head={cfg.n_kv_head} (ModernBERT has no grouped-query attention)"
    return None


def modernbert_config_kwargs(cfg: ModelConfig) -> dict:
    """`transformers.ModernBertConfig` keyword arguments describing the same network."""
    from budgetlm.model import ffn_hidden_size, padded_vocab_size

    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return dict(
        vocab_size=padded_vocab_size(cfg.vocab_size),
        hidden_size=cfg.n_embd,
        intermediate_size=ffn_hidden_size(cfg),
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        hidden_activation=ACT[cfg.mlp],
        max_position_embeddings=cfg.seq_len,
        norm_eps=cfg.norm_eps,
        norm_bias=False,
        attention_bias=False,
        mlp_bias=False,
        decoder_bias=False,
        classifier_bias=False,
        classifier_activation="gelu",
        layer_types=["full_attention"] * cfg.n_layer,
        global_attn_every_n_layers=1,  # what configs written before `layer_types` say: every block global
        local_attention=cfg.seq_len * 2,  # never used (no sliding block); a window over the whole context regardless
        rope_parameters={"full_attention": dict(rope), "sliding_attention": dict(rope)},
        tie_word_embeddings=cfg.tie_embeddings,
        attention_dropout=0.0,
        embedding_dropout=0.0,
        mlp_dropout=0.0,
        classifier_dropout=0.0,
        sparse_prediction=False,
        initializer_range=cfg.init_std,
    )


def to_modernbert_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The body's weights under ModernBERT names (a tied decoder left out: transformers re-ties it)."""
    state = {k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if name == "output.weight" and model.cfg.tie_embeddings:
            continue
        if name in _TOP:
            out[_TOP[name]] = tensor
            continue
        m = _LAYER.fullmatch(name)
        if m is None:
            raise KeyError(f"no ModernBERT name for parameter '{name}'")
        i, rest = m.groups()
        if rest in _RENAME:
            out[f"model.layers.{i}.{_RENAME[rest]}"] = tensor
        else:  # wq/wk/wv -> Wqkv, w1/w3 -> Wi
            fused.setdefault(i, {})[rest] = tensor
    for i, parts in fused.items():
        out[f"model.layers.{i}.attn.Wqkv.weight"] = torch.cat([parts[f"attention.w{x}.weight"] for x in "qkv"])
        out[f"model.layers.{i}.mlp.Wi.weight"] = torch.cat([parts["feed_forward.w1.weight"], parts["feed_forward.w3.weight"]])
    return {k: v.contiguous() for k, v in out.items()}


# budgetlm LoRA target -> (ModernBERT module, its part of the fused output, how many parts)
LORA_PARTS = {"wq": ("attn.Wqkv", 0, 3), "wk": ("attn.Wqkv", 1, 3), "wv": ("attn.Wqkv", 2, 3), "wo": ("attn.Wo", 0, 1),
              "w1": ("mlp.Wi", 0, 2), "w3": ("mlp.Wi", 1, 2), "w2": ("mlp.Wo", 0, 1)}  # fmt: skip


def fused_lora(lora: dict[str, dict[str, torch.Tensor]], rank: int, alpha: float) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, float]]:
    """budgetlm's per-matrix LoRA as LoRA on ModernBERT's fused modules, the same update exactly.

    `lora`: {"layers.{i}.attention.wq": {"A": (r, in), "B": (out, r)}, ...}. Targets sharing a fused module
    (wq and wv in Wqkv) become one LoRA of rank r x their count: A stacked, B block-diagonal within the
    fused output (zero rows for the parts no target adapts). PEFT scales by alpha / rank, so the fused
    module's alpha grows with its rank and every part keeps the scale alpha / r.
    Returns the PEFT weights (`...{module}.lora_A.weight`) and the rank and alpha of each fused module."""
    groups: dict[str, list[tuple[int, int, torch.Tensor, torch.Tensor]]] = {}
    for name, w in lora.items():
        m = _LAYER.fullmatch(name)
        target = m.group(2).rsplit(".", 1)[-1]
        module, part, parts = LORA_PARTS[target]
        groups.setdefault(f"model.layers.{m.group(1)}.{module}", []).append((part, parts, w["A"], w["B"]))
    state, ranks, alphas = {}, {}, {}
    for module, items in groups.items():
        items.sort(key=lambda t: t[0])
        out_part, parts = items[0][3].shape[0], items[0][1]
        A = torch.cat([a for _, _, a, _ in items])
        B = torch.zeros(out_part * parts, rank * len(items))
        for j, (part, _, _, b) in enumerate(items):
            B[part * out_part : (part + 1) * out_part, j * rank : (j + 1) * rank] = b
        state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = A.contiguous(), B
        key = module.split(".", 3)[-1]  # attn.Wqkv: the same in every block; PEFT matches a pattern against the name's end
        ranks[key], alphas[key] = rank * len(items), alpha * len(items)
    return state, ranks, alphas
