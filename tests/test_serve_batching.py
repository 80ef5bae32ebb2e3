"""Continuous batching: sequences decoded together get the tokens each gets decoded alone, and a
newcomer joins the running batch instead of waiting for it to finish."""

import pytest
import torch

from budgetlm.config import ModelConfig
from budgetlm.generate import stream
from budgetlm.model import Transformer
from budgetlm.serve.scheduler import QueueFull, SamplingParams, Scheduler, Sequence
from budgetlm.serve.slots import SlotKVCache, decode_mask, prefill_mask


class Ids:
    """A stand-in tokenizer: token i decodes to chr(65 + i % 26), so text is easy to check."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(65 + i % 26) for i in ids)


def tiny_model(**overrides) -> Transformer:
    cfg = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=100, seq_len=32, n_kv_head=2)
    cfg.update(overrides)
    torch.manual_seed(0)
    return Transformer.build(ModelConfig(**cfg)).eval()


def run_alone(model, prompt, n, **sampling):
    return [int(t) for t in stream(model, torch.tensor([prompt]), n, **sampling)]


def collect(scheduler, prompt, params):
    events = []
    seq = Sequence(prompt, params, Ids(), events.append)
    scheduler.submit(seq)
    return seq, events


def run_to_end(scheduler, limit=500):
    for _ in range(limit):
        if not scheduler.active and not scheduler.waiting:
            return
        scheduler.step()
    raise AssertionError("the scheduler did not finish")


# value embeddings and the smear: the smear reads each row's previous embedding back from the cache
TOKEN_FEATURES = {"value_embeddings": "all", "smear": True}


def with_live_gates(model: Transformer) -> Transformer:
    """The gates start at zero (the smear off); set them as training would, so the test can see them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name or "smear" in name:
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("features", [{}, TOKEN_FEATURES], ids=["plain", "token-features"])
def test_per_row_positions_equal_one_row_at_a_time(features):
    """The model with a (B,) start_pos and a mask gives each row the logits it gets alone."""
    model = with_live_gates(tiny_model(**features))
    prompts = [torch.randint(0, 100, (n,)) for n in (5, 11, 8)]
    cache = SlotKVCache(model, 3)
    T = 11
    idx = torch.stack([torch.cat([p, torch.zeros(T - len(p), dtype=torch.long)]) for p in prompts])
    lens = torch.tensor([len(p) for p in prompts])
    cache.select(0, 3, T)
    with torch.no_grad():
        out = model(idx, kv_cache=cache, start_pos=0, attn_mask=prefill_mask(lens, T))
        nxt = torch.tensor([[7], [8], [9]])
        cache.select(0, 3, T + 1)
        step = model(nxt, kv_cache=cache, start_pos=lens, attn_mask=decode_mask(lens, T + 1))
        for i, p in enumerate(prompts):
            alone = model(torch.cat([p, nxt[i]])[None])
            torch.testing.assert_close(out[i, : len(p)], alone[0, :-1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(step[i, 0], alone[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "sampling, features",
    [(dict(temperature=0), {}), (dict(temperature=0.9, top_k=20, seed=5), {}), (dict(temperature=0), TOKEN_FEATURES)],
    ids=["greedy", "seeded", "greedy-token-features"],
)
def test_batched_sequences_equal_each_decoded_alone(sampling, features):
    # unequal prompts and lengths, arrivals at different steps, and 40 tokens past a 32-token context (the slide);
    # with the smear, the slot compaction (`move`) must carry each sequence's embeddings along
    model = with_live_gates(tiny_model(**features))
    torch.manual_seed(1)
    prompts = [torch.randint(0, 100, (n,)).tolist() for n in (3, 17, 9, 30)]
    lengths = [40, 12, 25, 6]
    sched = Scheduler(model, Ids(), max_batch=3)  # 4 requests, 3 slots: one waits for a slot
    runs = []
    for k, (prompt, n) in enumerate(zip(prompts, lengths)):
        runs.append(collect(sched, prompt, SamplingParams(max_tokens=n, **sampling)))
        if k < 2:
            sched.step()
    run_to_end(sched)
    for (_, events), prompt, n in zip(runs, prompts, lengths):
        tokens = [e.token_id for e in events]
        assert tokens == run_alone(model, prompt, n, **sampling)
        assert events[-1].finish_reason == "length" and sum(e.finish_reason is not None for e in events) == 1
        assert "".join(e.text for e in events) == Ids().decode(tokens)


def test_a_newcomer_joins_the_running_batch():
    model = tiny_model()
    sched = Scheduler(model, Ids(), max_batch=4)
    _, long_events = collect(sched, [1, 2, 3], SamplingParams(max_tokens=30, temperature=0))
    for _ in range(5):
        sched.step()
    _, short_events = collect(sched, [4, 5], SamplingParams(max_tokens=3, temperature=0))
    sched.step()
    assert len(sched.active) == 2  # decoding together
    sched.step()
    assert short_events[-1].finish_reason == "length"  # done while the long one still runs
    assert not long_events[-1].finish_reason and len(long_events) < 30


def test_stop_strings_eos_cancel_and_the_queue_bound():
    model = tiny_model()
    params = dict(max_tokens=20, temperature=1.0, seed=3)
    sampled = run_alone(model, [1, 2, 3], 20, temperature=1.0, seed=3)
    text = Ids().decode(sampled)
    stop = text[6:8]
    cut = text.find(stop)
    sched = Scheduler(model, Ids(), max_batch=2, max_queue=1)
    _, stopped = collect(sched, [1, 2, 3], SamplingParams(stop=[stop], **params))
    run_to_end(sched)
    assert "".join(e.text for e in stopped) == text[:cut] and stopped[-1].finish_reason == "stop"

    k = next(i for i in range(2, 20) if sampled[i] not in sampled[:i])  # the first new token after two: call it end-of-text
    sched.eos_id = sampled[k]
    _, eos = collect(sched, [1, 2, 3], SamplingParams(**params))
    run_to_end(sched)
    assert [e.token_id for e in eos[:-1]] == sampled[:k] and eos[-1].finish_reason == "stop" and eos[-1].token_id is None

    sched.eos_id = None
    seq, events = collect(sched, [1, 2, 3], SamplingParams(max_tokens=20, temperature=0))
    with pytest.raises(QueueFull):
        collect(sched, [1], SamplingParams())
    sched.step()
    sched.cancel(seq)
    sched.step()
    assert not sched.active and len(events) == 2  # the slot is free, nothing more was sent


def test_thread_serves_and_drains_on_stop():
    model = tiny_model()
    sched = Scheduler(model, Ids(), max_batch=4)
    sched.start()
    runs = [collect(sched, [i + 1, 2], SamplingParams(max_tokens=10, temperature=0)) for i in range(6)]
    sched.stop(timeout=60)  # stop drains: everything submitted before is finished
    assert not sched.thread.is_alive()
    assert all(events and events[-1].finish_reason == "length" for _, events in runs)
    with pytest.raises(QueueFull):
        collect(sched, [1], SamplingParams())
