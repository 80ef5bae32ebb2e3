"""Structured pruning: attention heads, MLP neurons and whole blocks, ranked by measured importance
and removed for real (smaller matrices; the config lists each block's sizes).

Importance (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"; Molchanov et al. 2019
for neurons): every unit gets a multiplicative gate g = 1 -- on its head's output before `wo`, on
its neuron's activation before `w2`, on its block's residual update -- and the score is the sum over
a few batches of the run's own training data of |dL/dg|: to first order, how much the loss moves if
the unit goes. Units are removed cheapest first by score per parameter (or per FLOP for a speed-up
target) until the blocks hold the target; with grouped-query attention a head group (one key/value
head and its queries) is the unit, so every block keeps the model's query-per-key ratio. Each kept
block keeps at least one head group and one neuron, and at least one block stays.

`gated(model, plan)` runs the unpruned model with the removed units' gates at zero: the pruned model
computes the same logits (the tests hold it to that), before the recovery training.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch

from budgetlm.config import ModelConfig
from budgetlm.errors import UserError
from budgetlm.model import Transformer, compute_loss, layer_sizes

UNITS = ("heads", "neurons", "layers")


@dataclass
class PrunePlan:
    """What survives: per kept block (original index), its kept head groups and neurons."""

    layers: list[int]
    groups: dict[int, list[int]]  # original layer -> kept key/value group indices
    neurons: dict[int, list[int]]  # original layer -> kept neuron indices
    scores: dict = field(default_factory=dict)  # what ranked them (for the record)

    def to_dict(self) -> dict:
        return {
            "kept_layers": self.layers,
            "kept_head_groups": {str(k): v for k, v in self.groups.items()},
            "kept_neurons": {str(k): len(v) for k, v in self.neurons.items()},
        }


# ---------------------------------------------------------------------------------------------
# gates


class Gates:
    """Gates on every head (per key/value group), neuron and block of `model`, installed as hooks."""

    def __init__(self, model: Transformer, requires_grad: bool = False):
        self.model = model
        cfg = model.cfg
        self.group = cfg.n_head // (cfg.n_kv_head or cfg.n_head)  # query heads per key/value head
        dev = model.tok_embeddings.weight.device
        self.heads, self.neurons, self.layers = {}, {}, {}
        for key in model.layers:
            i = int(key)
            n_head, n_kv, ffn = layer_sizes(cfg, i)
            self.heads[i] = torch.ones(n_kv, device=dev, requires_grad=requires_grad)
            self.neurons[i] = torch.ones(ffn, device=dev, requires_grad=requires_grad)
            self.layers[i] = torch.ones((), device=dev, requires_grad=requires_grad)
        self._handles = []

    def tensors(self) -> list[torch.Tensor]:
        return [*self.heads.values(), *self.neurons.values(), *self.layers.values()]

    @contextlib.contextmanager
    def installed(self):
        hd = self.model.head_dim
        for key, block in self.model.layers.items():
            i = int(key)

            def heads_hook(module, args, i=i):
                (y,) = args  # (B, T, nh * hs)
                g = self.heads[i].repeat_interleave(self.group).repeat_interleave(hd).to(y.dtype)  # (nh * hs,)
                return (y * g,)

            def neurons_hook(module, args, i=i):
                (h,) = args  # (B, T, ffn)
                return (h * self.neurons[i].to(h.dtype),)

            def block_hook(module, args, output, i=i):
                x = args[0]
                return x + self.layers[i].to(output.dtype) * (output - x)

            self._handles += [
                block.attention.wo.register_forward_pre_hook(heads_hook),
                block.feed_forward.w2.register_forward_pre_hook(neurons_hook),
                block.register_forward_hook(block_hook),
            ]
        try:
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles = []


def importance(model: Transformer, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Gates:
    """|dL/dg| summed over `batches` for every gate (returned as the gates' `.grad`-free tensors)."""
    gates = Gates(model, requires_grad=True)
    scores = [torch.zeros_like(g) for g in gates.tensors()]
    was_training = model.training
    model.eval()  # no dropout: the scores of the model as it computes
    requires = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # gradients for the gates only
    try:
        with gates.installed():
            for x, y in batches:
                loss = compute_loss(model, x, y)
                grads = torch.autograd.grad(loss, gates.tensors())
                for s, g in zip(scores, grads):
                    s += g.abs()
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
    out = Gates(model)
    for g, s in zip(out.tensors(), scores):
        g.copy_(s)
    return out


# ---------------------------------------------------------------------------------------------
# choosing what goes


def block_costs(cfg: ModelConfig, layer: int, n_groups: int, n_neurons: int, head_dim: int, per: str) -> tuple[float, float, float]:
    """(cost of one head group, of one neuron, of the rest of the block: its norms) in parameters, or in
    forward FLOPs per token (2 per weight, plus 4 T hs per head for scores and values) for `per="flops"`."""
    C = cfg.n_embd
    group = cfg.n_head // (cfg.n_kv_head or cfg.n_head)
    gated = cfg.mlp in ("swiglu", "geglu")
    head = (2 * group + 2) * head_dim * C  # wq rows and wo columns of each query head; wk, wv rows of the group
    neuron = (3 if gated else 2) * C
    rest = 2 * C + (2 * head_dim if cfg.qk_norm else 0)
    if per == "flops":
        return 2 * head + 4 * cfg.seq_len * group * head_dim, 2 * neuron, 0.0
    return float(head), float(neuron), float(rest)


def choose(model: Transformer, scores: Gates, keep: float, per: str = "params", units: tuple[str, ...] = UNITS) -> PrunePlan:
    """Remove the units with the least importance per cost until the blocks cost at most `keep` of what
    they cost now (parameters, or forward FLOPs per token for a speed-up target)."""
    cfg = model.cfg
    hd = model.head_dim
    groups = {i: list(range(len(g))) for i, g in scores.heads.items()}
    neurons = {i: list(range(len(n))) for i, n in scores.neurons.items()}
    alive = set(scores.layers)
    costs = {i: block_costs(cfg, i, len(groups[i]), len(neurons[i]), hd, per) for i in alive}

    def block_cost(i: int) -> float:
        h, n, r = costs[i]
        return h * len(groups[i]) + n * len(neurons[i]) + r

    total = sum(block_cost(i) for i in alive)
    target = keep * total
    candidates = []  # (score per cost, kind, layer, index)
    for i in alive:
        h, n, _ = costs[i]
        if "heads" in units:
            candidates += [(float(s) / h, "head", i, j) for j, s in enumerate(scores.heads[i])]
        if "neurons" in units:
            candidates += [(float(s) / n, "neuron", i, j) for j, s in enumerate(scores.neurons[i])]
        if "layers" in units:
            candidates.append((float(scores.layers[i]) / block_cost(i), "layer", i, -1))
    candidates.sort(key=lambda c: c[0])
    removed = {i: (set(), set()) for i in alive}
    cost = total
    for _, kind, i, j in candidates:
        if cost <= target:
            break
        if i not in alive:
            continue
        gone_heads, gone_neurons = removed[i]
        if kind == "layer" and len(alive) > 1:
            cost -= block_cost(i) - costs[i][0] * len(gone_heads) - costs[i][1] * len(gone_neurons)
            alive.discard(i)
        elif kind == "head" and len(groups[i]) - len(gone_heads) > 1:
            gone_heads.add(j)
            cost -= costs[i][0]
        elif kind == "neuron" and len(neurons[i]) - len(gone_neurons) > 1:
            gone_neurons.add(j)
            cost -= costs[i][1]
    if cost > target * 1.0001:
        raise UserError(f"cannot prune to {keep:.0%} with units {','.join(units)} (at least one block, head group and neuron stay)")
    kept = sorted(alive)
    return PrunePlan(
        layers=kept,
        groups={i: [g for g in groups[i] if g not in removed[i][0]] for i in kept},
        neurons={i: [n for n in neurons[i] if n not in removed[i][1]] for i in kept},
        scores={"blocks_cost_before": total, "blocks_cost_after": cost, "per": per},
    )


# ---------------------------------------------------------------------------------------------
# applying it


def pruned_config(cfg: ModelConfig, plan: PrunePlan) -> ModelConfig:
    group = cfg.n_head // (cfg.n_kv_head or cfg.n_head)
    out = copy.deepcopy(cfg)
    out.n_layer = len(plan.layers)
    out.layer_heads = [len(plan.groups[i]) * group for i in plan.layers]
    out.layer_ffn = [len(plan.neurons[i]) for i in plan.layers]
    return out


@torch.no_grad()
def apply_plan(model: Transformer, plan: PrunePlan) -> Transformer:
    """A new, smaller model holding the kept rows/columns of `model`'s weights (blocks renumbered 0..)."""
    cfg = model.cfg
    if cfg.value_embeddings == "alternate" and len(plan.layers) != cfg.n_layer:
        raise UserError("removing blocks would move the value embeddings of model.value_embeddings=alternate; prune with --units heads,neurons")
    new = Transformer.build(pruned_config(cfg, plan), device=model.tok_embeddings.weight.device, seed=0)
    hd, group = model.head_dim, cfg.n_head // (cfg.n_kv_head or cfg.n_head)
    src = model.state_dict()
    dst = {k: v for k, v in src.items() if not k.startswith(("layers.", "value_embeddings."))}
    for new_i, i in enumerate(plan.layers):
        kv = torch.tensor(plan.groups[i], dtype=torch.long)
        q = (kv[:, None] * group + torch.arange(group)).reshape(-1)  # query heads of the kept groups
        q_rows = (q[:, None] * hd + torch.arange(hd)).reshape(-1)
        kv_rows = (kv[:, None] * hd + torch.arange(hd)).reshape(-1)
        neurons = torch.tensor(plan.neurons[i], dtype=torch.long)
        for name, t in src.items():
            prefix = f"layers.{i}."
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            dev_idx = lambda idx, t=t: idx.to(t.device)
            if rest == "attention.wq.weight":
                t = t.index_select(0, dev_idx(q_rows))
            elif rest in ("attention.wk.weight", "attention.wv.weight"):
                t = t.index_select(0, dev_idx(kv_rows))
            elif rest == "attention.ve_gate.weight":  # a gate per key/value head
                t = t.index_select(0, dev_idx(kv))
            elif rest == "attention.wo.weight":
                t = t.index_select(1, dev_idx(q_rows))
            elif rest in ("feed_forward.w1.weight", "feed_forward.w3.weight"):
                t = t.index_select(0, dev_idx(neurons))
            elif rest == "feed_forward.w2.weight":
                t = t.index_select(1, dev_idx(neurons))
            dst[f"layers.{new_i}.{rest}"] = t.clone()
        if f"value_embeddings.{i}.weight" in src:  # as wide as the block's keys/values
            table = src[f"value_embeddings.{i}.weight"]
            dst[f"value_embeddings.{new_i}.weight"] = table.index_select(1, kv_rows.to(table.device)).clone()
    new.load_state_dict(dst, strict=True)  # copies in place, so a tied head stays tied
    return new.train(model.training)


def gated(model: Transformer, plan: PrunePlan) -> Gates:
    """Gates that switch off exactly what `plan` removes; use as `with gated(m, plan).installed(): m(x)`."""
    gates = Gates(model)
    for i in gates.layers:
        if i not in plan.layers:
            gates.layers[i].zero_()
            continue
        keep_g = torch.zeros_like(gates.heads[i])
        keep_g[plan.groups[i]] = 1
        gates.heads[i].copy_(keep_g)
        keep_n = torch.zeros_like(gates.neurons[i])
        keep_n[plan.neurons[i]] = 1
        gates.neurons[i].copy_(keep_n)
    return gates
