"""The compression paths that need a CUDA GPU: int4 weights and 2:4 semi-structured sparse kernels.

Without one they are refused with one line and exit 2 (compressing, and loading a run that holds
them); with one (tests marked `gpu`, skipped here) the outputs reload in their GPU form and compute
what the in-memory transform computes. int8 on the GPU is checked the same way as on the CPU."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_compress import TINY, batch, compress, fails, trained  # noqa: F401 (trained: a fixture)

from budgetlm.cli import main
from budgetlm.compress import COMPRESSION_FILE, FORMAT
from budgetlm.compress.quantize import is_quantized, quantize_model
from budgetlm.compress.sparsity import block_linears
from budgetlm.pretrain import pretrain, resolve_config
from budgetlm.run import load_run

CUDA = torch.cuda.is_available()
SPARSE_CORES = CUDA and torch.cuda.get_device_capability()[0] >= 8  # sparse tensor cores: Ampere and later


def wide_run(trained, path):  # noqa: F811
    """int4 groups 128 inputs and the 2:4 kernels have minimum tiles: a run 128 wide."""
    pretrain(resolve_config(None, "steps:2", [*TINY, "model.n_embd=128", "model.n_head=2"], load_run(trained).config.data), path)
    return path


# ---------------------------------------------------------------------------------------------
# on a machine without CUDA: one line, exit 2, nothing written


@pytest.mark.skipif(CUDA, reason="checks the refusal without CUDA")
@pytest.mark.parametrize(
    "args, match",
    [
        (["--method", "int4"], "--method int4 needs a CUDA GPU"),
        (["--method", "sparse", "--pattern", "2:4"], "2:4 sparsity needs a CUDA GPU with sparse tensor cores"),
        (["--method", "int8", "--device", "cuda"], "cuda"),  # asking for the GPU where there is none
    ],
)
def test_gpu_methods_are_refused_without_cuda(trained, tmp_path, capsys, args, match):  # noqa: F811
    fails(capsys, [trained, *args, "--out", tmp_path / "out"], match)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(CUDA, reason="checks the refusal without CUDA")
def test_an_int4_run_is_refused_at_load_without_cuda(trained, tmp_path, capsys):  # noqa: F811
    """A run holding int4 weights (made on a GPU elsewhere) is refused by every verb that loads it, in one line."""
    run = tmp_path / "q4"
    shutil.copytree(trained, run)
    (run / COMPRESSION_FILE).write_text(json.dumps({"format": FORMAT, "method": "int4", "status": "done"}))
    capsys.readouterr()
    for verb in (["eval", str(run)], ["generate", str(run), "--prompt", "x", "--max-new-tokens", "2"]):
        assert main(verb) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "int4 weights, which torchao runs on CUDA GPUs only" in err, err


# ---------------------------------------------------------------------------------------------
# on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_int4_on_gpu_reloads_as_saved(trained, tmp_path):  # noqa: F811
    run = wide_run(trained, tmp_path / "wide")
    out = tmp_path / "q4"
    assert compress(run, "--method", "int4", "--out", out) == 0
    loaded = load_run(out, "cuda").model
    # the blocks' matrices (the tied output stays float, stored once with the embedding)
    assert all(is_quantized(m.weight) for _, m in block_linears(loaded))
    reference = quantize_model(load_run(run).model, "int4", torch.device("cuda"))
    x = batch(reference).cuda()
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))
        assert not torch.equal(loaded(x), load_run(run, "cuda").model.to(torch.bfloat16)(x))  # int4 numbers, not the float model's


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_int8_on_gpu_reloads_as_saved(trained, tmp_path):  # noqa: F811
    out = tmp_path / "q8"
    assert compress(trained, "--method", "int8", "--device", "cuda", "--out", out) == 0
    loaded = load_run(out, "cuda").model
    assert all(is_quantized(m.weight) for _, m in block_linears(loaded))
    reference = quantize_model(load_run(trained).model, "int8", torch.device("cuda"))
    x = batch(reference).cuda()
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))


@pytest.mark.gpu
@pytest.mark.skipif(not SPARSE_CORES, reason="2:4 kernels need a CUDA GPU with sparse tensor cores")
def test_two_four_sparsity_on_gpu_runs_the_semi_structured_kernels(trained, tmp_path):  # noqa: F811
    from torch.sparse import SparseSemiStructuredTensor

    run = wide_run(trained, tmp_path / "wide")
    out = tmp_path / "s24"
    assert compress(run, "--method", "sparse", "--pattern", "2:4", "--device", "cuda", "--out", out) == 0
    dense = load_run(out, "cpu").model  # on a CPU: the dense weights with their zeros
    for _, m in block_linears(dense):
        assert int((m.weight.view(m.out_features, -1, 4) != 0).sum(-1).max()) <= 2  # at most 2 of every 4 inputs
    loaded = load_run(out, "cuda").model
    converted = [m for _, m in block_linears(loaded) if isinstance(m.weight, SparseSemiStructuredTensor)]
    assert converted, "no layer went to the semi-structured format"
    reference = dense.to("cuda", torch.bfloat16)
    x = batch(reference).cuda()
    with torch.no_grad():
        # a lossless change of storage: the sparse kernels sum in another order than the dense bf16 matmul
        torch.testing.assert_close(loaded(x), reference(x), atol=0.05, rtol=0.02)
