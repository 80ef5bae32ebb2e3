"""A causal run as one llama.cpp GGUF file, written with the `gguf` package (llama.cpp's own writer).

The layout is what llama.cpp's `convert_hf_to_gguf.py` writes for the Hugging Face model that
`budgetlm export --format hf` writes: `llama` for a LlamaForCausalLM, `qwen3` for a run with
QK-norm (Qwen3ForCausalLM; budgetlm's defaults choose QK-norm):

    token_embd.weight, output_norm.weight, output.weight (left out when tied: llama.cpp reuses token_embd)
    blk.{i}.attn_norm / attn_q / attn_k / attn_v / attn_output / ffn_norm / ffn_gate / ffn_up / ffn_down .weight
    blk.{i}.attn_q_norm / attn_k_norm .weight (qwen3)
    {arch}.* hyper-parameters, tokenizer.ggml.* (model gpt2: byte-level BPE tokens, merges, token types, bos/eos/pad)

llama.cpp's `llama` applies rotary positions to interleaved pairs (i, i+1) where budgetlm and
Hugging Face pair i with i + head_dim/2, so the rows of attn_q / attn_k are permuted per head as
the convert script's `LlamaModel.permute` does; `unpermute` undoes it (the tests use it). Its
`qwen3` rotates halves (NEOX style) like budgetlm, so nothing is permuted there.

dtypes: f32, f16 (matrices in f16, norms in f32, as the convert script writes), q8_0 (matrices in
llama.cpp's 8-bit blocks of 32; a matrix whose rows are not a multiple of 32 falls back to f16).
The embedding keeps budgetlm's padded rows; the tokens past the tokenizer are `[PAD{id}]` of
type UNUSED, as the convert script pads. Refused: what llama.cpp's Llama cannot compute the same
way -- a GELU-gated MLP, LayerNorm, the embedding norm, the logit soft-cap -- and a
lowercasing tokenizer (llama.cpp's gpt2 tokenizer has no normaliser; NFC, the default, is a
no-op on text that is already NFC, as nearly all text is).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from budgetlm.errors import UserError
from budgetlm.export.hf import UNPLANNED

DTYPES = ("f32", "f16", "q8_0")
Q8_BLOCK = 32

# budgetlm name inside layers.{i}. -> llama.cpp name inside blk.{i}.
_LAYER_NAMES = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "attention.q_norm.weight": "attn_q_norm.weight",
    "attention.k_norm.weight": "attn_k_norm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "output.weight": "output.weight"}


def gguf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    _, i, rest = name.split(".", 2)
    return f"blk.{i}.{_LAYER_NAMES[rest]}"


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection (n_head * hs, C) from rotate-half to interleaved pairs, per head
    (`LlamaModel.permute` of llama.cpp's convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_gguf_compatible(cfg, tokenizer) -> None:
    if cfg.objective != "causal":
        raise UserError("cannot export to GGUF: a masked model (llama.cpp's Llama is causal; use --format hf)")
    refusals = {
        "norm": cfg.norm != "rmsnorm",
        "mlp": cfg.mlp != "swiglu",
        "embed_norm": cfg.embed_norm,
        "logit_softcap": cfg.logit_softcap > 0,
        "value_embeddings": cfg.value_embeddings != "none",
        "smear": cfg.smear,
    }
    for option, bad in refusals.items():
        if bad:
            hint = f"; {UNPLANNED}, or export --format hf, whose modeling file has them" if option in ("value_embeddings", "smear") else ""
            raise UserError(f"cannot export to GGUF: model.{option}={getattr(cfg, option)!r} (llama.cpp's llama and qwen3 do not have it{hint})")
    data = json.loads(tokenizer.to_str())
    byte_level = data.get("model", {}).get("type") == "BPE" and "ByteLevel" in json.dumps(data.get("pre_tokenizer"))
    if tokenizer.kind != "bpe" or not byte_level:
        raise UserError("cannot export to GGUF: the tokenizer is not a byte-level BPE (llama.cpp's gpt2 tokenizer model)")
    if "Lowercase" in json.dumps(data.get("normalizer")):
        raise UserError("cannot export to GGUF: the tokenizer lowercases its input and llama.cpp's gpt2 tokenizer cannot")


def tokenizer_metadata(tokenizer, n_vocab: int) -> dict:
    """tokens, token types and merges in llama.cpp's gpt2 (byte-level BPE) form, padded to `n_vocab` ids."""
    import gguf

    data = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = dict(data["model"]["vocab"])
    for t in data.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
    by_id = {i: tok for tok, i in vocab.items()}
    specials = tokenizer.special_ids
    tokens, types = [], []
    for i in range(n_vocab):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    return {"tokens": tokens, "types": [int(t) for t in types], "merges": merges}


def _tensor_data(t: torch.Tensor, dtype: str):
    """(numpy data, raw ggml type or None) of one tensor in the file's dtype."""
    import gguf

    a = t.detach().to(torch.float32).cpu().numpy()
    if a.ndim == 1 or dtype == "f32":
        return a, None  # norms stay f32 in every file type
    if dtype == "q8_0" and a.shape[-1] % Q8_BLOCK == 0:
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return a.astype(np.float16), None


def export_gguf(run, out: Path, dtype: str = "f16") -> dict:
    """Write `out` (a .gguf file; a directory gets `model-<dtype>.gguf` inside)."""
    try:
        import gguf
    except ImportError:
        raise UserError("--format gguf needs the gguf package: pip install 'budgetlm[export]'") from None
    if dtype not in DTYPES:
        raise UserError(f"unknown GGUF dtype '{dtype}' (choose {', '.join(DTYPES)})")
    cfg, model, tok = run.config.model, run.model, run.tokenizer
    check_gguf_compatible(cfg, tok)
    out = Path(out)
    if out.suffix != ".gguf":
        out.mkdir(parents=True, exist_ok=True)
        out = out / f"model-{dtype}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)

    n_kv = cfg.n_kv_head or cfg.n_head
    arch = "qwen3" if cfg.qk_norm else "llama"
    writer = gguf.GGUFWriter(str(out) + ".tmp", arch)
    writer.add_name(run.dir.name)
    writer.add_context_length(cfg.seq_len)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(model.layers["0"].feed_forward.w1.weight.shape[0])
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(cfg.n_embd // cfg.n_head)
    writer.add_key_length(cfg.n_embd // cfg.n_head)
    writer.add_value_length(cfg.n_embd // cfg.n_head)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(model.padded_vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])

    meta = tokenizer_metadata(tok, model.padded_vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's split regex: what budgetlm's ByteLevel(use_regex=True) pre-tokenizer applies
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["types"])
    writer.add_token_merges(meta["merges"])
    writer.add_bos_token_id(tok.eos_id)  # budgetlm documents start after <|endoftext|>, as GPT-2's
    writer.add_eos_token_id(tok.eos_id)
    if tok.pad_id is not None:
        writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(False)  # budgetlm's prompts start with no special token
    writer.add_add_eos_token(False)

    for name, tensor in model.state_dict().items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        if arch == "llama" and name.endswith("attention.wq.weight"):
            tensor = permute(tensor, cfg.n_head)
        elif arch == "llama" and name.endswith("attention.wk.weight"):
            tensor = permute(tensor, n_kv)
        data, raw = _tensor_data(tensor, dtype)
        writer.add_tensor(gguf_name(name), data, raw_dtype=raw)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    Path(str(out) + ".tmp").replace(out)
    return {"format": "gguf", "architecture": f"GGUF {arch} {dtype}", "dtype": dtype, "out": str(out), "bytes": out.stat().st_size}
