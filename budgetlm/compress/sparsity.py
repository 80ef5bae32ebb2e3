"""Unstructured magnitude pruning (`torch.nn.utils.prune`) and 2:4 semi-structured sparsity.

The blocks' linear layers (attention and MLP projections; not the embedding or the output head,
which are tied on most runs) lose their smallest-magnitude weights: `unstructured` ranks all of
them together (global L1, as in Han et al. 2015 and the lottery-ticket line of work), `2:4`
keeps the two largest of every four consecutive input weights (NVIDIA's sparse tensor cores,
Mishra et al. 2021). The zeros are written into the dense weights, so the saved run is an ordinary
one and the sparsity is measured from it. Dense kernels do not skip zeros: on a CPU this changes
quality, never speed or size on disk. A 2:4 run loaded on a CUDA GPU that has sparse tensor cores
gets its linear weights converted to PyTorch's semi-structured sparse format
(`torch.sparse.to_sparse_semi_structured`), a lossless change of storage.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune

from budgetlm.errors import UserError

PATTERNS = ("unstructured", "2:4")


def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if name.startswith("layers.") and isinstance(m, nn.Linear)]


def has_semi_structured(device: torch.device) -> bool:
    """Sparse tensor cores: NVIDIA Ampere (compute capability 8.0) and later."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float, pattern: str = "unstructured") -> dict:
    """Zero the smallest weights of the blocks' linear layers in place; returns the measured sparsity."""
    if pattern not in PATTERNS:
        raise UserError(f"unknown sparsity pattern '{pattern}' (choose one of {', '.join(PATTERNS)})")
    linears = block_linears(model)
    if pattern == "unstructured":
        if not 0.0 < sparsity < 1.0:
            raise UserError(f"--sparsity must be a fraction in (0, 1), got {sparsity}")
        prune.global_unstructured([(m, "weight") for _, m in linears], pruning_method=prune.L1Unstructured, amount=sparsity)
        for _, m in linears:
            prune.remove(m, "weight")  # make it permanent: plain weights with zeros, no mask buffers
    else:
        for name, m in linears:
            if m.in_features % 4:
                raise UserError(f"2:4 sparsity needs input sizes divisible by 4; layer '{name}' has {m.in_features}")
            w = m.weight.view(m.out_features, -1, 4)  # (out, in/4, 4)
            keep = w.abs().topk(2, dim=-1).indices
            mask = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, keep, True)
            m.weight.mul_(mask.view_as(m.weight))
    return sparsity_report(model)


def sparsity_report(model: nn.Module) -> dict:
    linears = block_linears(model)
    zeros = sum(int((m.weight == 0).sum()) for _, m in linears)
    total = sum(m.weight.numel() for _, m in linears)
    all_zeros = sum(int((p == 0).sum()) for p in model.parameters())
    all_total = sum(p.numel() for p in model.parameters())
    return {"block_weight_sparsity": zeros / max(total, 1), "overall_sparsity": all_zeros / max(all_total, 1), "pruned_weights": zeros}


def to_semi_structured(model: nn.Module) -> int:
    """Convert the blocks' (2:4-pruned) linear weights to PyTorch's semi-structured sparse format;
    returns how many were converted (layers whose shape the kernels do not take stay dense)."""
    from torch.sparse import to_sparse_semi_structured

    n = 0
    for _, m in block_linears(model):
        w = m.weight.detach()
        if w.dtype not in (torch.float16, torch.bfloat16):
            w = w.to(torch.bfloat16)
            m.to(torch.bfloat16)
        try:
            m.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
            n += 1
        except (RuntimeError, ValueError):  # shapes below the kernels' minimum tile stay dense
            pass
    return n
