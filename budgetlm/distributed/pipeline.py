"""Pipeline parallelism with `torch.distributed.pipelining`: GPipe, 1F1B and interleaved 1F1B.

A stage is the same `Transformer` with the other stages' layers deleted (the keys of `layers`
stay, so parameter names are the whole model's) and the embedding, or the final norm and output
projection, set to None where the stage does not own them. Stages are cut at layer boundaries,
balanced by FLOPs: the output projection counts as the layers' worth of matmuls it costs.

GPipe and 1F1B run one stage per rank. Interleaved 1F1B (Narayanan et al. 2021, "Efficient
Large-Scale Language Model Training on GPU Clusters", section 2.2) cuts the model into
`pp x parallel.pp_virtual_stages` stages and gives rank r the non-adjacent stages r, r + pp,
r + 2 pp, ...: each micro-batch visits every rank several times, in smaller pieces of work, so the
pipeline fills and drains faster (the bubble shrinks by the number of stages per rank) for more
point-to-point messages. Each of a rank's stages is parallelised on its own (its own FSDP2 root, as
in torchtitan); `merge_stages` makes one module over them whose parameters and state-dict keys
are the stages' own, for the optimizer and checkpoints.

`Pipeline` is what the training step calls: one `step` runs a whole micro-batch through the
schedule (which splits it into `parallel.pp_microbatches` pieces, forward and backward), and
returns the loss broadcast from the last stage, so every rank logs the same number.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from budgetlm.errors import UserError

SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B")


def stage_layers(n_layer: int, n_embd: int, vocab: int, n_stages: int) -> list[list[int]]:
    """Contiguous layer ranges, one per stage, minimising the largest stage's FLOPs.

    A block costs ~24 n_embd^2 multiply-adds per token (attention 8, MLP ~16); the last stage's
    output projection n_embd x vocab, i.e. vocab / (24 n_embd) blocks."""
    if n_layer < n_stages:
        raise UserError(f"parallel.pp={n_stages} stages need at least as many layers (model.n_layer={n_layer})")
    extra = vocab / (24 * n_embd)
    best: dict[tuple[int, int], tuple[float, list[int]]] = {}

    def solve(start: int, stage: int) -> tuple[float, list[int]]:
        """(max cost, cut points) for layers start.. over stages stage.."""
        key = (start, stage)
        if key in best:
            return best[key]
        left = n_stages - stage
        if left == 1:
            out = (n_layer - start + extra, [])
        else:
            out = (float("inf"), [])
            for end in range(start + 1, n_layer - left + 2):
                rest, cuts = solve(end, stage + 1)
                cost = max(end - start, rest)
                if cost < out[0]:
                    out = (cost, [end, *cuts])
        best[key] = out
        return out

    _, cuts = solve(0, 0)
    bounds = [0, *cuts, n_layer]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(n_stages)]


def stage_ids(pp_rank: int, pp: int, schedule: str, virtual_stages: int) -> tuple[list[int], int]:
    """The stages rank `pp_rank` runs and the number of stages in all: one per rank, or for
    Interleaved1F1B `virtual_stages` per rank, looped (rank r: r, r + pp, ...)."""
    per_rank = virtual_stages if schedule == "Interleaved1F1B" else 1
    if per_rank < 1 or (schedule == "Interleaved1F1B" and per_rank < 2):
        raise UserError(f"parallel.pp_virtual_stages={virtual_stages} must be at least 2 for parallel.pp_schedule=Interleaved1F1B")
    return [pp_rank + i * pp for i in range(per_rank)], pp * per_rank


def merge_stages(stages: list[nn.Module]) -> nn.Module:
    """One Transformer over a rank's stages (in order): the same parameter objects under the whole
    model's names, for the optimizer, gradient clipping and checkpoints (one stage: itself)."""
    if len(stages) == 1:
        return stages[0]
    from budgetlm.model import Transformer

    first, last = stages[0], stages[-1]
    merged = Transformer.on_meta(first.cfg)
    merged.layers = nn.ModuleDict({k: block for s in stages for k, block in s.layers.items()})
    merged.tok_embeddings, merged.embed_norm = first.tok_embeddings, first.embed_norm
    merged.norm, merged.mlm_head, merged.output = last.norm, last.mlm_head, last.output
    merged.rope_cos, merged.rope_sin = first.rope_cos, first.rope_sin  # (registered buffers: no meta tensor left)
    return merged


def make_stage(model: nn.Module, layers: list[int], first: bool, last: bool) -> nn.Module:
    """Cut `model` (on meta) down to one stage, in place."""
    for key in [k for k in model.layers if int(k) not in layers]:
        del model.layers[key]
    if not first:
        model.tok_embeddings = None
    if not last:
        model.norm = None
        model.mlm_head = None
        model.output = None
    return model


class Pipeline(nn.Module):
    """A rank's stage modules and their schedule; called by `train_step` and `evaluate_lm` instead of the model."""

    def __init__(self, modules: list[nn.Module], schedule, *, has_first: bool, has_last: bool, pp_group, n_microbatches: int):
        super().__init__()
        self.parts = nn.ModuleList(modules)  # the (maybe FSDP-wrapped) stages this rank runs
        self.schedule = schedule
        self.has_first = has_first  # this rank runs stage 0 (it feeds the tokens)
        self.has_last = has_last  # this rank runs the last stage (it computes the loss)
        self.pp_group = pp_group
        self.n_microbatches = n_microbatches
        self.loss_scale = 1.0
        self.last_rank = dist.get_global_rank(pp_group, dist.get_world_size(pp_group) - 1)  # holds the last stage

    def loss_fn(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from budgetlm.model import lm_loss

        return lm_loss(output, target) * self.loss_scale

    def _run(self, x: torch.Tensor, y: torch.Tensor, train: bool) -> torch.Tensor:
        if x.shape[0] % self.n_microbatches:
            raise UserError(f"a batch of {x.shape[0]} sequences does not split into parallel.pp_microbatches={self.n_microbatches}")
        losses: list[torch.Tensor] = []
        args = (x,) if self.has_first else ()
        run = self.schedule.step if train else self.schedule.eval
        run(*args, target=y if self.has_last else None, losses=losses if self.has_last else None)
        device = x.device
        loss = torch.stack([t.detach().float() for t in losses]).mean() / self.loss_scale if self.has_last else torch.zeros((), device=device)
        dist.broadcast(loss, src=self.last_rank, group=self.pp_group)
        return loss

    def pipeline_step(self, batch, scale: float) -> torch.Tensor:
        """Forward and backward of one micro-batch (the schedule splits it further), its loss scaled
        by `scale` (1 / accumulation steps) and the pieces' mean; returns the unscaled mean loss."""
        self.loss_scale = scale / self.n_microbatches
        try:
            return self._run(batch[0], batch[1], train=True)
        finally:
            self.loss_scale = 1.0

    @torch.no_grad()
    def pipeline_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._run(x, y, train=False)


def check_schedule(schedule: str, pp: int, n_microbatches: int) -> None:
    """parallel.pp_schedule and parallel.pp_microbatches that torch's schedules accept, else one line."""
    if schedule not in SCHEDULES:
        raise UserError(f"parallel.pp_schedule={schedule} is not one of {', '.join(SCHEDULES)}")
    if schedule == "1F1B" and n_microbatches < pp:
        raise UserError(f"parallel.pp_schedule=1F1B needs parallel.pp_microbatches >= parallel.pp ({n_microbatches} < {pp})")
    rounds = max(1, n_microbatches // pp)
    if schedule == "Interleaved1F1B" and n_microbatches % rounds:
        raise UserError(
            f"parallel.pp_schedule=Interleaved1F1B needs parallel.pp_microbatches={n_microbatches} divisible by its rounds, "
            f"max(1, pp_microbatches // parallel.pp) = {rounds}"
        )


def build_pipeline(modules: list[nn.Module], *, stages: list[int], n_stages: int, pp_mesh, device, schedule: str, n_microbatches: int) -> Pipeline:
    """The schedule over this rank's stage modules (`stages`: their indices among `n_stages`)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    check_schedule(schedule, pp_mesh.size(), n_microbatches)
    group = pp_mesh.get_group()
    pstages = [PipelineStage(m, s, n_stages, device, group=group) for m, s in zip(modules, stages)]
    holder: dict = {}
    loss_fn = lambda out, tgt: holder["p"].loss_fn(out, tgt)  # noqa: E731
    # scale_grads=False: the schedule would rescale every gradient at the end of each step, including
    # what earlier micro-batches of the same optimizer step accumulated; the loss is scaled instead
    if schedule == "Interleaved1F1B":
        sched = ScheduleInterleaved1F1B(pstages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    else:
        cls = ScheduleGPipe if schedule == "GPipe" else Schedule1F1B
        sched = cls(pstages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    pipe = Pipeline(modules, sched, has_first=0 in stages, has_last=n_stages - 1 in stages, pp_group=group, n_microbatches=n_microbatches)
    holder["p"] = pipe
    return pipe
