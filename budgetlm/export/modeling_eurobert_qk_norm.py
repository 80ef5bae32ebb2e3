"""EuroBERT with QK-norm: the modeling file written next to an exported masked budgetlm model that has
`model.qk_norm` on (the planner's default), so `transformers` loads it with no budgetlm code:

    AutoModelForMaskedLM.from_pretrained(DIR, trust_remote_code=True)

No masked-LM family in `transformers` normalises queries and keys, so none holds such a model
exactly. EuroBERT holds everything else (Llama's blocks without the causal mask); this file adds
Qwen3's QK-norm to it: queries and keys RMS-normalised per head, with a learned gain, before rotary,
weights named `self_attn.q_norm` / `self_attn.k_norm` as Qwen3 names them. Everything but the
attention is EuroBERT's own code, imported from the installed `transformers`.

This file must import nothing but torch and transformers: it is copied into exported directories."""

from transformers import EuroBertConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.eurobert import modeling_eurobert as eurobert


class EuroBertQKNormConfig(EuroBertConfig):
    model_type = "eurobert_qk_norm"


class EuroBertQKNormAttention(eurobert.EuroBertAttention):
    def __init__(self, config: EuroBertQKNormConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.q_norm = eurobert.EuroBertRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = eurobert.EuroBertRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        kwargs.pop("cache", None)  # an encoder keeps no cache
        kwargs.pop("past_key_values", None)
        heads = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_norm(self.q_proj(hidden_states).view(heads)).transpose(1, 2)
        k = self.k_norm(self.k_proj(hidden_states).view(heads)).transpose(1, 2)
        v = self.v_proj(hidden_states).view(heads).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = eurobert.apply_rotary_pos_emb(q, k, cos, sin)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eurobert.eager_attention_forward)
        dropout = self.attention_dropout if self.training else 0.0
        out, weights = attend(self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


class _WithQKNorm:
    """Builds the EuroBERT class it is mixed into, then swaps each block's attention for the QK-norm one."""

    config_class = EuroBertQKNormConfig

    def __init__(self, config: EuroBertQKNormConfig):
        super().__init__(config)
        body = getattr(self, "model", self)  # the task classes hold the EuroBertModel as `model`
        for i, layer in enumerate(body.layers):
            layer.self_attn = EuroBertQKNormAttention(config, i)
        self.post_init()  # initialise the replaced attention as EuroBERT does (from_config; from_pretrained loads every weight)


class EuroBertQKNormModel(_WithQKNorm, eurobert.EuroBertModel):
    pass


class EuroBertQKNormForMaskedLM(_WithQKNorm, eurobert.EuroBertForMaskedLM):
    pass


class EuroBertQKNormForSequenceClassification(_WithQKNorm, eurobert.EuroBertForSequenceClassification):
    pass


class EuroBertQKNormForTokenClassification(_WithQKNorm, eurobert.EuroBertForTokenClassification):
    pass


AUTO_MAP = {
    "AutoConfig": "EuroBertQKNormConfig",
    "AutoModel": "EuroBertQKNormModel",
    "AutoModelForMaskedLM": "EuroBertQKNormForMaskedLM",
    "AutoModelForSequenceClassification": "EuroBertQKNormForSequenceClassification",
    "AutoModelForTokenClassification": "EuroBertQKNormForTokenClassification",
}
