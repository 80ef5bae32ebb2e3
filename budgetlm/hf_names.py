"""The name map between budgetlm's causal Transformer and Hugging Face `LlamaForCausalLM`.

budgetlm keeps Llama/torchtitan parameter names and the "rotate-half" rotary layout that HF
Llama uses, so the conversion is a rename: no weight is permuted or reshaped. Used by the
parity test and by `budgetlm export`. Only the Llama-shaped configuration maps (causal,
RMSNorm, SwiGLU, no QK-norm, no embedding norm, no logit soft-cap); anything else raises ValueError naming the field.
"""

from __future__ import annotations

import re

import torch

from budgetlm.config import ModelConfig

# budgetlm suffix inside layers.{i}. -> HF suffix inside model.layers.{i}.
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    # QK-norm: Qwen3's names (Llama has none; `check_llama_compatible` refuses qk_norm)
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    # value embeddings' gates: the exported modeling file's names (`budgetlm/export/modeling_qwen3_token_features.py`)
    "attention.ve_gate.weight": "self_attn.ve_gate.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "smear.gate.weight": "model.smear.gate.weight",
    "smear.scale": "model.smear.scale",
}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")
# a block's value embedding sits in its attention in the exported modeling file, at the model's top in budgetlm
_VALUE_EMBEDDING_RE = re.compile(r"value_embeddings\.(\d+)\.weight")
_HF_VALUE_EMBEDDING_RE = re.compile(r"model\.layers\.(\d+)\.self_attn\.value_embed\.weight")


def check_llama_compatible(cfg: ModelConfig) -> None:
    llama = {"objective": "causal", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": False, "embed_norm": False, "logit_softcap": 0.0}
    for field, want in llama.items():
        if getattr(cfg, field) != want:
            raise ValueError(f"only Llama-shaped models map to Hugging Face Llama: model.{field} is {getattr(cfg, field)!r}, needs {want!r}")


def to_hf_name(name: str) -> str:
    """budgetlm parameter name -> HF Llama name (KeyError for a name with no counterpart)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    if m := _VALUE_EMBEDDING_RE.fullmatch(name):
        return f"model.layers.{m.group(1)}.self_attn.value_embed.weight"
    m = _LAYER_RE.fullmatch(name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise KeyError(f"no Hugging Face Llama name for parameter '{name}'")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"


def from_hf_name(name: str) -> str:
    """HF Llama name -> budgetlm parameter name (the inverse of `to_hf_name`)."""
    inverse_top = {v: k for k, v in _TOP_NAMES.items()}
    if name in inverse_top:
        return inverse_top[name]
    if m := _HF_VALUE_EMBEDDING_RE.fullmatch(name):
        return f"value_embeddings.{m.group(1)}.weight"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    inverse_layer = {v: k for k, v in _LAYER_NAMES.items()}
    if m is None or m.group(2) not in inverse_layer:
        raise KeyError(f"no budgetlm name for Hugging Face parameter '{name}'")
    return f"layers.{m.group(1)}.{inverse_layer[m.group(2)]}"


def to_hf_llama_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under HF Llama names. With tied embeddings `lm_head.weight` is left out
    (HF re-ties it from `tie_word_embeddings`; safetensors refuses shared tensors)."""
    check_llama_compatible(model.cfg)
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "output.weight" and model.cfg.tie_embeddings:
            continue
        out[to_hf_name(name)] = tensor
    return out


def from_hf_llama_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Llama weights under budgetlm names (rotary `inv_freq` buffers, if present, are dropped)."""
    return {from_hf_name(k): v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}


def llama_config_kwargs(cfg: ModelConfig) -> dict:
    """Keyword arguments for `transformers.LlamaConfig` describing the same network."""
    check_llama_compatible(cfg)
    return {**shape_kwargs(cfg), "hidden_act": "silu", "mlp_bias": False, "attention_dropout": cfg.dropout}


def shape_kwargs(cfg: ModelConfig) -> dict:
    """The config fields every Llama-layout family (Llama, Qwen3, EuroBERT) shares, from `cfg`.

    `vocab_size` is the padded size (the embedding's rows); ids beyond the tokenizer's vocabulary
    are never produced by budgetlm's generation, so the exported model should not be asked for them."""
    from budgetlm.model import ffn_hidden_size, padded_vocab_size

    return dict(
        vocab_size=padded_vocab_size(cfg.vocab_size),
        hidden_size=cfg.n_embd,
        intermediate_size=ffn_hidden_size(cfg),
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head or cfg.n_head,
        head_dim=cfg.n_embd // cfg.n_head,
        max_position_embeddings=cfg.seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        initializer_range=cfg.init_std,
    )
