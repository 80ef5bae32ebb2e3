"""Pipeline parallelism with `torch.distributed.pipelining`: one stage per rank, GPipe or 1F1B.

A stage is the same `Transformer` with the other stages' layers deleted (the keys of `layers`
stay, so parameter names are the whole model's) and the embedding, or the final norm and output
projection, set to None where the stage does not own them. Stages are cut at layer boundaries,
balanced by FLOPs: the output projection counts as the layers' worth of matmuls it costs.

`Pipeline` is what the training step calls: one `step` runs a whole micro-batch through the
schedule (which splits it into `parallel.pp_microbatches` pieces, forward and backward), and
returns the loss broadcast from the last stage, so every rank logs the same number.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from budgetlm.errors import UserError

SCHEDULES = ("GPipe", "1F1B")


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


def make_stage(model: nn.Module, layers: list[int], first: bool, last: bool) -> nn.Module:
    """Cut `model` (on meta) down to one stage, in place."""
    for key in [k for k in model.layers if int(k) not in layers]:
        del model.layers[key]
    if not first:
        model.tok_embeddings = None
    if not last:
        model.norm = None
        model.output = None
    return model


class Pipeline(nn.Module):
    """A stage module and its schedule; called by `train_step` and `evaluate_lm` instead of the model."""

    def __init__(self, module: nn.Module, schedule, *, stage: int, n_stages: int, pp_group, n_microbatches: int):
        super().__init__()
        self.module = module  # the (maybe FSDP/DDP-wrapped) stage
        self.schedule = schedule
        self.stage = stage
        self.n_stages = n_stages
        self.pp_group = pp_group
        self.n_microbatches = n_microbatches
        self.loss_scale = 1.0
        self.last_rank = dist.get_global_rank(pp_group, n_stages - 1)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.n_stages - 1

    def loss_fn(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from budgetlm.model import lm_loss

        return lm_loss(output, target) * self.loss_scale

    def _run(self, x: torch.Tensor, y: torch.Tensor, train: bool) -> torch.Tensor:
        if x.shape[0] % self.n_microbatches:
            raise UserError(f"a batch of {x.shape[0]} sequences does not split into parallel.pp_microbatches={self.n_microbatches}")
        losses: list[torch.Tensor] = []
        args = (x,) if self.is_first else ()
        run = self.schedule.step if train else self.schedule.eval
        run(*args, target=y if self.is_last else None, losses=losses if self.is_last else None)
        device = x.device
        loss = torch.stack([t.detach().float() for t in losses]).mean() / self.loss_scale if self.is_last else torch.zeros((), device=device)
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


def build_pipeline(
    stage_module: nn.Module, train_module: nn.Module, *, stage: int, n_stages: int, pp_mesh, device, schedule: str, n_microbatches: int
) -> Pipeline:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    if schedule not in SCHEDULES:
        raise UserError(f"parallel.pp_schedule={schedule} is not one of {', '.join(SCHEDULES)}")
    if schedule == "1F1B" and n_microbatches < n_stages:
        raise UserError(f"parallel.pp_schedule=1F1B needs parallel.pp_microbatches >= parallel.pp ({n_microbatches} < {n_stages})")
    group = pp_mesh.get_group()
    pstage = PipelineStage(train_module, stage, n_stages, device, group=group)
    holder: dict = {}
    cls = ScheduleGPipe if schedule == "GPipe" else Schedule1F1B
    # scale_grads=False: the schedule would rescale every gradient at the end of each step, including
    # what earlier micro-batches of the same optimizer step accumulated; the loss is scaled instead
    sched = cls(pstage, n_microbatches=n_microbatches, loss_fn=lambda out, tgt: holder["p"].loss_fn(out, tgt), scale_grads=False)
    pipe = Pipeline(train_module, sched, stage=stage, n_stages=n_stages, pp_group=group, n_microbatches=n_microbatches)
    holder["p"] = pipe
    return pipe
