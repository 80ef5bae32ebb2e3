"""BERT 80/10/10 masking: rate, specials, targets, replacements, determinism."""

import torch

from budgetlm.data.masking import IGNORE_INDEX, mask_tokens

MASK, CLS, SEP, PAD = 3, 1, 2, 0
SPECIALS = (PAD, CLS, SEP, MASK)
VOCAB = 50


def batch(seed=0, shape=(64, 128)):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(4, VOCAB, shape, generator=g)
    idx[:, 0], idx[:, -1], idx[::3, 60:70] = CLS, SEP, PAD  # sprinkle specials
    return idx


def run(idx, rate=0.15, seed=0):
    g = torch.Generator().manual_seed(seed)
    return mask_tokens(idx, mask_id=MASK, vocab_size=VOCAB, rate=rate, special_ids=(PAD, CLS, SEP), generator=g)


def test_rate_and_80_10_10_split():
    idx = batch()
    for rate in (0.15, 0.25):
        inputs, targets = run(idx, rate)
        ordinary = ~torch.isin(idx, torch.tensor(SPECIALS))
        chosen = targets != IGNORE_INDEX
        n = int(ordinary.sum())
        frac = chosen.sum().item() / n
        assert abs(frac - rate) < 4 * (rate * (1 - rate) / n) ** 0.5 + 1e-3
        m = int(chosen.sum())
        masked = (inputs == MASK) & chosen
        unchanged = (inputs == idx) & chosen
        assert abs(masked.sum().item() / m - 0.8) < 0.03
        # unchanged = the 10% kept + random draws that hit the original id by chance (~10%/46)
        assert abs(unchanged.sum().item() / m - 0.1) < 0.03


def test_specials_never_masked_and_targets_only_at_chosen_positions():
    idx = batch()
    inputs, targets = run(idx, rate=0.5)
    special = torch.isin(idx, torch.tensor(SPECIALS))
    assert torch.equal(inputs[special], idx[special])
    assert (targets[special] == IGNORE_INDEX).all()
    chosen = targets != IGNORE_INDEX
    assert torch.equal(targets[chosen], idx[chosen])
    assert torch.equal(inputs[~chosen], idx[~chosen])  # nothing outside the chosen set is touched


def test_random_replacements_are_never_special():
    idx = batch(shape=(256, 128))
    inputs, targets = run(idx, rate=1.0)
    chosen = targets != IGNORE_INDEX
    replaced = chosen & (inputs != MASK) & (inputs != idx)
    assert replaced.sum() > 1000
    assert not torch.isin(inputs[replaced], torch.tensor(SPECIALS)).any()
    assert (inputs[replaced] < VOCAB).all()


def test_deterministic_given_generator():
    idx = batch()
    a, b, c = run(idx, seed=7), run(idx, seed=7), run(idx, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert idx.dtype == a[0].dtype == a[1].dtype
