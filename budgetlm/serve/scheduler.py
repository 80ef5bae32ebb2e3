"""Continuous (iteration-level) batching: every step decodes one token for all active sequences,
and new requests are admitted between steps (Orca, Yu et al. 2022; vLLM, Kwon et al. 2023).

A request therefore never waits for the batch ahead of it to finish: it waits at most one step,
is prefilled (with the other newcomers, right-padded into one forward pass), and joins the next
decode step. Each active sequence owns one row ("slot") of a `SlotKVCache` at its own position.
Sequences longer than the context slide exactly as `budgetlm generate` does (re-prefill the last
3/4 of the context), so a sequence decoded in a batch gets the tokens it would get decoded alone.

The scheduler runs in one thread; requests talk to it through `submit` / `cancel` and receive
`Event`s through the callback they passed (called on the scheduler thread: keep it cheap), and
`after_step` is called once each step has delivered its events.
"""

from __future__ import annotations

import logging
import random
import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from budgetlm.generate import SLIDE_KEEP, draw, sampling_probs
from budgetlm.serve.slots import SlotKVCache, decode_mask, prefill_mask
from budgetlm.serve.text import TextStream

log = logging.getLogger("budgetlm.serve")


class QueueFull(Exception):
    """The waiting queue is at its bound: the caller should answer 503 and ask to retry later."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # alternatives per token to report (0 = the chosen token's only); None = off


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]  # the most likely tokens at this step, best first


@dataclass
class Event:
    """What one step produced for one sequence: new text (may be empty while held back), the token,
    and on the last event the reason it ended ("stop", "length", "error")."""

    text: str
    token_id: int | None = None
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


class Sequence:
    """One request's (one choice's) generation state."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer, deliver: Callable[[Event], None]):
        if not prompt_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.deliver = deliver
        self.text = TextStream(tokenizer, params.stop)
        self.context: list[int] = list(prompt_ids)  # what the cache describes, plus the next input token
        self.cached = 0  # cache positions filled
        self.generated = 0
        self.cancelled = False
        self.finished = False
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        self.seed = seed
        self.generator: torch.Generator | None = None  # made on the model's device at admission


class Scheduler:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        max_batch: int = 32,
        max_queue: int = 256,
        max_prefill_tokens: int = 4096,
        eos_id: int | None = None,
        metrics=None,
        after_step: Callable[[], None] | None = None,
    ):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue, self.max_prefill_tokens = max_batch, max_queue, max_prefill_tokens
        self.eos_id = eos_id
        self.metrics = metrics
        self.after_step = after_step  # called once a step has delivered its events (the server wakes its event loop once)
        self.seq_len = model.cfg.seq_len
        self.keep = max(1, int(self.seq_len * SLIDE_KEEP))
        self.device = model.tok_embeddings.weight.device
        self.cache = SlotKVCache(model, max_batch)
        self.waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []  # active[i] owns cache slot i
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.steps = 0

    # -- the request side ------------------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        with self.cond:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the bound is {self.max_queue})")
            self.waiting.append(seq)
            self._gauges()
            self.cond.notify()

    def cancel(self, seq: Sequence) -> None:
        """The client went away: the sequence leaves at the next step, freeing its slot."""
        seq.cancelled = True
        with self.cond:
            self.cond.notify()

    def load(self) -> tuple[int, int]:
        """(active sequences, waiting sequences)."""
        with self.cond:
            return len(self.active), len(self.waiting)

    # -- the thread ------------------------------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="budgetlm-scheduler", daemon=True)
        self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new work, finish what is active or waiting, then end the thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.active and not self.waiting and not self.stopping:
                    self.cond.wait()
                if self.stopping and not self.active and not self.waiting:
                    return
            try:
                self.step()
            except Exception:  # a bug must not leave clients hanging: fail what is in flight, keep serving
                log.error("scheduler step failed:\n%s", traceback.format_exc())
                with self.cond:
                    failed = self.active + list(self.waiting)
                    self.active, self.waiting = [], deque()
                for seq in failed:
                    self._finish(seq, "error", error="internal error while generating")
            if self.after_step is not None:
                self.after_step()

    # -- one iteration ---------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """Drop cancelled sequences, admit and prefill newcomers, then decode one token for every active sequence."""
        self._remove([i for i, s in enumerate(self.active) if s.cancelled])
        new: list[Sequence] = []
        with self.cond:
            budget = self.max_prefill_tokens
            while self.waiting and len(self.active) + len(new) < self.max_batch:
                seq = self.waiting[0]
                if seq.cancelled:
                    self.waiting.popleft()
                    continue
                n = min(len(seq.context), self.seq_len)
                if new and n > budget:
                    break  # the rest waits for the next step, so decoding sequences are not stalled by a long prefill
                budget -= n
                new.append(self.waiting.popleft())
        if new:
            for seq in new:
                seq.context = seq.context[-self.seq_len :]
                seq.generator = torch.Generator(device=self.device).manual_seed(seq.seed)
            first = len(self.active)
            self.active.extend(new)
            self._prefill(first, new)
        if self.active:
            self._decode()
        self.steps += 1
        self._gauges()

    def _prefill(self, first: int, seqs: list[Sequence]) -> None:
        """Run the contexts of seqs (slots first..) through the model into the cache; sample each one's next token."""
        lengths = [len(s.context) for s in seqs]
        T = max(lengths)
        pad = self.eos_id if self.eos_id is not None else 0
        idx = torch.tensor([s.context + [pad] * (T - len(s.context)) for s in seqs], dtype=torch.long, device=self.device)
        lens = torch.tensor(lengths, dtype=torch.long, device=self.device)
        self.cache.select(first, len(seqs), T)
        h = self.model.hidden_states(idx, kv_cache=self.cache, start_pos=0, attn_mask=prefill_mask(lens, T))
        last = h[torch.arange(len(seqs), device=self.device), lens - 1]  # (m, C): only the last real position is needed
        logits = self._logits(last)
        for seq, n in zip(seqs, lengths):
            seq.cached = n
        self._advance(list(range(first, first + len(seqs))), logits)

    def _decode(self) -> None:
        """One token for every active sequence (newcomers included: their prefill already gave them one)."""
        # a sequence whose cache is full slides: re-prefill the last 3/4 of its context in its own slot
        for seq in [s for s in self.active if s.cached == self.seq_len]:
            if seq in self.active:  # a slide's token may have ended it
                seq.context = seq.context[-self.keep :]
                self._prefill(self.active.index(seq), [seq])
        if not self.active:
            return
        n = len(self.active)
        positions = torch.tensor([s.cached for s in self.active], dtype=torch.long, device=self.device)
        idx = torch.tensor([[s.context[-1]] for s in self.active], dtype=torch.long, device=self.device)
        key_len = int(positions.max()) + 1
        self.cache.select(0, n, key_len)
        h = self.model.hidden_states(idx, kv_cache=self.cache, start_pos=positions, attn_mask=decode_mask(positions, key_len))
        for seq in self.active:
            seq.cached += 1
        if self.metrics is not None:
            self.metrics.batch_sizes.observe(n)
        self._advance(list(range(n)), self._logits(h[:, 0]))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """The model's output head on hidden states (m, C) -> fp32 logits (m, padded_vocab), soft-capped as in forward."""
        logits = self.model.output(self.model.norm(h)).float()
        cap = self.model.cfg.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def _advance(self, rows: list[int], logits: torch.Tensor) -> None:
        """Sample the next token of active[rows[j]] from logits[j]; deliver it; retire finished sequences."""
        vocab = self.model.vocab_size
        seqs = [self.active[i] for i in rows]
        tokens = self._sample(seqs, logits).tolist()
        if self.metrics is not None:
            self.metrics.tokens_generated.inc(len(seqs))  # once a step: the counter takes a lock
        want_lp = any(s.params.logprobs is not None for s in seqs)
        logprobs = torch.log_softmax(logits[:, :vocab].float(), dim=-1) if want_lp else None
        done = []
        for j, (i, seq, token) in enumerate(zip(rows, seqs, tokens)):
            p = seq.params
            seq.generated += 1
            if self.eos_id is not None and token == self.eos_id:
                self._finish(seq, "stop")
                done.append(i)
                continue
            lp = self._logprob(logprobs[j], token, p.logprobs) if p.logprobs is not None else None
            text = seq.text.push(token)
            seq.context.append(token)
            if seq.text.stopped:
                self._finish(seq, "stop", text=text, token_id=token, logprob=lp)
                done.append(i)
            elif seq.generated >= p.max_tokens:
                self._finish(seq, "length", text=text + seq.text.finish(), token_id=token, logprob=lp)
                done.append(i)
            else:
                seq.deliver(Event(text=text, token_id=token, logprob=lp, completion_tokens=seq.generated))
        self._remove(done)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """The next token of every sequence, sampled as `budgetlm generate` samples it alone: the rows that
        share sampling settings in one batched call, each row drawing its number from its own generator."""
        vocab = self.model.vocab_size
        tokens = torch.argmax(logits[:, :vocab], dim=-1)  # temperature 0; the others are overwritten
        groups: dict[tuple, list[int]] = {}
        for j, seq in enumerate(seqs):
            p = seq.params
            if p.temperature > 0:
                groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(j)
        for (temperature, top_k, top_p), rows in groups.items():
            probs = sampling_probs(logits[rows], vocab, temperature=temperature, top_k=top_k, top_p=top_p)
            uniform = torch.cat([torch.rand(1, generator=seqs[j].generator, device=probs.device) for j in rows])
            tokens[rows] = draw(probs, uniform)
        return tokens

    def _logprob(self, row: torch.Tensor, token: int, top: int) -> TokenLogprob:
        alternatives = []
        if top > 0:
            values, ids = torch.topk(row, min(top, row.numel()))
            alternatives = [(self.tokenizer.decode([int(t)]), float(v)) for v, t in zip(values, ids)]
        return TokenLogprob(self.tokenizer.decode([token]), float(row[token]), alternatives)

    def _finish(self, seq: Sequence, reason: str, text: str = "", token_id=None, logprob=None, error: str | None = None) -> None:
        if seq.finished:
            return
        seq.finished = True
        if reason == "stop" and not seq.text.stopped:
            text += seq.text.finish()  # end of text: release what was held back for stop strings
        seq.deliver(Event(text=text, token_id=token_id, logprob=logprob, finish_reason=reason, completion_tokens=seq.generated, error=error))

    def _remove(self, rows: list[int]) -> None:
        """Retire active[rows], keeping active sequences in slots 0..n-1: the last one moves into each hole."""
        for i in sorted(rows, reverse=True):
            last = len(self.active) - 1
            if i != last:
                self.cache.move(last, i, self.active[last].cached)
                self.active[i] = self.active[last]
            self.active.pop()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.batch_size.set(len(self.active))
            self.metrics.queue_depth.set(len(self.waiting))
