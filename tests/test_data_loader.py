"""Token arrays across shards, the training stream (determinism, resume, rank partition) and
fixed validation windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from budgetlm.config import PrepareConfig
from budgetlm.data.dataset import PreparedData, TokenArray
from budgetlm.data.loader import TrainBatches, seq_len_at, split_windows, val_batches
from budgetlm.data.prepare import prepare
from budgetlm.errors import UserError


class ArrayTokens:
    """The TokenArray interface over a numpy array (the loader needs only len and get)."""

    def __init__(self, n: int):
        self.a = np.arange(n, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.a)

    def get(self, start: int, length: int) -> np.ndarray:
        assert 0 <= start and start + length <= len(self.a)
        return self.a[start : start + length].copy()


def test_token_array_spans_shard_boundaries(tmp_path):
    chunks = [np.arange(0, 5), np.arange(5, 5), np.arange(5, 12), np.arange(12, 20)]
    paths = []
    for i, c in enumerate(chunks):
        p = tmp_path / f"train-{i:05d}.bin"
        c.astype(np.uint16).tofile(p)
        paths.append(p)
    arr = TokenArray(paths, [len(c) for c in chunks], "uint16")
    assert len(arr) == 20
    for start in range(20):
        for length in range(0, 21 - start):
            got = arr.get(start, length)
            assert got.dtype == np.int64 and got.tolist() == list(range(start, start + length))
    assert arr[3:15].tolist() == list(range(3, 15)) and arr[-1] == 19
    with pytest.raises(IndexError):
        arr.get(15, 6)


def test_prepared_tokens_equal_concatenated_shards(tmp_path, sample_text_dir):
    out = tmp_path / "data"
    prepare([str(sample_text_dir)], out, PrepareConfig(vocab_size=400, shard_tokens=4096, workers=1), show_progress=False)
    data = PreparedData(out)
    shards = data.manifest["splits"]["train"]["shards"]
    assert len(shards) > 3
    whole = np.concatenate([np.fromfile(out / s["file"], dtype=data.dtype) for s in shards]).astype(np.int64)
    arr = data.tokens("train")
    assert np.array_equal(arr.get(0, len(arr)), whole)
    assert np.array_equal(arr.get(4090, 20), whole[4090:4110])


def collect(loader: TrainBatches, steps: int, bs: int) -> list[torch.Tensor]:
    return [loader.next(bs) for _ in range(steps)]


def test_windows_are_consecutive_chunks_and_one_epoch_visits_each_once():
    tokens = ArrayTokens(101)
    loader = TrainBatches(tokens, seq_len=10, seed=0)
    assert loader.n_windows == 10
    batches = collect(loader, 5, 2)
    assert all(b.shape == (2, 11) and b.dtype == torch.long for b in batches)
    starts = sorted(int(w[0]) for b in batches for w in b)
    assert starts == list(range(0, 100, 10))  # every window exactly once in an epoch
    for b in batches:
        for w in b:
            assert torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 11))  # inputs w[:-1], targets w[1:]
    assert loader.epoch == 1


def test_order_is_seeded_and_changes_per_epoch():
    a = collect(TrainBatches(ArrayTokens(1001), 10, seed=1), 20, 5)
    b = collect(TrainBatches(ArrayTokens(1001), 10, seed=1), 20, 5)
    c = collect(TrainBatches(ArrayTokens(1001), 10, seed=2), 20, 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    epoch0 = [int(w[0]) for x in a[:20] for w in x][:100]
    epoch1 = [int(w[0]) for x in collect(TrainBatches(ArrayTokens(1001), 10, seed=1), 40, 5)[20:] for w in x]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1


def test_resume_continues_the_exact_order():
    full = collect(TrainBatches(ArrayTokens(977), 8, seed=3), 30, 7)  # crosses epoch boundaries (121 windows)
    first = TrainBatches(ArrayTokens(977), 8, seed=3)
    collect(first, 13, 7)
    state = first.state_dict()
    resumed = TrainBatches(ArrayTokens(977), 8, seed=3)
    resumed.load_state_dict(state)
    assert resumed.epoch == first.epoch
    rest = collect(resumed, 17, 7)
    assert all(torch.equal(x, y) for x, y in zip(full[13:], rest))
    with pytest.raises(UserError, match="seq_len"):
        TrainBatches(ArrayTokens(977), 16, seed=3).load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_partition_the_single_process_stream(world_size):
    bs, steps = 4, 25  # 25 * 4 * world_size windows: several epochs of 37
    single = collect(TrainBatches(ArrayTokens(371), 10, seed=5), steps, bs * world_size)
    ranks = [collect(TrainBatches(ArrayTokens(371), 10, seed=5, rank=r, world_size=world_size), steps, bs) for r in range(world_size)]
    for step in range(steps):
        together = torch.cat([ranks[r][step] for r in range(world_size)])
        assert torch.equal(together, single[step])
    # and a resumed rank continues its own share
    r1 = TrainBatches(ArrayTokens(371), 10, seed=5, rank=1, world_size=world_size)
    collect(r1, 7, bs)
    again = TrainBatches(ArrayTokens(371), 10, seed=5, rank=1, world_size=world_size)
    again.load_state_dict(r1.state_dict())
    assert torch.equal(again.next(bs), ranks[1][7])


def test_too_small_for_one_window():
    with pytest.raises(UserError, match="fewer than one window"):
        TrainBatches(ArrayTokens(10), seq_len=10, seed=0)
    with pytest.raises(UserError, match="fewer than one window"):
        next(val_batches(ArrayTokens(5), 8, 100, 2))


def test_val_batches_are_fixed_contiguous_windows():
    tokens = ArrayTokens(1000)
    a = list(val_batches(tokens, seq_len=16, n_tokens=160, batch_size=3))
    b = list(val_batches(tokens, seq_len=16, n_tokens=160, batch_size=3))
    assert [x.shape[0] for x in a] == [3, 3, 3, 1]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    windows = torch.cat(a)
    assert torch.equal(windows[:, 0], torch.arange(0, 160, 16)) and windows.shape[1] == 17
    capped = torch.cat(list(val_batches(tokens, seq_len=16, n_tokens=10**9, batch_size=64)))
    assert capped.shape[0] == 999 // 16  # never more than the split holds


def test_loader_on_prepared_data(prepared_bpe):
    data = PreparedData(prepared_bpe)
    loader = TrainBatches(data.tokens("train"), seq_len=32, seed=0)
    batch = loader.next(4)
    assert batch.shape == (4, 33) and int(batch.max()) < data.vocab_size
    val = next(val_batches(data.tokens("val"), 32, 256, 4))
    assert val.shape[1] == 33


def test_seq_warmup_schedule():
    assert seq_len_at(0.3, 0.0, 128) == 128  # off
    lengths = [seq_len_at(p / 100, 0.5, 128) for p in range(101)]
    assert lengths[0] == 16 and lengths[50:] == [128] * 51  # from seq_len/8, full from the end of the warm-up
    assert lengths == sorted(lengths) and set(lengths) == {16, 32, 64, 128}  # grows through divisors of seq_len
    # rounded down from the linear ramp 16 + 112 p / 0.5
    assert seq_len_at(0.10, 0.5, 128) == 32 and seq_len_at(0.30, 0.5, 128) == 64 and seq_len_at(0.49, 0.5, 128) == 64
    assert {seq_len_at(p / 20, 0.9, 96) for p in range(20)} == {12, 16, 24, 32, 48, 96}
    assert all(n % 4 == 0 for n in (seq_len_at(p / 20, 0.9, 96, multiple=4) for p in range(20)))  # split over 4 TP ranks
    assert seq_len_at(0.0, 0.5, 4) == 1 and seq_len_at(0.0, 0.5, 32, multiple=8) == 8


def test_split_windows_keeps_every_input_target_pair():
    loader = TrainBatches(ArrayTokens(1000), seq_len=16, seed=0)
    w = loader.next(3)  # (3, 17)
    x, y = w[:, :-1], w[:, 1:]
    xs, ys = split_windows(x, 4), split_windows(y, 4)
    assert xs.shape == ys.shape == (12, 4)
    assert torch.equal(ys, xs + 1)  # ArrayTokens holds 0, 1, 2, ...: each target is the next token
    assert torch.equal(xs.reshape(3, 16), x) and torch.equal(ys.reshape(3, 16), y)  # the same tokens, in order
    with pytest.raises(ValueError, match="pieces of 5"):
        split_windows(x, 5)
