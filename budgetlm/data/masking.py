"""Masked-language-model corruption: BERT's 80/10/10 rule (Devlin et al. 2019, section 3.1).

A fraction `rate` of the ordinary (non-special) positions is chosen; of those, 80% become the
mask token, 10% a random ordinary token and 10% stay as they are. The targets hold the original
id at chosen positions and -100 (no loss) everywhere else, which is what the model's sparse
prediction gathers on. Cramming (Geiping & Goldstein 2022) keeps this rule and raises the rate
to 25% for short budgets (recipe bert-24h).

Runs on the batch's device with a caller-owned `torch.Generator`, so a resumed run that restores
the generator state corrupts the same batches the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

IGNORE_INDEX = -100


def mask_tokens(
    idx: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    rate: float = 0.15,
    special_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) for masked-LM training from token ids `idx` (any shape, integer).

    `vocab_size` bounds the random replacements (ids in [0, vocab_size) that are not special);
    `special_ids` (e.g. [CLS], [SEP], [PAD], [MASK]) are never chosen and never drawn as
    replacements. Positions are chosen independently with probability `rate`, as in BERT."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"masking rate must be in [0, 1], got {rate}")
    device = idx.device
    special = torch.as_tensor(sorted(set(int(i) for i in special_ids) | {int(mask_id)}), dtype=idx.dtype, device=device)
    ordinary = ~torch.isin(idx, special)

    u = torch.rand(idx.shape, generator=generator, device=device)
    chosen = (u < rate) & ordinary
    # one more uniform draw splits the chosen positions 80 / 10 / 10
    action = torch.rand(idx.shape, generator=generator, device=device)
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)

    # random replacements drawn from the ordinary ids only: sample an index into the sorted
    # complement of the special ids, so no rejection loop is needed
    allowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
    allowed[special[special < vocab_size]] = False
    ordinary_ids = allowed.nonzero().squeeze(1).to(idx.dtype)
    if ordinary_ids.numel() == 0:
        raise ValueError("every id in the vocabulary is special: nothing to draw random replacements from")
    pick = torch.randint(0, ordinary_ids.numel(), idx.shape, generator=generator, device=device)
    random_ids = ordinary_ids[pick]

    inputs = torch.where(to_mask, torch.full_like(idx, mask_id), idx)
    inputs = torch.where(to_random, random_ids, inputs)
    targets = torch.where(chosen, idx, torch.full_like(idx, IGNORE_INDEX))
    return inputs, targets
