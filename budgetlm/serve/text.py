"""Turning one sequence's token ids into the text a client receives: stop strings and held-back text.

Streaming must never send text that a stop string later cuts off, so the tail that could still be
the start of a stop string is held back until the next token decides it (what vLLM and
text-generation-inference do). Detokenisation is `IncrementalDecoder`'s (no broken UTF-8).
"""

from __future__ import annotations

from budgetlm.generate import IncrementalDecoder


class TextStream:
    """Feed token ids with `push`; it returns the text that is safe to send and whether a stop string matched."""

    def __init__(self, tokenizer, stop: list[str]):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # chars that could start a stop string
        self.text = ""  # everything decoded so far (cut at a stop string once one matched)
        self.sent = 0  # chars of self.text already returned
        self.stopped = False

    def push(self, token_id: int) -> str:
        piece = self.decoder.push(token_id)
        return self._advance(piece, final=False)

    def finish(self) -> str:
        """The held-back rest, once the sequence ended for another reason than a stop string."""
        return "" if self.stopped else self._advance(self.decoder.flush(), final=True)

    def _advance(self, piece: str, final: bool) -> str:
        if self.stopped:
            return ""
        search_from = max(0, len(self.text) - self.hold)
        self.text += piece
        cut = min((i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            final = True
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent : end], end
        return out
