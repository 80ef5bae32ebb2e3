"""The task model: a pretrained body, a small head, and the encoding of examples into batches.

Pooling (one vector per text, for `classify`, `pair` and `regress`):
- causal bodies pool the hidden state of the *last* real token, the only position that has seen
  the whole text (GPT-1, Radford et al. 2018, section 3.3; Hugging Face `GPT2ForSequenceClassification`).
  We append the end-of-text token so that last position is the same token for every example.
- masked bodies pool the *mean* over real tokens: our masked objective has no next-sentence task
  (Cramming drops it), so the first token is not trained to summarise, and mean pooling is the
  stronger choice for MLM-only encoders (Reimers & Gurevych 2019, Sentence-BERT, table 7).

Tagging puts one label on the first subword of each word and ignores the others (BERT, Devlin et
al. 2019, section 5.3); prediction reads the label back from the same position.

Padding is on the right. A causal body needs no mask for it (real tokens never attend forward to
the pads); a masked body gets a key-padding mask so pads change nothing. Prefix tuning
(`methods.PrefixKV`) enters through the body's key/value-cache path, so the masks here also let
every query see the prefix positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class Encoded:
    ids: list[int]
    label: object = None  # class index, float, or per-token label indices (IGNORE_INDEX off first subwords)
    word_starts: list[int | None] | None = None  # tag: per word, the position of its first subword (None: cut off)


def special_ids(tokenizer) -> tuple[int | None, int | None, int | None]:
    """(cls, sep, eos) ids of the tokenizer, None where it has none."""
    return getattr(tokenizer, "cls_id", None), getattr(tokenizer, "sep_id", None), getattr(tokenizer, "eos_id", None)


def encode_text(tokenizer, objective: str, text: str, text2: str | None, max_len: int) -> list[int]:
    """Token ids of one example: `[CLS] a [SEP] (b [SEP])` for masked bodies, `a <eos> (b <eos>)` for causal."""
    cls_id, sep_id, eos_id = special_ids(tokenizer)
    a = tokenizer.encode(text)
    b = tokenizer.encode(text2) if text2 is not None else None
    if objective == "masked":
        head = [cls_id] if cls_id is not None else []
        sep = [sep_id] if sep_id is not None else ([eos_id] if eos_id is not None else [])
    else:
        head = []
        sep = [eos_id] if eos_id is not None else ([sep_id] if sep_id is not None else [])
    room = max_len - len(head) - len(sep) * (2 if b is not None else 1)
    if b is None:
        a = a[: max(1, room)]
        return head + a + sep
    # truncate the longer text first, one token at a time in effect (BERT's longest-first)
    while len(a) + len(b) > max(2, room):
        if len(a) >= len(b):
            a = a[:-1]
        else:
            b = b[:-1]
    return head + a + sep + b + sep


def encode_words(tokenizer, objective: str, words: list[str], max_len: int) -> tuple[list[int], list[int | None]]:
    """Token ids of a word sequence and, per word, the position of its first subword.

    A word gets None when truncation at `max_len` cut it off (or the tokenizer dropped it); the
    caller labels such words with the fallback tag and counts them."""
    ids, word_ids = tokenizer.encode_words(words)
    ids, word_ids = list(ids)[:max_len], list(word_ids)[:max_len]
    starts: list[int | None] = [None] * len(words)
    for pos, w in enumerate(word_ids):
        if w is not None and 0 <= w < len(words) and starts[w] is None:
            starts[w] = pos
    return ids or [0], starts


def collate(batch: list[Encoded], pad_id: int, task: str) -> dict[str, torch.Tensor]:
    """Right-padded idx (B, T), lengths (B,) and labels: (B,) classes/floats or (B, T) token labels."""
    T = max(len(e.ids) for e in batch)
    idx = torch.full((len(batch), T), pad_id, dtype=torch.long)
    for i, e in enumerate(batch):
        idx[i, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
    out = {"idx": idx, "lengths": torch.tensor([len(e.ids) for e in batch], dtype=torch.long)}
    if batch[0].label is None:
        return out
    if task == "tag":
        labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(batch):
            for pos, lab in zip(e.word_starts, e.label):
                if pos is not None:
                    labels[i, pos] = lab
        out["labels"] = labels
    elif task == "regress":
        out["labels"] = torch.tensor([e.label for e in batch], dtype=torch.float32)
    else:
        out["labels"] = torch.tensor([e.label for e in batch], dtype=torch.long)
    return out


class TaskModel(nn.Module):
    """Body + dropout + linear head. `kv_prefix` is set by prefix tuning (None otherwise)."""

    def __init__(self, body: nn.Module, task: str, num_labels: int, dropout: float = 0.1, pooling: str = "auto", head_bias: bool | None = None):
        super().__init__()
        self.body = body
        self.task = task
        self.objective = body.cfg.objective
        self.pooling = ("last" if self.objective == "causal" else "mean") if pooling == "auto" else pooling
        n_embd = body.cfg.n_embd
        self.head_dropout = nn.Dropout(dropout)
        if head_bias is None:
            # a causal body's class scores come without a bias, as in transformers' `...ForSequenceClassification`
            # (GPT-2, Llama: `score` has none), so the classifier exports to that class exactly
            head_bias = not (self.objective == "causal" and task in ("classify", "pair"))
        self.head = nn.Linear(n_embd, 1 if task == "regress" else num_labels, bias=head_bias)
        # small init keeps the untrained head's outputs near zero (a calm start for the body's gradients)
        nn.init.normal_(self.head.weight, std=0.02)
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)
        self.kv_prefix: nn.Module | None = None

    def attention_mask(self, lengths: torch.Tensor, T: int) -> torch.Tensor | None:
        """Bool (B, 1, T, P+T), True = may attend; None when plain causal attention is exact."""
        P = self.kv_prefix.prefix_len if self.kv_prefix is not None else 0
        if self.objective == "causal" and P == 0:
            return None  # right padding: real tokens never see the pads
        device = lengths.device
        keys = torch.arange(T, device=device)
        mask = keys[None, :] < lengths[:, None]  # (B, T) real keys
        mask = mask[:, None, None, :].expand(-1, 1, T, T)  # (B, 1, T, T)
        if self.objective == "causal":
            mask = mask & torch.ones(T, T, dtype=torch.bool, device=device).tril()
        if P:
            prefix = torch.ones(mask.shape[0], 1, T, P, dtype=torch.bool, device=device)
            mask = torch.cat([prefix, mask], dim=-1)  # every query sees the whole prefix
        return mask

    def hidden(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Normalised final hidden states (B, T, C)."""
        x = self.body.hidden_states(idx, kv_cache=self.kv_prefix, attn_mask=self.attention_mask(lengths, idx.shape[1]))
        return self.body.norm(x)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits (B, L), regression values (B,), or token logits (B, T, L)."""
        h = self.hidden(idx, lengths)
        # a body with a prediction head (model.mlm_head) passes the features through it, after pooling, as ModernBERT's
        # ...ForSequence/TokenClassification do (their `head` loads the masked-LM head's weights): fine-tuning starts from it
        transform = getattr(self.body, "mlm_head", None) or nn.Identity()
        if self.task == "tag":
            return self.head(self.head_dropout(transform(h)))
        if self.pooling == "last":
            pooled = h[torch.arange(h.shape[0], device=h.device), lengths - 1]  # (B, C)
        elif self.pooling == "first":
            pooled = h[:, 0]
        else:
            real = (torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]).to(h.dtype)  # (B, T)
            pooled = (h * real[..., None]).sum(1) / real.sum(1, keepdim=True)
        out = self.head(self.head_dropout(transform(pooled)))
        return out.squeeze(-1) if self.task == "regress" else out

    def loss(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.task == "regress":
            return F.mse_loss(out.float(), labels)  # labels are standardised by the trainer
        if self.task == "tag":
            return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
        return F.cross_entropy(out.float(), labels)


def encode_examples(tokenizer, objective: str, task: str, examples: list, max_len: int, label_index: dict | None, stats: dict | None) -> list:
    """Examples -> `Encoded` ids and label targets (class index, standardised float, or tag indices).

    `label_index` None (or an example without a label) gives `label=None`, for prediction input."""
    out = []
    for ex in examples:
        has_label = ex.label is not None and (label_index is not None or (task == "regress" and stats is not None))
        if task == "tag":
            ids, starts = encode_words(tokenizer, objective, ex.text, max_len)
            label = [label_index[t] for t in ex.label] if has_label and label_index is not None else None
            out.append(Encoded(ids, label, starts))
            continue
        ids = encode_text(tokenizer, objective, ex.text, ex.text2, max_len)
        if not has_label:
            label = None
        elif task == "regress":
            label = (float(ex.label) - stats["mean"]) / stats["std"]
        else:
            label = label_index[ex.label]
        out.append(Encoded(ids, label))
    return out


def set_body_dropout(body: nn.Module, p: float) -> None:
    """Dropout on the body's attention and residual branches for fine-tuning (BERT uses 0.1 throughout),
    whatever the pretraining used; applied from outside, so model.py keeps no fine-tuning flags."""
    for layer in body.layers.values():
        layer.attention.dropout = p
        layer.dropout = nn.Dropout(p) if p > 0 else nn.Identity()
