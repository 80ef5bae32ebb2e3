"""What a server serves: a run (a language model) or a fine-tuned directory (a classifier or tagger).

Everything model-specific the routes need lives here: tokenising prompts, the chat template, and
the non-generative tasks (classify, tag, embed), which run as one batched forward pass each.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from budgetlm.errors import UserError


@dataclass
class ChatTemplate:
    """A plain template for models that were never chat-tuned: "Role: text" lines, then "Assistant:".

    Generation stops at the next "\\nUser:" so the model does not write the user's turn too."""

    def render(self, messages: list) -> str:
        lines = [f"{'System' if m.role == 'developer' else m.role.capitalize()}: {m.content.strip()}" for m in messages]
        return "\n".join(lines) + "\nAssistant:"

    stops: tuple[str, ...] = ("\nUser:", "\nSystem:")


class Engine:
    """A loaded model. `kind` is "causal" (generates), "masked" (embeds only), or a fine-tuned task
    ("classify", "pair", "regress", "tag")."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        from budgetlm.finetune.labels import FINETUNE_FILE
        from budgetlm.run import load_run

        self.path = Path(path)
        self.device = torch.device(device)
        self.model_id = self.path.resolve().name
        self.task_model = None
        self.space = None
        self.meta: dict = {}
        if (self.path / FINETUNE_FILE).is_file():
            from budgetlm.finetune.predict import load_finetuned

            self.task_model, self.tokenizer, self.space, self.meta = load_finetuned(self.path, self.device)
            self.body = self.task_model.body
            self.kind = self.meta["task"]
            self.max_len = int(self.meta["max_len"])
        elif (self.path / "config.yaml").is_file():
            run = load_run(self.path, self.device)
            self.tokenizer, self.body = run.tokenizer, run.model
            self.kind = run.config.model.objective
            self.max_len = run.config.model.seq_len
        else:
            raise UserError(f"{self.path} is neither a run directory (config.yaml) nor a fine-tuned directory ({FINETUNE_FILE})")
        self.body.eval()
        self.seq_len = self.body.cfg.seq_len
        self.eos_id = getattr(self.tokenizer, "eos_id", None)
        self.chat = ChatTemplate()
        # classify/tag/embed run on request threads; one at a time keeps memory bounded and
        # leaves the cores to the generation thread's batch
        self.lock = threading.Lock()

    @property
    def generates(self) -> bool:
        return self.task_model is None and self.kind == "causal"

    def describe(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": 0, "owned_by": "budgetlm", "kind": self.kind, "context_length": self.seq_len}

    def encode_prompt(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        if not ids and self.eos_id is not None:
            ids = [self.eos_id]  # documents are separated by eos in training: a natural start
        return ids

    # -- the non-generative routes ---------------------------------------------------------------

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """One vector per text: the body's final-norm hidden states pooled as the fine-tuning heads
        pool them (the last token for causal bodies, the mean for masked ones); unit length.
        Returns (vectors, tokens read)."""
        from budgetlm.finetune.heads import encode_text

        objective = self.body.cfg.objective
        ids = [encode_text(self.tokenizer, objective, t, None, self.seq_len) for t in texts]
        lengths = torch.tensor([len(x) for x in ids], device=self.device)
        idx = self._pad(ids)
        T = idx.shape[1]
        real = torch.arange(T, device=self.device)[None, :] < lengths[:, None]  # (B, T)
        mask = real[:, None, None, :].expand(-1, 1, T, T)
        if objective == "causal":
            mask = mask & torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
        with self.lock:
            h = self.body.norm(self.body.hidden_states(idx, attn_mask=mask)).float()
        if objective == "causal":
            pooled = h[torch.arange(len(ids), device=self.device), lengths - 1]
        else:
            pooled = (h * real[..., None]).sum(1) / lengths[:, None]
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.cpu().tolist(), int(lengths.sum())

    @torch.inference_mode()
    def classify(self, texts: list[str]) -> list[dict]:
        from budgetlm.finetune.heads import collate, encode_examples
        from budgetlm.finetune.tasks import Example

        examples = [Example(text=t) for t in texts]
        encoded = encode_examples(self.tokenizer, self.task_model.objective, self.kind, examples, self.max_len, None, None)
        batch = collate(encoded, self._pad_id(), self.kind)
        with self.lock:
            out = self.task_model(batch["idx"].to(self.device), batch["lengths"].to(self.device)).float().cpu()
        results = []
        for row in out:
            if self.kind == "regress":
                results.append({"value": float(row) * self.space.stats["std"] + self.space.stats["mean"]})
                continue
            probs = row.softmax(-1).tolist()
            best = max(range(len(probs)), key=probs.__getitem__)
            results.append({"label": self.space.labels[best], "probabilities": dict(zip(self.space.labels, probs))})
        return results

    @torch.inference_mode()
    def tag(self, texts: list[str]) -> list[dict]:
        """Each text split on whitespace into words; a tag per word; BIO tags also grouped into spans."""
        from budgetlm.finetune.heads import collate, encode_examples
        from budgetlm.finetune.tasks import Example

        words = [t.split() or [""] for t in texts]
        encoded = encode_examples(self.tokenizer, self.task_model.objective, "tag", [Example(text=w) for w in words], self.max_len, None, None)
        batch = collate(encoded, self._pad_id(), "tag")
        with self.lock:
            logits = self.task_model(batch["idx"].to(self.device), batch["lengths"].to(self.device)).float().cpu()
        results = []
        for row, enc, ws in zip(logits, encoded, words):
            best = row.argmax(-1).tolist()
            tags = [self.space.labels[best[p]] if p is not None else self.space.fallback for p in enc.word_starts]
            results.append({"words": ws, "tags": tags, "spans": bio_spans(ws, tags)})
        return results

    def _pad_id(self) -> int:
        return self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0

    def _pad(self, ids: list[list[int]]) -> torch.Tensor:
        T = max(len(x) for x in ids)
        return torch.tensor([x + [self._pad_id()] * (T - len(x)) for x in ids], dtype=torch.long, device=self.device)


def bio_spans(words: list[str], tags: list[str]) -> list[dict]:
    """Entities of a BIO (or IOB2) tag sequence: {"label", "start", "end" (exclusive word index), "text"}.
    An I- tag that does not continue a span of its label starts one (conlleval's lenient reading)."""
    spans: list[dict] = []
    current = None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and current is not None and current["label"] == label
        if current is not None and not continues:
            current["end"] = i
            current["text"] = " ".join(words[current["start"] : i])
            spans.append(current)
            current = None
        if prefix in ("B", "I") and label and not continues:
            current = {"label": label, "start": i}
    return spans
