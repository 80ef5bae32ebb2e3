"""Qwen3 with budgetlm's token features: the modeling file written next to an exported causal model
that has value embeddings or the smear (what the budget's plan turns on for small models), so
`transformers` loads and generates with it using no budgetlm code:

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

No family in `transformers` has either feature. Qwen3 holds everything else (Llama's blocks plus
QK-norm, which `qk_norm: false` turns off); this file adds, with budgetlm's arithmetic:

- value embeddings (ResFormer's value residual, as nanochat gates it): in each listed block a
  second token embedding `self_attn.value_embed`, added to the values before attention through a
  gate per key/value head, `2 sigmoid(ve_gate(h[..., :32]))`, where h is the block's normed input;
- the smear (modded-nanogpt): before the first block each token's embedding takes a gated share of
  the previous token's, `x_t + scale sigmoid(gate(x_t[..., :12])) x_(t-1)`, zeros before the first
  token (and before the first token a left-padding mask lets through).

The smear needs the previous token's id when generation feeds one new token at a time: the
`ForCausalLM`'s `prepare_inputs_for_generation` passes it from the whole sequence as
`previous_token_ids` (-1: none), so greedy, sampled and beam-searched outputs are the full forward
pass's. Everything but the attention and the embedding step is Qwen3's own code, imported from the
installed `transformers`.

This file must import nothing but torch and transformers: it is copied into exported directories."""

import torch
from torch import nn
from transformers import Qwen3Config
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen3 import modeling_qwen3 as qwen3

VALUE_GATE_CHANNELS = 32
SMEAR_GATE_CHANNELS = 12


class Qwen3TokenFeaturesConfig(Qwen3Config):
    model_type = "qwen3_token_features"
    qk_norm: bool = True
    value_embedding_layers: list | None = None  # block indices with a value embedding
    smear: bool = False


class Qwen3TokenFeaturesAttention(qwen3.Qwen3Attention):
    def __init__(self, config: Qwen3TokenFeaturesConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        if not config.qk_norm:
            self.q_norm = self.k_norm = nn.Identity()
        self.value_embed = self.ve_gate = None
        if layer_idx in (config.value_embedding_layers or ()):
            n_kv = config.num_key_value_heads
            self.value_embed = nn.Embedding(config.vocab_size, n_kv * self.head_dim)
            self.ve_gate = nn.Linear(min(VALUE_GATE_CHANNELS, config.hidden_size), n_kv, bias=False)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, token_ids=None, **kwargs):
        cache = kwargs.pop("cache", None)  # (an empty cache is falsy: no `or` here)
        cache = kwargs.pop("past_key_values", None) if cache is None else cache  # transformers before 5 names it so
        heads = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_norm(self.q_proj(hidden_states).view(heads)).transpose(1, 2)
        k = self.k_norm(self.k_proj(hidden_states).view(heads)).transpose(1, 2)
        v = self.v_proj(hidden_states).view(heads)
        if self.value_embed is not None:
            if token_ids is None:
                raise ValueError("value embeddings look up the token ids: call the model with input_ids, not inputs_embeds")
            gate = 2 * torch.sigmoid(self.ve_gate(hidden_states[..., : self.ve_gate.in_features]))
            v = v + gate.unsqueeze(-1) * self.value_embed(token_ids).view(heads)
        v = v.transpose(1, 2)
        cos, sin = position_embeddings
        q, k = qwen3.apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, qwen3.eager_attention_forward)
        dropout = self.attention_dropout if self.training else 0.0
        out, weights = attend(self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling, sliding_window=self.sliding_window, **kwargs)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


class Smear(nn.Module):
    def __init__(self, config: Qwen3TokenFeaturesConfig):
        super().__init__()
        self.gate = nn.Linear(min(SMEAR_GATE_CHANNELS, config.hidden_size), 1, bias=False)
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        return x + self.scale * torch.sigmoid(self.gate(x[..., : self.gate.in_features])) * previous


def ids_before(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """For each position, the id of the token before it; -1 before the first token, and where the
    one before is padding (a 2-D mask of the same length)."""
    prev = nn.functional.pad(input_ids[:, :-1], (1, 0), value=-1)
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape == input_ids.shape:
        prev = prev.masked_fill(nn.functional.pad(attention_mask[:, :-1], (1, 0)) == 0, -1)
    return prev


class Qwen3TokenFeaturesModel(qwen3.Qwen3Model):
    config_class = Qwen3TokenFeaturesConfig

    def __init__(self, config: Qwen3TokenFeaturesConfig):
        super().__init__(config)
        for i, layer in enumerate(self.layers):
            layer.self_attn = Qwen3TokenFeaturesAttention(config, i)
        self.smear = Smear(config) if config.smear else None
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, previous_token_ids=None, **kwargs):
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("this model's token features look up the token ids: call it with input_ids, not inputs_embeds")
        x = self.embed_tokens(input_ids)
        if self.smear is not None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if previous_token_ids is None:  # a whole sequence; decoding after cached tokens must say what came before
                if cache is not None and cache.get_seq_length() > 0:
                    raise ValueError("the smear needs the token before each new one: pass previous_token_ids (generate() does)")
                previous_token_ids = ids_before(input_ids, attention_mask)
            before = self.embed_tokens(previous_token_ids.clamp(min=0)) * (previous_token_ids >= 0).unsqueeze(-1)
            x = self.smear(x, before)
        return super().forward(attention_mask=attention_mask, inputs_embeds=x, token_ids=input_ids, **kwargs)


class Qwen3TokenFeaturesForCausalLM(qwen3.Qwen3ForCausalLM):
    config_class = Qwen3TokenFeaturesConfig

    def __init__(self, config: Qwen3TokenFeaturesConfig):
        super().__init__(config)
        self.model = Qwen3TokenFeaturesModel(config)
        self.post_init()

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, attention_mask=attention_mask, **kwargs)
        if self.config.smear and inputs.get("input_ids") is not None:
            n = inputs["input_ids"].shape[1]
            inputs["previous_token_ids"] = ids_before(input_ids, attention_mask)[:, -n:]
        return inputs


# Qwen3's task classes build their body with `AutoModel.from_config`, which does not know this file's config: these
# build it directly, with the heads Qwen3's task classes have (their forward passes are Qwen3's own).


class Qwen3TokenFeaturesForSequenceClassification(qwen3.Qwen3ForSequenceClassification):
    config_class = Qwen3TokenFeaturesConfig

    def __init__(self, config: Qwen3TokenFeaturesConfig):
        qwen3.Qwen3PreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = Qwen3TokenFeaturesModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()


class Qwen3TokenFeaturesForTokenClassification(qwen3.Qwen3ForTokenClassification):
    config_class = Qwen3TokenFeaturesConfig

    def __init__(self, config: Qwen3TokenFeaturesConfig):
        qwen3.Qwen3PreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = Qwen3TokenFeaturesModel(config)
        self.dropout = nn.Dropout(0.1 if getattr(config, "classifier_dropout", None) is None else config.classifier_dropout)  # as Qwen3's
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=getattr(config, "token_classification_bias", True))
        self.post_init()


AUTO_MAP = {
    "AutoConfig": "Qwen3TokenFeaturesConfig",
    "AutoModel": "Qwen3TokenFeaturesModel",
    "AutoModelForCausalLM": "Qwen3TokenFeaturesForCausalLM",
    "AutoModelForSequenceClassification": "Qwen3TokenFeaturesForSequenceClassification",
    "AutoModelForTokenClassification": "Qwen3TokenFeaturesForTokenClassification",
}
