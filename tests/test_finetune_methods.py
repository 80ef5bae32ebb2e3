"""Fine-tuning methods: only the right parameters train, the start is the base model, LoRA merges exactly."""

import pytest
import torch
from test_finetune_runs import make_tiny_run

from budgetlm.finetune.heads import TaskModel
from budgetlm.finetune.methods import METHODS, MethodOptions, apply_method, merge_lora, trainable_report, trainable_state_dict
from budgetlm.run import load_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    return {obj: make_tiny_run(base / obj, obj) for obj in ("causal", "masked")}


def _model(run_dir, task="classify", method="full", **opts):
    body = load_run(run_dir).model
    torch.manual_seed(0)
    model = TaskModel(body, task, 3, dropout=0.0)
    return apply_method(model, method, MethodOptions(prefix_len=4, adapter_size=8, **opts))


def _batch(vocab=100):
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (4, 9), generator=g), torch.tensor([9, 6, 3, 1])


# which parameter names each method trains (besides the head)
TRAINS = {
    "full": lambda n: True,
    "lora": lambda n: "lora_" in n,
    "adapter": lambda n: ".adapter." in n,
    "prefix": lambda n: n.startswith("kv_prefix."),
}


@pytest.mark.parametrize("objective", ["causal", "masked"])
@pytest.mark.parametrize("method", METHODS)
def test_only_the_methods_parameters_train(runs, objective, method):
    model = _model(runs[objective], method=method)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith("head.") or TRAINS[method](n)}
    assert names == expected and any(not n.startswith("head.") for n in names)
    report = trainable_report(model)
    assert 0 < report["trainable_share"] <= 1 and (report["trainable_share"] < 0.5) == (method != "full")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx, lengths = _batch()
    for _ in range(2):
        loss = model.loss(model(idx, lengths), torch.tensor([0, 1, 2, 0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == (n in names), f"{method}: {n} changed={changed}"
    assert set(trainable_state_dict(model)) == names


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_method_starts_as_the_base_model(runs, method):
    base = _model(runs["causal"]).eval()
    adapted = _model(runs["causal"], method=method).eval()
    adapted.head.load_state_dict(base.head.state_dict())
    idx, lengths = _batch()
    torch.testing.assert_close(adapted(idx, lengths), base(idx, lengths))


@pytest.mark.parametrize("objective", ["causal", "masked"])
def test_merged_lora_equals_unmerged(runs, objective):
    model = _model(runs[objective], method="lora", lora_targets=("wq", "wv", "w2")).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)  # a trained-looking update (B starts at zero)
    idx, lengths = _batch()
    unmerged = model(idx, lengths)
    assert merge_lora(model) == 2 * 3
    assert not any("lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(idx, lengths), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("objective", ["causal", "masked"])
@pytest.mark.parametrize("method", ["full", "prefix"])
def test_padding_does_not_change_outputs(runs, objective, method):
    model = _model(runs[objective], method=method).eval()
    idx, _ = _batch()
    alone = model(idx[:1, :5], torch.tensor([5]))
    padded = model(torch.cat([idx[:1, :5], torch.zeros(1, 4, dtype=torch.long)], 1), torch.tensor([5]))
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_tagging_head_is_per_token(runs):
    model = _model(runs["masked"], task="tag", method="adapter").eval()
    idx, lengths = _batch()
    assert model(idx, lengths).shape == (4, 9, 3)
