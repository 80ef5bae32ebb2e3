"""Logit parity with Hugging Face `LlamaForCausalLM` through the name map in budgetlm.hf_names."""

import pytest
import torch

from budgetlm.config import ModelConfig
from budgetlm.hf_names import from_hf_llama_state_dict, llama_config_kwargs, to_hf_llama_state_dict
from budgetlm.model import Transformer

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("tie, n_kv_head", [(True, 0), (False, 2)])
def test_logits_match_hf_llama(tie, n_kv_head):
    cfg = ModelConfig(
        n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64, vocab_size=100, seq_len=48, rope_theta=500.0, norm_eps=1e-6, tie_embeddings=tie
    )
    torch.manual_seed(0)
    ours = Transformer.build(cfg).eval()
    # norms away from 1 so a mapping mistake between the norm weights would show
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config_kwargs(cfg))).eval()
    result = hf.load_state_dict(to_hf_llama_state_dict(ours), strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == (["lm_head.weight"] if tie else [])
    if tie:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    idx = torch.randint(0, 100, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits.float(), atol=1e-4, rtol=1e-4)


def test_name_map_round_trips():
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=100, seq_len=16, tie_embeddings=False)
    model = Transformer.build(cfg)
    back = from_hf_llama_state_dict(to_hf_llama_state_dict(model))
    assert back.keys() == model.state_dict().keys()


def test_non_llama_configs_are_refused():
    with pytest.raises(ValueError, match="objective"):
        llama_config_kwargs(ModelConfig(objective="masked", vocab_size=100))
    with pytest.raises(ValueError, match="qk_norm"):
        llama_config_kwargs(ModelConfig(qk_norm=True, vocab_size=100))


def test_softcapped_logits_match_hf_llama_capped_as_gemma2_does():
    """HF has the soft-cap in Gemma 2 (`final_logit_softcapping`, 30 there), applied to the head's output as
    logits / cap -> tanh -> * cap; Llama has none, so a capped model does not export to Llama."""
    assert transformers.Gemma2Config().final_logit_softcapping == 30.0
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=100, seq_len=16, init_std=0.3, logit_softcap=4.0)
    torch.manual_seed(0)
    ours = Transformer.build(cfg).eval()
    uncapped = Transformer.build(ModelConfig(**{**cfg.__dict__, "logit_softcap": 0.0}))
    uncapped.load_state_dict(ours.state_dict())
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config_kwargs(uncapped.cfg))).eval()
    hf.load_state_dict(to_hf_llama_state_dict(uncapped), strict=False)
    idx = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        raw = hf(idx).logits.float()
        assert raw.abs().max() > 8.0  # the cap bites
        gemma2 = torch.tanh(raw / 4.0) * 4.0  # Gemma2ForCausalLM.forward's final_logit_softcapping
        torch.testing.assert_close(ours(idx), gemma2, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="logit_softcap"):
        to_hf_llama_state_dict(ours)
