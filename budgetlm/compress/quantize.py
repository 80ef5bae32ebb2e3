"""Weight quantization with torchao, saved and reloaded in quantized form.

    int8      int8 weights, one scale per output row; activations stay float (weight-only:
              smaller and, where decoding is memory-bound, faster)
    int8-dyn  int8 weights and int8 activations quantized per token at run time (dynamic):
              integer matmuls where the CPU/GPU has them
    int4      int4 weights in groups of 128 (GPU only: torchao's int4 kernels need CUDA)

Every `nn.Linear` of the blocks is quantized, and the output projection when it has its own matrix;
a projection tied to the embedding table stays float with it (an int8 copy would store the table
twice, and the lookup needs the float one). Norm gains stay float.

Saved form: torchao's tensor subclasses flattened into one safetensors file (their inner tensors,
`qdata`, `scale`, ..., plus a JSON description of each subclass in the file's metadata, through
`torchao.prototype.safetensors`). Loading rebuilds the very tensors that were saved; nothing is
quantized again, so a reloaded model computes exactly what the in-memory one did.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from budgetlm.errors import UserError

METHODS = ("int8", "int8-dyn", "int4")
INT4_GROUP = 128  # torchao's default group size for int4 weight-only


def _torchao():
    # torchao warns on import about its CUDA-only kernel libraries on a CPU machine, and torch about
    # torchao's pytree registrations: nothing a user can act on, so not on their terminal
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401
        from torchao.quantization import quantize_
    except ImportError:
        raise UserError("quantization needs torchao: pip install 'budgetlm[train]'") from None
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    return quantize_


def check_quantize(method: str, device: torch.device, model: nn.Module) -> None:
    """Refuse what the method cannot do here, before any work."""
    if method == "int4":
        if device.type != "cuda":
            raise UserError("--method int4 needs a CUDA GPU (torchao's int4 kernels); on CPU use int8 or int8-dyn")
        small = [(n, m.in_features) for n, m in model.named_modules() if _quantized(m, n, False) and m.in_features % INT4_GROUP]
        if small:
            raise UserError(f"--method int4 quantizes in groups of {INT4_GROUP} inputs; layer '{small[0][0]}' has {small[0][1]}")


def quant_config(method: str):
    from torchao.quantization import Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    if method == "int8":
        return Int8WeightOnlyConfig()
    if method == "int8-dyn":
        return Int8DynamicActivationInt8WeightConfig()
    if method == "int4":
        # tinygemm's layout, whose kernel (aten._weight_int4pack_mm) ships with PyTorch's CUDA build;
        # torchao's default "plain" layout runs on a separate kernel package (mslk / fbgemm-gpu-genai)
        return Int4WeightOnlyConfig(group_size=INT4_GROUP, int4_packing_format="tile_packed_to_4d")
    raise UserError(f"unknown quantization method '{method}' (choose one of {', '.join(METHODS)})")


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, device: torch.device) -> nn.Module:
    """Quantize every linear layer of `model` in place (on `device`); returns it in eval mode."""
    quantize_ = _torchao()
    check_quantize(method, device, model)
    model.to(device).eval()
    if method == "int4":
        model.to(torch.bfloat16)  # torchao's int4 kernels take bf16 activations
    tied = _tied(model)
    quantize_(model, quant_config(method), filter_fn=lambda m, name: _quantized(m, name, tied))
    return model


def _quantized(module: nn.Module, name: str, tied: bool) -> bool:
    """The linear layers that get quantized: all but a tied output (the embedding table) and the value-embedding
    and smear gates (a few dozen weights each, whose inputs are narrower than int4's groups)."""
    gate = name.endswith(("ve_gate", "smear.gate"))
    return isinstance(module, nn.Linear) and not gate and not (tied and name == "output")


def _tied(model: nn.Module) -> bool:
    """Whether the output projection shares the embedding table (budgetlm's default)."""
    return getattr(model, "output", None) is not None and getattr(model, "tok_embeddings", None) is not None and model.cfg.tie_embeddings


def is_quantized(t: torch.Tensor) -> bool:
    return type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "tensor_data_names")


def save_quantized(model: nn.Module, path: Path) -> None:
    """Write the model's (partly quantized) state as one safetensors file."""
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    state = {}
    for name, t in model.state_dict().items():
        if name == "output.weight" and _tied(model):
            continue  # stored once, as the embedding; loading ties it again
        t = t.detach()
        state[name] = t if is_quantized(t) else t.contiguous()
    tensors, metadata = flatten_tensor_state_dict(state)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_quantized(model: nn.Module, path: Path, device: torch.device) -> nn.Module:
    """Put the saved (quantized) tensors into `model` (built with the same config), replacing its float
    parameters module by module: the loaded tensors are used as they are, never re-quantized."""
    _torchao()
    from safetensors import safe_open
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # the reader's own error types for a damaged file
        raise UserError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if "tensor_names" not in metadata:
        raise UserError(f"{path} holds no quantized model (no torchao metadata)")
    state, leftover = unflatten_tensor_state_dict(tensors, metadata)
    expected = [k for k in model.state_dict() if not (k == "output.weight" and _tied(model))]
    missing = [k for k in expected if k not in state]
    if missing or leftover:
        raise UserError(f"{path} does not match this model: {'missing ' + missing[0] if missing else 'extra ' + next(iter(leftover))}")
    for name, t in state.items():
        module_name, attr = name.rsplit(".", 1)
        module = model.get_submodule(module_name)
        if isinstance(getattr(module, attr), nn.Parameter):
            setattr(module, attr, nn.Parameter(t, requires_grad=False))
        else:
            setattr(module, attr, t)
    if _tied(model):
        model.tie_weights()  # the new embedding Parameter serves the output projection again
    model.requires_grad_(False)
    return model.eval()


def quantized_summary(model: nn.Module) -> dict:
    kinds: dict[str, int] = {}
    for p in model.parameters():
        if is_quantized(p):
            kinds[type(p).__name__] = kinds.get(type(p).__name__, 0) + 1
    return {"quantized_tensors": kinds}

