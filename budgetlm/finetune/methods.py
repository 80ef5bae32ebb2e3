"""Fine-tuning methods as transforms of a built task model (LitGPT / torchtitan style: nothing in model.py).

`apply_method(model, method, opts)` freezes what the method leaves alone and adds what it trains;
the head always trains. The saved state is exactly the trainable parameters
(`trainable_state_dict`), so a LoRA/adapter/prefix directory holds a few hundred kilobytes and
references its base run instead of copying it.

- full: every body parameter trains.
- lora: low-rank updates W + (alpha/r) B A on the named linear layers (Hu et al. 2021), injected
  by `peft` into our modules; `merge_lora` folds them into the base weights for inference.
- adapter: a bottleneck (down, GELU, up) after the attention and the MLP of every block, added to
  the sublayer's output before the residual (Houlsby et al. 2019). `up` starts at zero, so the
  adapted model starts as exactly the pretrained one. Houlsby also trains the layer norms; we keep
  them frozen so the method's state is only the adapters (a small, documented difference).
- prefix: trainable keys and values prepended in every layer (Li & Liang 2021), through the
  body's key/value-cache path. They start as the keys/values the body computes for random real
  tokens, which Li & Liang (section 7.2) found far more stable than a random start; we optimise
  them directly rather than through their MLP reparameterisation, which keeps the saved state tiny.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from budgetlm.errors import UserError

METHODS = ("full", "lora", "adapter", "prefix")


@dataclass
class MethodOptions:
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("wq", "wv")
    lora_dropout: float = 0.0
    adapter_size: int = 64
    prefix_len: int = 16
    seed: int = 0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d


def apply_method(model: nn.Module, method: str, opts: MethodOptions) -> nn.Module:
    """Freeze/extend `model` (a `TaskModel`) in place for `method`; returns it."""
    if method not in METHODS:
        raise UserError(f"unknown method '{method}' (choose one of {', '.join(METHODS)})")
    body = model.body
    if method == "full" and any(hasattr(p, "tensor_data_names") for p in body.parameters()):  # torchao's quantized tensors
        raise UserError("a quantized run cannot train its own weights: fine-tune it with --method lora, adapter or prefix")
    body.requires_grad_(method == "full")
    if method == "lora":
        _apply_lora(body, opts)
    elif method == "adapter":
        _apply_adapters(body, opts)
    elif method == "prefix":
        model.kv_prefix = PrefixKV.from_body(body, opts.prefix_len, seed=opts.seed)
    model.head.requires_grad_(True)
    return model


def trainable_report(model: nn.Module) -> dict:
    """Trainable and total parameters (a tied matrix counted once) and the trainable share."""
    params = list({id(p): p for p in model.parameters()}.values())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total, "trainable_share": trainable / total if total else 0.0}


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Exactly the parameters that train (method + head, or the whole body for `full`)."""
    return {name: p.detach().clone().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a `trainable_state_dict` into a model transformed the same way; every trainable key must be there."""
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        some = sorted(missing or unexpected)[:3]
        raise UserError(f"saved fine-tuned weights do not fit the model ({'missing' if missing else 'unexpected'}: {', '.join(some)})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise UserError(f"saved fine-tuned weight {name} has shape {tuple(value.shape)}, the model {tuple(params[name].shape)}")
            params[name].copy_(value)


# ---------------------------------------------------------------------------------------------
# LoRA (through peft)


def _apply_lora(body: nn.Module, opts: MethodOptions) -> None:
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UserError("--method lora needs peft: pip install 'budgetlm[finetune]'") from None
    names = {name.rsplit(".", 1)[-1] for name, m in body.named_modules() if isinstance(m, nn.Linear)}
    unknown = [t for t in opts.lora_targets if t not in names]
    if unknown or not opts.lora_targets:
        raise UserError(f"LoRA target(s) {', '.join(unknown) or '(none)'} are not linear layers (choose from {', '.join(sorted(names))})")
    if "output" in opts.lora_targets:
        raise UserError("LoRA on 'output' is not supported: it is tied to the embedding and unused by task heads")
    config = LoraConfig(r=opts.lora_rank, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout, target_modules=list(opts.lora_targets))
    torch.manual_seed(opts.seed)  # lora_A's random init (B is zero, so the start is the base model)
    inject_adapter_in_model(config, body)
    for name, p in body.named_parameters():
        p.requires_grad_("lora_" in name)


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its base weight and put the plain layer back; returns how many."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            if hasattr(module.get_base_layer().weight, "tensor_data_names"):
                continue  # a quantized (torchao) base keeps its update beside it: folding it in would mean quantizing again
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            base = module.get_base_layer()
            base.weight.requires_grad_(False)
            setattr(parent, child, base)
            merged += 1
    return merged


# ---------------------------------------------------------------------------------------------
# bottleneck adapters


class Adapter(nn.Module):
    """h -> up(gelu(down(h))), added to h by the hook; zero-initialised `up` = identity at the start."""

    def __init__(self, dim: int, size: int):
        super().__init__()
        self.down = nn.Linear(dim, size)
        self.up = nn.Linear(size, dim)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(torch.nn.functional.gelu(self.down(h)))


def _adapter_hook(module: nn.Module, args, output):
    # a module-level function (no closure), so copies of the model keep working hooks
    return output + module.adapter(output)


def _apply_adapters(body: nn.Module, opts: MethodOptions) -> None:
    torch.manual_seed(opts.seed)
    for layer in body.layers.values():
        for sub in (layer.attention, layer.feed_forward):
            device = next(sub.parameters()).device
            sub.adapter = Adapter(body.cfg.n_embd, opts.adapter_size).to(device)
            sub.register_forward_hook(_adapter_hook)


# ---------------------------------------------------------------------------------------------
# prefix tuning


class PrefixKV(nn.Module):
    """Per-layer trainable keys/values (n_layer, n_kv_head, P, hs), served through the KV-cache protocol.

    The body's attention calls `update(layer_id, start_pos, k, v)` and attends over what it
    returns: here the prefix followed by this pass's keys/values (nothing is cached between calls).
    """

    def __init__(self, n_layer: int, n_kv_head: int, prefix_len: int, head_dim: int):
        super().__init__()
        self.prefix_len = prefix_len
        self.keys = nn.Parameter(torch.zeros(n_layer, n_kv_head, prefix_len, head_dim))
        self.values = nn.Parameter(torch.zeros(n_layer, n_kv_head, prefix_len, head_dim))

    @classmethod
    def from_body(cls, body: nn.Module, prefix_len: int, seed: int = 0) -> PrefixKV:
        cfg = body.cfg
        if prefix_len < 1:
            raise UserError("--prefix-len must be at least 1")
        from budgetlm.model import layer_sizes

        n_kv = max(layer_sizes(cfg, i)[1] for i in range(cfg.n_layer))  # a pruned body's blocks may hold fewer
        head_dim = cfg.n_embd // cfg.n_head
        prefix = cls(cfg.n_layer, n_kv, prefix_len, head_dim).to(body.tok_embeddings.weight.device)
        # start from the keys/values of random real tokens (Li & Liang 2021, section 7.2)
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, body.vocab_size, (1, min(prefix_len, cfg.seq_len)), generator=gen).to(prefix.keys.device)
        recorder = _RecordKV()
        was_training = body.training
        body.eval()
        with torch.no_grad():
            body.hidden_states(idx, kv_cache=recorder)
            for layer_id, (k, v) in recorder.kv.items():
                reps = -(-prefix_len // k.shape[2])  # repeat when the context is shorter than the prefix
                prefix.keys[layer_id, : k.shape[1]].copy_(k[0].repeat(1, reps, 1)[:, :prefix_len])
                prefix.values[layer_id, : v.shape[1]].copy_(v[0].repeat(1, reps, 1)[:, :prefix_len])
        body.train(was_training)
        return prefix

    def update(self, layer_id: int, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = k.shape[0]
        nkv = k.shape[1]
        pk = self.keys[layer_id, :nkv].to(k.dtype).unsqueeze(0).expand(B, -1, -1, -1)  # (B, nkv, P, hs)
        pv = self.values[layer_id, :nkv].to(v.dtype).unsqueeze(0).expand(B, -1, -1, -1)
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, nkv, P+T, hs)


class _RecordKV:
    """A pass-through cache that remembers each layer's keys and values."""

    def __init__(self):
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, layer_id, start_pos, k, v):
        self.kv[layer_id] = (k, v)
        return k, v
