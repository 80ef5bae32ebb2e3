"""Text generation: a preallocated key/value cache, sampling, and the `budgetlm generate` verb.

The prompt is run once (prefill) filling the cache; then each new token costs one forward pass
of length 1 that attends to the cached keys and values (the standard incremental decoding of
Transformer decoders; Pope et al. 2022 for the cost analysis).

Context length: the model was trained with `seq_len` positions and its rotary tables stop there.
A prompt longer than that keeps its last `seq_len` tokens. When the cache is full, generation
slides: it keeps the most recent 3/4 of the context and re-runs it as a fresh prefill (positions
restart at 0, which is how the model saw every training window), then continues one token at a
time. Re-prefilling once every seq_len/4 tokens keeps the amortised cost near that of plain
cached decoding, and every token is predicted from at least 3/4 of a full context.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator

import torch

from budgetlm.errors import UserError

SLIDE_KEEP = 0.75  # fraction of the context kept when the cache is full


class KVCache:
    """Keys and values of every layer, preallocated as (n_layer, B, n_kv_head, max_len, hs)."""

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int, *, device=None, dtype=torch.float32):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.embeddings: torch.Tensor | None = None  # (B, max_len, C) embeddings for model.smear, made on first use

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int | None = None) -> KVCache:
        from budgetlm.model import layer_sizes

        cfg = model.cfg
        weight = model.tok_embeddings.weight
        return cls(
            cfg.n_layer,
            batch_size,
            max(layer_sizes(cfg, i)[1] for i in range(cfg.n_layer)),  # a pruned model's blocks may hold fewer
            max_len or cfg.seq_len,
            cfg.n_embd // cfg.n_head,
            device=weight.device,
            dtype=weight.dtype,
        )

    def update(self, layer_id: int, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hs) at start_pos..start_pos+T-1; return keys/values 0..start_pos+T-1."""
        end = start_pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        nkv = k.size(1)
        self.k[layer_id, :, :nkv, start_pos:end] = k
        self.v[layer_id, :, :nkv, start_pos:end] = v
        return self.k[layer_id, :, :nkv, :end], self.v[layer_id, :, :nkv, :end]  # (B, nkv, end, hs)

    def shift(self, start_pos: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """For `model.smear`: see `shift_embeddings`."""
        if self.embeddings is None:
            self.embeddings = torch.zeros(self.k.size(1), self.max_len, x.size(-1), device=x.device, dtype=self.k.dtype)
        return shift_embeddings(self.embeddings, start_pos, x)


def shift_embeddings(store: torch.Tensor, start_pos: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Keep the embeddings x (B, T, C) in `store` (B, max_len, C) at their positions (start_pos.., one
    int or (B,) per row) and return, for each, the embedding at the position before it (zeros at
    position 0): what `model.smear` mixes in when decoding continues from cached positions."""
    B, T, _ = x.shape
    start = torch.as_tensor(start_pos, device=x.device).reshape(-1, 1).expand(B, 1)
    pos = start + torch.arange(T, device=x.device)  # (B, T)
    if int(pos.max()) >= store.size(1):
        raise ValueError(f"KV cache holds {store.size(1)} positions, asked to write up to {int(pos.max()) + 1}")
    rows = torch.arange(B, device=x.device)[:, None]
    store[rows, pos] = x.to(store.dtype)
    previous = store[rows, (pos - 1).clamp(min=0)]
    return previous.masked_fill((pos == 0)[..., None], 0.0).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# sampling


def sampling_probs(logits: torch.Tensor, vocab_size: int, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Probabilities (B, V) to sample the next token from, given logits (B, padded_vocab) and temperature > 0.
    Ids >= vocab_size (the padding rows of the output projection) are cut off before anything else,
    so they can never be produced. top_k keeps the k most likely; top_p keeps the smallest set whose
    probability reaches p (nucleus sampling, Holtzman et al. 2020)."""
    logits = logits[:, :vocab_size].float() / temperature  # (B, V)
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p; the first always stays
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(dim=-1)


def draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Token ids (B,) from probabilities (B, V) and one uniform number in [0, 1) per row: the first id
    whose cumulative probability exceeds it (inverse-CDF sampling). A row's token depends on that row
    and its own number alone, so a sequence sampled inside a batch (`budgetlm serve`, one random
    stream per sequence) gets the token it gets sampled alone."""
    cdf = probs.cumsum(dim=-1)
    token = (cdf <= uniform.to(cdf.dtype).unsqueeze(-1) * cdf[:, -1:]).sum(dim=-1)  # scaled: the sum may round below 1
    # never past the last token with non-zero probability (a zero-probability tail ties the cdf)
    return torch.minimum(token, (probs > 0).cumsum(dim=-1).argmax(dim=-1))


def sample_next(
    logits: torch.Tensor,
    vocab_size: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, padded_vocab); temperature 0 = greedy (see `sampling_probs`).
    Each row takes one number from `generator`, in row order."""
    if temperature == 0:
        return logits[:, :vocab_size].argmax(dim=-1)
    probs = sampling_probs(logits, vocab_size, temperature=temperature, top_k=top_k, top_p=top_p)
    return draw(probs, torch.rand(len(probs), generator=generator, device=probs.device))


@torch.inference_mode()
def stream(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B,) one step at a time after the prompt `idx` (B, T).

    Stops after `max_new_tokens`, or once every row has produced `eos_id` (rows that finished
    earlier keep yielding `eos_id`). `seed` makes sampling reproducible when no `generator` is
    given. The model runs in eval mode; its previous mode is restored afterwards."""
    cfg = model.cfg
    if cfg.objective != "causal":
        raise UserError("generate needs a causal model; this one was trained with the masked objective")
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError("idx must be a non-empty (B, T) tensor of token ids")
    device = idx.device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    seq_len, vocab_size = cfg.seq_len, model.vocab_size
    keep = max(1, int(seq_len * SLIDE_KEEP))

    was_training = model.training
    model.eval()
    try:
        history = idx[:, -seq_len:]  # (B, <= seq_len): the context the cache describes
        cache = KVCache.for_model(model, idx.size(0))
        logits = model(history, kv_cache=cache, start_pos=0)[:, -1]  # prefill -> (B, V)
        pos = history.size(1)
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            nxt = sample_next(logits, vocab_size, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)  # (B,)
            if eos_id is not None:
                nxt = nxt.masked_fill(finished, eos_id)
                finished |= nxt == eos_id
            yield nxt
            if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
                return
            history = torch.cat([history, nxt[:, None]], dim=1)[:, -seq_len:]
            if pos == seq_len:  # cache full: slide (see the module docstring)
                history = history[:, -keep:]
                logits = model(history, kv_cache=cache, start_pos=0)[:, -1]
                pos = history.size(1)
            else:
                logits = model(nxt[:, None], kv_cache=cache, start_pos=pos)[:, -1]  # (B, V)
                pos += 1
    finally:
        model.train(was_training)


def generate(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """The prompt followed by the generated tokens, (B, T + n) with n <= max_new_tokens.
    Keyword arguments as for `stream` (temperature, top_k, top_p, seed, generator, eos_id)."""
    new = list(stream(model, idx, max_new_tokens, **kwargs))
    if not new:
        return idx
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1)


# ---------------------------------------------------------------------------------------------
# the CLI verb


class IncrementalDecoder:
    """Turn a growing list of ids into text pieces that are safe to print.

    A byte-level BPE token can end in the middle of a UTF-8 character, so decoding token by token
    would print replacement characters. Re-decode a short tail instead (two offsets, as Hugging
    Face text-generation-inference does) and hold text back while it ends in U+FFFD."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the tail that is re-decoded for context
        self.read_offset = 0  # ids before this are printed

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]


def check_sampling(cfg) -> None:
    if cfg.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {cfg.max_new_tokens}")
    if cfg.temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {cfg.temperature}")
    if cfg.top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 = off), got {cfg.top_k}")
    if not 0 < cfg.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1] (1 = off), got {cfg.top_p}")


def generate_text(run, prompt: str, cfg=None, on_text=None) -> dict:
    """Sample a completion of `prompt` from a loaded run (`budgetlm.run.Run`); `on_text(piece)` sees
    the text as it is decoded. Returns the prompt, the completion, its token count and speed."""
    from budgetlm.config import GenerateConfig

    cfg = cfg or GenerateConfig()
    check_sampling(cfg)
    if run.config.model.objective != "causal":
        where = getattr(run, "dir", "the run")
        raise UserError(f"generate needs a causal model; {where} was trained with the masked objective (use finetune or suite)")
    tok = run.tokenizer
    device = next(run.model.parameters()).device
    eos_id = getattr(tok, "eos_id", None)
    prompt_ids = tok.encode(prompt)
    if not prompt_ids:
        if eos_id is None:
            raise UserError("the prompt is empty and the tokenizer has no end-of-text token to start from")
        prompt_ids = [eos_id]  # documents are separated by eos in training, so it is a natural start
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)

    decoder = IncrementalDecoder(tok)
    pieces: list[str] = []
    n_tokens = 0
    start = time.perf_counter()
    sampling = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed, eos_id=eos_id)
    for nxt in stream(run.model, idx, cfg.max_new_tokens, **sampling):
        token_id = int(nxt[0])
        if token_id == eos_id:
            break
        n_tokens += 1
        piece = decoder.push(token_id)
        pieces.append(piece)
        if piece and on_text:
            on_text(piece)
    elapsed = time.perf_counter() - start
    tail = decoder.flush()
    pieces.append(tail)
    if tail and on_text:
        on_text(tail)
    return {
        "prompt": prompt,
        "completion": "".join(pieces),
        "tokens": n_tokens,
        "tokens_per_s": round(n_tokens / elapsed, 2) if elapsed > 0 else None,
    }


def generate_command(args) -> int:
    from budgetlm.config import GenerateConfig
    from budgetlm.flags import print_config, settings_from_args
    from budgetlm.run import load_run, resolve_device

    cfg = settings_from_args(GenerateConfig, args)
    if args.print_config:
        print_config(cfg, args.json)
        return 0
    check_sampling(cfg)  # before the run is loaded
    run = load_run(args.run, resolve_device(cfg.device))
    if args.json:
        print(json.dumps(generate_text(run, args.prompt, cfg), ensure_ascii=False))
        return 0

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    write(args.prompt)
    generate_text(run, args.prompt, cfg, on_text=write)
    write("\n")
    return 0
