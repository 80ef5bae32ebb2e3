"""Knowledge distillation: a trained teacher run teaches a smaller student through the pretraining loop.

The student trains with `budgetlm.pretrain` (same budget clock, schedule, checkpoints, report) and
one change, its loss (Hinton et al. 2015):

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * LM loss

on every position that carries a target (all of them for causal, the masked ones for masked; the
teacher runs in `no_grad` on the same batch, on the clock: its forward is part of the method's
cost). T^2 keeps the soft term's gradients on the LM loss's scale as T changes. The student shares
the teacher's tokenizer (its logits must line up), objective and context length; its size is what
the user sets (`--set model.n_layer=2 model.n_embd=128`) or, with no model key, what
`budgetlm.plan` chooses for the budget on this device, capped below the teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from budgetlm.model import IGNORE_INDEX, lm_loss


def distill_loss(teacher: nn.Module, temperature: float = 2.0, alpha: float = 0.5, z_loss: float = 0.0):
    """A `loss_fn(model, (x, y))` for `budgetlm.pretrain`: soft-target KL mixed with the LM loss."""

    def loss_fn(model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        logits = model(x, targets=y)
        hard = lm_loss(logits, y, z_loss)
        with torch.no_grad():
            t_logits = teacher(x, targets=y)
        soft = soft_target_loss(logits, t_logits, y, temperature)
        return alpha * soft + (1 - alpha) * hard

    return loss_fn


def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over target positions of KL(teacher_T || student_T); logits (B, T, V) or, for the masked
    objective's sparse prediction, (M, V) already restricted to the M masked positions."""
    V = student.size(-1)
    s, t = student.reshape(-1, V).float(), teacher.reshape(-1, V).float()
    if s.size(0) == targets.numel():  # whole sequences: drop positions without a target
        keep = targets.reshape(-1) != IGNORE_INDEX
        s, t = s[keep], t[keep]
    log_s = F.log_softmax(s / temperature, dim=-1)
    log_t = F.log_softmax(t / temperature, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2
