"""Batches of token windows: a seeded, resumable, rank-partitioned training stream and fixed
validation windows.

The training stream is a sequence of windows of ``seq_len + 1`` tokens (inputs ``w[:-1]``,
targets ``w[1:]``). Window ``i`` starts at token ``i * seq_len``, so consecutive windows share
one token and every token is a target exactly once per epoch. Epoch ``e`` visits all windows
in the permutation drawn from ``seed + e``. The stream is global: with ``world_size`` ranks
each asking for ``bs`` windows, rank ``r`` gets stream items ``[pos + r*bs, pos + (r+1)*bs)``
and everyone advances by ``bs * world_size``, so N ranks together see exactly what one process
asking for ``N * bs`` would (DDP gives the same math on 1 and N GPUs). The state is two
integers (epoch, pos), so resuming continues the exact order.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from budgetlm.errors import UserError


class TrainBatches:
    def __init__(self, tokens, seq_len: int, seed: int, rank: int = 0, world_size: int = 1):
        if seq_len < 1:
            raise UserError(f"seq_len must be >= 1, got {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise UserError(f"the training split has {len(tokens)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}")
        self._epoch = 0
        self._pos = 0  # next stream position within the current epoch
        self._perms: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        return self._pos

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:  # only the current and next epoch are ever needed
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng(self.seed + epoch)
            self._perms[epoch] = rng.permutation(self.n_windows)
        return self._perms[epoch]

    def window_indices(self, batch_size: int) -> list[int]:
        """The window indices this rank's next batch will hold (does not advance)."""
        return [w for _, w in self._items(batch_size)]

    def _items(self, batch_size: int) -> list[tuple[int, int]]:
        start = self._pos + self.rank * batch_size
        out = []
        for k in range(start, start + batch_size):
            epoch, i = self._epoch + k // self.n_windows, k % self.n_windows
            out.append((epoch, int(self._perm(epoch)[i])))
        return out

    def sample_ids(self, batch_size: int) -> list[int]:
        """A number per window of this rank's next batch, unique over the whole stream
        (epoch * n_windows + window): per-sample randomness (masking) seeded from it is the same
        whatever the number of processes. Does not advance."""
        return [e * self.n_windows + w for e, w in self._items(batch_size)]

    def next(self, batch_size: int) -> torch.Tensor:
        """A LongTensor (batch_size, seq_len + 1) of this rank's windows; advances all ranks' stream."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        idx = self.window_indices(batch_size)
        batch = np.stack([self.tokens.get(i * self.seq_len, self.seq_len + 1) for i in idx])
        self._pos += batch_size * self.world_size
        self._epoch += self._pos // self.n_windows
        self._pos %= self.n_windows
        return torch.from_numpy(batch)

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "pos": self._pos, "seed": self.seed, "seq_len": self.seq_len, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", "n_windows"):
            if key in state and state[key] != getattr(self, key):
                now = getattr(self, key)
                raise UserError(f"data loader state was saved with {key}={state[key]}, now {now}; resume needs the same data and settings")
        self._epoch = int(state["epoch"])
        self._pos = int(state["pos"])


SEQ_WARMUP_START = 1 / 8  # the sequence-length warm-up starts at this fraction of the context


def seq_len_at(progress: float, warmup: float, seq_len: int, multiple: int = 1) -> int:
    """The training sequence length at budget `progress` under a sequence-length warm-up.

    With `warmup` = w > 0 the length grows linearly from `seq_len / 8` at progress 0 to `seq_len`
    at progress w (Li et al. 2022, "The Stability-Efficiency Dilemma": short sequences early,
    the same tokens per batch), rounded down to a divisor of `seq_len` that is a multiple of
    `multiple` (sequence parallelism splits the length over ranks), so a full-length window is
    cut into whole shorter ones. Returns `seq_len` when the warm-up is off or over."""
    p = min(1.0, max(0.0, float(progress)))
    if warmup <= 0.0 or p >= warmup:
        return seq_len
    start = seq_len * SEQ_WARMUP_START
    target = start + (seq_len - start) * (p / warmup)
    fits = [d for d in range(multiple, seq_len + 1, multiple) if seq_len % d == 0 and d <= target]
    return max(fits) if fits else min(d for d in range(multiple, seq_len + 1, multiple) if seq_len % d == 0)


def split_windows(t: torch.Tensor, length: int) -> torch.Tensor:
    """(B, T) -> (B * T / length, length): each row cut into consecutive pieces of `length` tokens.

    Inputs and targets cut the same way keep every (input, target) pair of the batch, each piece
    seeing only its own earlier tokens: the same tokens per batch at a shorter context."""
    B, T = t.shape
    if T % length:
        raise ValueError(f"a sequence of {T} tokens does not cut into pieces of {length}")
    return t.reshape(B * (T // length), length)


def val_batches(tokens, seq_len: int, n_tokens: int, batch_size: int) -> Iterator[torch.Tensor]:
    """The first `n_tokens` of a split as fixed contiguous windows (same every call).

    ``n_tokens // seq_len`` windows (at least one), capped by what the split holds.
    """
    available = (len(tokens) - 1) // seq_len
    if available < 1:
        raise UserError(f"the validation split has {len(tokens)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}")
    n = min(available, max(1, n_tokens // seq_len))
    for b in range(0, n, batch_size):
        idx = range(b, min(n, b + batch_size))
        yield torch.from_numpy(np.stack([tokens.get(i * seq_len, seq_len + 1) for i in idx]))


class DeviceBatches:
    """Batches copied to `device`: on CUDA from pinned memory with non_blocking, so the copy is
    queued behind the GPU work already issued and the host makes the next batch meanwhile (the
    step asks for micro-batch i+1 right after issuing i's forward and backward).

    `make()` returns one CPU batch (a tensor or a tuple of tensors). Nothing is made ahead of
    what the step takes, so the data position saved in a checkpoint is exactly what was trained."""

    def __init__(self, make, device: torch.device):
        self.make = make
        self.device = device
        self.pin = device.type == "cuda"

    def _to_device(self, batch):
        if isinstance(batch, (tuple, list)):
            return type(batch)(self._to_device(t) for t in batch)
        if self.pin:
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=self.pin)

    def take(self, n: int) -> Iterator:
        """The next `n` batches, each made and copied when asked for."""
        for _ in range(n):
            yield self._to_device(self.make())
