"""Generation: the KV cache equals full recomputation, sampling rules, the incremental decoder."""

import pytest
import torch

from budgetlm.config import ModelConfig
from budgetlm.errors import UserError
from budgetlm.generate import IncrementalDecoder, KVCache, draw, generate, sample_next, stream
from budgetlm.model import Transformer


def tiny_model(seed=0, **overrides) -> Transformer:
    base = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=100, seq_len=32)
    base.update(overrides)
    torch.manual_seed(seed)
    return Transformer.build(ModelConfig(**base)).eval()


@pytest.mark.parametrize("n_kv_head, qk_norm", [(0, False), (2, False), (1, True)])
def test_kv_cache_logits_equal_full_recomputation(n_kv_head, qk_norm):
    model = tiny_model(n_kv_head=n_kv_head, qk_norm=qk_norm)
    seq = torch.randint(0, 100, (2, 24))
    full = model(seq)  # (B, T, V) without a cache
    cache = KVCache.for_model(model, batch_size=2)
    prefill = model(seq[:, :10], kv_cache=cache, start_pos=0)
    torch.testing.assert_close(prefill, full[:, :10], atol=1e-5, rtol=1e-5)
    for t in range(10, 16):  # one token at a time
        step = model(seq[:, t : t + 1], kv_cache=cache, start_pos=t)
        torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
    chunk = model(seq[:, 16:24], kv_cache=cache, start_pos=16)  # a multi-token chunk after cached tokens
    torch.testing.assert_close(chunk, full[:, 16:24], atol=1e-5, rtol=1e-5)


def test_greedy_is_deterministic_and_matches_uncached_argmax():
    model = tiny_model()
    prompt = torch.randint(0, 100, (2, 5))
    a = generate(model, prompt, 12, temperature=0)
    b = generate(model, prompt, 12, temperature=0)
    assert torch.equal(a, b) and a.shape == (2, 17)
    # the same tokens by recomputing the whole sequence each step (no cache)
    seq = prompt
    for _ in range(12):
        nxt = model(seq)[:, -1, :100].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(a, seq)


def test_seed_reproducibility():
    model = tiny_model()
    prompt = torch.randint(0, 100, (1, 4))
    a = generate(model, prompt, 20, temperature=1.0, seed=3)
    b = generate(model, prompt, 20, temperature=1.0, seed=3)
    c = generate(model, prompt, 20, temperature=1.0, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = tiny_model()
    prompt = torch.randint(0, 100, (2, 4))
    greedy = generate(model, prompt, 10, temperature=0)
    assert torch.equal(generate(model, prompt, 10, temperature=1.5, top_k=1, seed=0), greedy)
    assert torch.equal(generate(model, prompt, 10, temperature=1.5, top_p=1e-6, seed=0), greedy)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    k = {int(sample_next(logits, 8, temperature=1.0, top_k=2, generator=g)) for _ in range(300)}
    assert k == {0, 1}
    # probabilities ~ .64 .24 .09 .03 ...: top_p=0.8 keeps the first two
    p = {int(sample_next(logits, 8, temperature=1.0, top_p=0.8, generator=g)) for _ in range(300)}
    assert p == {0, 1}


def test_padded_vocab_ids_are_never_produced():
    model = tiny_model()  # vocab 100, padded to 128
    with torch.no_grad():
        model.output.weight[100:] = 0
        model.tok_embeddings.weight[100:] = 0
    logits = torch.zeros(4, 128)
    logits[:, 100:] = 1e4  # the padding rows would win every draw if they were allowed
    assert (sample_next(logits, 100, temperature=0) < 100).all()
    g = torch.Generator().manual_seed(0)
    assert (torch.stack([sample_next(logits, 100, temperature=2.0, generator=g) for _ in range(50)]) < 100).all()
    out = generate(model, torch.randint(0, 100, (4, 3)), 30, temperature=3.0, seed=1)
    assert (out < 100).all()


def test_eos_stops_and_context_slides():
    model = tiny_model()
    prompt = torch.randint(0, 100, (1, 3))
    first = int(generate(model, prompt, 1, temperature=0)[0, -1])
    assert generate(model, prompt, 10, temperature=0, eos_id=first).shape == (1, 4)
    # far past seq_len=32: the cache slides instead of failing; a prompt longer than seq_len is cropped
    long = generate(model, torch.randint(0, 100, (1, 40)), 50, temperature=1.0, seed=0)
    assert long.shape == (1, 90)


def test_sliding_matches_recomputation_on_the_kept_window():
    model = tiny_model(seq_len=16)
    prompt = torch.randint(0, 100, (1, 16))  # a full context: the first step after it slides
    out = generate(model, prompt, 2, temperature=0)
    window = out[:, 16 - 12 + 1 : 17]  # the last 3/4 of the context, ending at the first new token
    assert int(out[0, -1]) == int(model(window)[0, -1, :100].argmax())


def test_masked_model_is_refused():
    model = tiny_model(objective="masked", mlp="geglu", norm="layernorm")
    with pytest.raises(UserError, match="causal"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), 3)


def test_generation_restores_training_mode():
    model = tiny_model().train()
    generate(model, torch.zeros(1, 2, dtype=torch.long), 2, temperature=0)
    assert model.training


class ByteTokenizer:
    """UTF-8 bytes as tokens: one multi-byte character spans several ids."""

    eos_id = 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def test_incremental_decoder_never_splits_a_character():
    tok = ByteTokenizer()
    text = "héllo — 世界 🙂!"
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in tok.encode(text)] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_yields_one_step_at_a_time():
    model = tiny_model()
    steps = list(stream(model, torch.zeros(3, 2, dtype=torch.long), 4, temperature=0))
    assert len(steps) == 4 and all(s.shape == (3,) for s in steps)


def _fake_run(monkeypatch, objective="causal"):
    import types

    import budgetlm.run

    overrides = dict(vocab_size=257) if objective == "causal" else dict(vocab_size=257, objective="masked", mlp="geglu", norm="layernorm")
    model = tiny_model(**overrides)
    config = types.SimpleNamespace(model=model.cfg)
    fake = types.SimpleNamespace(model=model, config=config, tokenizer=ByteTokenizer())
    monkeypatch.setattr(budgetlm.run, "load_run", lambda run_dir, device="cpu": fake)


def test_generate_command_json_and_stream(monkeypatch, capsys):
    import json

    from budgetlm.cli import build_parser
    from budgetlm.generate import generate_command

    _fake_run(monkeypatch)
    args = build_parser().parse_args(["generate", "RUN", "--prompt", "héllo", "--max-new-tokens", "8", "--device", "cpu", "--json"])
    assert generate_command(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] == "héllo" and out["tokens"] <= 8 and out["tokens_per_s"] > 0 and isinstance(out["completion"], str)
    args = build_parser().parse_args(["generate", "RUN", "--prompt", "abc", "--max-new-tokens", "5", "--temperature", "0", "--device", "cpu"])
    assert generate_command(args) == 0
    assert capsys.readouterr().out.startswith("abc")


def test_generate_command_errors(monkeypatch):
    from budgetlm.cli import build_parser
    from budgetlm.generate import generate_command

    _fake_run(monkeypatch, objective="masked")
    args = build_parser().parse_args(["generate", "RUN", "--prompt", "x", "--device", "cpu"])
    with pytest.raises(UserError, match="causal model"):
        generate_command(args)
    args = build_parser().parse_args(["generate", "RUN", "--prompt", "x", "--top-p", "0", "--device", "cpu"])
    with pytest.raises(UserError, match="top-p"):
        generate_command(args)


def test_draw_gives_each_token_its_probability_and_never_an_impossible_one():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0]])
    n = 20000
    tokens = draw(probs.expand(n, -1), torch.rand(n, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(tokens, minlength=5).float() / n
    assert freq[1] == 0 and freq[4] == 0 and torch.allclose(freq, probs[0], atol=0.01)
    edges = draw(probs.expand(3, -1), torch.tensor([0.0, 0.0999, 1.0 - 1e-7]))
    assert edges.tolist() == [0, 0, 3]  # the zero-probability tail is never reached, even at u close to 1
