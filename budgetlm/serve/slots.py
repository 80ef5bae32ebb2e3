"""A key/value cache whose rows are serving slots, each sequence at its own position.

`budgetlm.generate.KVCache` writes every row of the batch at one position, which is right for a
batch that starts together. A server decodes sequences that arrived at different times, so each
row has its own length: row i writes its new keys at `start_pos[i]` and its query may see keys
0..start_pos[i] only (the mask from `decode_mask`). Active sequences are kept in slots 0..n-1
(`move` fills the hole a finished sequence leaves), so a step reads a plain slice of the cache,
never a gathered copy.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    """(n_layer, n_slots, n_kv_head, max_len, hs) keys and values; `rows` is the slice of slots the
    next forward pass covers and `key_len` how many positions it reads back."""

    def __init__(self, model: torch.nn.Module, n_slots: int, max_len: int | None = None):
        from budgetlm.model import layer_sizes

        cfg = model.cfg
        weight = model.tok_embeddings.weight
        n_kv = max(layer_sizes(cfg, i)[1] for i in range(cfg.n_layer))  # a pruned model's blocks may hold fewer
        shape = (cfg.n_layer, n_slots, n_kv, max_len or cfg.seq_len, cfg.n_embd // cfg.n_head)
        self.k = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
        self.v = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
        self.n_slots, self.max_len = n_slots, shape[3]
        self.rows = slice(0, n_slots)
        self.key_len = self.max_len
        self.embeddings: torch.Tensor | None = None  # (n_slots, max_len, C) for model.smear, made on first use

    def select(self, first: int, count: int, key_len: int) -> None:
        """The next forward pass covers slots first..first+count-1 and reads keys 0..key_len-1."""
        if first + count > self.n_slots or key_len > self.max_len:
            raise ValueError(f"slots {first}..{first + count - 1} / {key_len} keys exceed the cache ({self.n_slots} x {self.max_len})")
        self.rows = slice(first, first + count)
        self.key_len = key_len

    def update(self, layer_id: int, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hs) of row i at start_pos[i]..start_pos[i]+T-1; return keys/values (B, nkv, key_len, hs)."""
        B, _, T, _ = k.shape
        if not isinstance(start_pos, torch.Tensor):
            start_pos = torch.full((B,), start_pos, dtype=torch.long, device=k.device)
        pos = start_pos[:, None] + torch.arange(T, device=k.device)  # (B, T)
        row = torch.arange(B, device=k.device)[:, None].expand(B, T)
        nkv = k.size(1)  # this block's key/value heads (fewer than the cache's in a pruned block)
        keys, values = self.k[layer_id, self.rows, :nkv], self.v[layer_id, self.rows, :nkv]  # views (B, nkv, max_len, hs)
        keys[row, :, pos] = k.transpose(1, 2)  # (B, T, nkv, hs): dims 0 and 2 indexed together
        values[row, :, pos] = v.transpose(1, 2)
        return keys[:, :, : self.key_len], values[:, :, : self.key_len]

    def shift(self, start_pos: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """For `model.smear`: each row's embedding at the position before each of x's (`shift_embeddings`)."""
        from budgetlm.generate import shift_embeddings

        if self.embeddings is None:
            self.embeddings = torch.zeros(self.n_slots, self.max_len, x.size(-1), device=x.device, dtype=self.k.dtype)
        return shift_embeddings(self.embeddings[self.rows], start_pos, x)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` positions into slot `dst` (compaction after a sequence ends)."""
        if src != dst and length > 0:
            self.k[:, dst, :, :length] = self.k[:, src, :, :length]
            self.v[:, dst, :, :length] = self.v[:, src, :, :length]
            if self.embeddings is not None:
                self.embeddings[dst, :length] = self.embeddings[src, :length]


def prefill_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B, 1, T, T) bool: causal, and no query sees a right-pad key (pads' own rows see key 0 at least)."""
    keys = torch.arange(T, device=lengths.device)
    causal = keys[None, :] <= keys[:, None]  # (T, T)
    real = keys[None, :] < lengths[:, None]  # (B, T)
    return (causal[None] & real[:, None, :])[:, None]


def decode_mask(positions: torch.Tensor, key_len: int) -> torch.Tensor:
    """(B, 1, 1, key_len) bool: the query of row i, at positions[i], sees keys 0..positions[i]."""
    keys = torch.arange(key_len, device=positions.device)
    return (keys[None, :] <= positions[:, None])[:, None, None, :]
