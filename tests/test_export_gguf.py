"""`budgetlm export --format gguf`: read the file back with gguf's own reader and check every tensor
(after undoing llama.cpp's q/k row permutation) and the tokenizer metadata."""

import json

import numpy as np
import pytest
import torch
from test_export_hf import make_run

from budgetlm.cli import main
from budgetlm.errors import UserError
from budgetlm.export import export
from budgetlm.export.gguf import gguf_name, permute, unpermute
from budgetlm.run import load_run

gguf = pytest.importorskip("gguf")


def _read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {name: f.contents() for name, f in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type) if t.tensor_type == gguf.GGMLQuantizationType.Q8_0 else t.data
        tensors[t.name] = (torch.from_numpy(np.array(data, dtype=np.float32)).reshape(tuple(reversed(t.shape.tolist()))), t.tensor_type)
    return fields, tensors


@pytest.mark.parametrize(
    "dtype, model, atol",
    [
        ("f32", {"tie_embeddings": False, "n_kv_head": 2}, 0.0),
        ("f16", {}, 1e-3),
        ("q8_0", {"n_kv_head": 1}, 0.02),  # 8-bit blocks of 32: error up to half a step of the block's scale
        ("f32", {"qk_norm": True, "n_kv_head": 2}, 0.0),  # llama.cpp's qwen3: QK-norm, halves rotated as budgetlm does
    ],
)
def test_every_tensor_and_the_tokenizer_read_back(tmp_path, dtype, model, atol):
    src = make_run(tmp_path / "run", **model)
    assert main(["export", str(src), "--format", "gguf", "--dtype", dtype, "--out", str(tmp_path / "m.gguf")]) == 0
    run = load_run(src)
    cfg, tok = run.config.model, run.tokenizer
    fields, tensors = _read(tmp_path / "m.gguf")

    n_kv = cfg.n_kv_head or cfg.n_head
    arch = "qwen3" if cfg.qk_norm else "llama"
    expected = dict(run.model.state_dict())
    if cfg.tie_embeddings:
        del expected["output.weight"]  # llama.cpp reuses token_embd
    assert set(tensors) == {gguf_name(k) for k in expected}
    for name, want in expected.items():
        got, ggml_type = tensors[gguf_name(name)]
        if arch == "llama" and name.endswith("attention.wq.weight"):
            got = unpermute(got, cfg.n_head)
        elif arch == "llama" and name.endswith("attention.wk.weight"):
            got = unpermute(got, n_kv)
        torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=name)
        if want.dim() == 1:
            assert ggml_type == gguf.GGMLQuantizationType.F32  # norms stay f32
        else:
            assert ggml_type.name == dtype.upper()

    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.block_count"] == cfg.n_layer and fields[f"{arch}.attention.head_count_kv"] == n_kv
    assert fields[f"{arch}.rope.dimension_count"] == fields[f"{arch}.attention.key_length"] == cfg.n_embd // cfg.n_head
    assert fields[f"{arch}.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert fields[f"{arch}.context_length"] == cfg.seq_len
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == run.model.padded_vocab_size == tensors["token_embd.weight"][0].shape[0]
    data = json.loads(tok.to_str())
    assert all(tokens[i] == t for t, i in data["model"]["vocab"].items())
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    assert types[tok.eos_id] == gguf.TokenType.CONTROL and types[tok.encode("the")[0]] == gguf.TokenType.NORMAL
    assert tokens[-1] == f"[PAD{len(tokens) - 1}]" and types[-1] == gguf.TokenType.UNUSED
    assert fields["tokenizer.ggml.bos_token_id"] == fields["tokenizer.ggml.eos_token_id"] == tok.eos_id
    assert fields["tokenizer.ggml.padding_token_id"] == tok.pad_id and fields["tokenizer.ggml.add_bos_token"] is False


def test_permutation_pairs_rotary_halves_as_llama_cpp_does():
    """llama.cpp rotates (x[2i], x[2i+1]); budgetlm rotates (x[i], x[i + hs/2]): after `permute`, row 2i
    of a head holds budgetlm's row i and row 2i+1 its row i + hs/2."""
    n_head, hs = 2, 8
    w = torch.arange(n_head * hs, dtype=torch.float32)[:, None]  # row r holds r
    p = permute(w, n_head)[:, 0].tolist()
    assert p[:hs] == [0, 4, 1, 5, 2, 6, 3, 7] and p[hs:] == [8, 12, 9, 13, 10, 14, 11, 15]
    assert torch.equal(unpermute(permute(w, n_head), n_head), w)


@pytest.mark.parametrize(
    "model, match",
    [({"mlp": "geglu"}, "model.mlp"), ({"logit_softcap": 15.0}, "model.logit_softcap"), ({"objective": "masked"}, "masked")],
)
def test_what_llama_cpp_llama_cannot_run_is_refused(tmp_path, model, match):
    src = make_run(tmp_path / "run", **model)
    with pytest.raises(UserError, match=match):
        export(src, tmp_path / "out", fmt="gguf")
    with pytest.raises(UserError, match="--dtype applies to --format gguf"):
        export(src, tmp_path / "out", fmt="hf", dtype="q8_0")


@pytest.mark.parametrize(
    "dtype, model, atol",
    [
        ("f32", {"tie_embeddings": False, "n_kv_head": 2}, 1e-5),  # llama: q/k rows permuted, grouped-query attention
        ("f32", {"qk_norm": True}, 1e-5),  # qwen3: QK-norm, halves rotated
        # 8-bit weights, and llama.cpp's q8_0 matmul quantizes the activations to 8 bits too: measured 0.096 at
        # logits up to 3.6, where a wrong layout is off by the logits' own size
        ("q8_0", {}, 0.25),
    ],
)
def test_llama_cpp_runs_the_file_with_budgetlm_tokens_and_logits(tmp_path, dtype, model, atol):
    """llama.cpp itself (through llama-cpp-python, an optional install: it compiles llama.cpp) loads the
    exported file, tokenizes as budgetlm does and computes budgetlm's logits at every position."""
    llama_cpp = pytest.importorskip("llama_cpp")
    src = make_run(tmp_path / "run", **model)
    export(src, tmp_path / "m.gguf", fmt="gguf", dtype=dtype)
    run = load_run(src)
    f32 = 0  # GGML_TYPE_F32 for the key/value cache (llama.cpp's default f16 cache rounds keys and values)
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, n_batch=64, logits_all=True, n_threads=1, type_k=f32, type_v=f32, verbose=False)
    for text in ["the film was good and the plot was fun", "Ünïcödé and  spaces\n\ttabs, don't 1234!"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == run.tokenizer.encode(text)
    ids = run.tokenizer.encode("the film was good and the plot was fun, a dog sat on the mat")
    llm.reset()
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    with torch.no_grad():
        ours = run.model(torch.tensor([ids]))[0]
    V = run.model.vocab_size  # the padded rows are not tokens
    torch.testing.assert_close(theirs[:, :V], ours[:, :V], atol=atol, rtol=0)
