"""Masked runs in ModernBERT's layout (LayerNorm, embedding norm, no first-block attention norm, prediction
head) export as `ModernBertForMaskedLM` and its classifiers: loaded by transformers' Auto classes alone,
they compute budgetlm's logits in fp32 (1e-5), padded batches included; layouts ModernBERT does not have
are refused with one line naming the option."""

import json

import pytest
import torch
from test_export_hf import ATOL, TEXTS, _finetune, _idx, _task_logits, data, export_task_logits, make_run, randomize_lora_b  # noqa: F401 (data: a fixture)

from budgetlm.cli import main
from budgetlm.export import export
from budgetlm.pretrain import pretrain, resolve_config
from budgetlm.run import load_run

transformers = pytest.importorskip("transformers")

# ModernBERT's layout; eps 1e-12 is the crammed-BERT recipe's, 1e-6 checks that the eps itself is carried
MODERNBERT = dict(objective="masked", norm="layernorm", embed_norm=True, first_attention_norm=False, mlm_head=True, mlp="geglu")


@pytest.mark.parametrize(
    "model",
    [
        {"norm_eps": 1e-12},  # tied decoder, GELU-gated MLP
        {"tie_embeddings": False, "mlp": "swiglu", "n_layer": 3},  # untied decoder, SiLU-gated: hidden_activation=silu
    ],
)
def test_masked_run_exports_as_modernbert_with_equal_logits(tmp_path, model):
    src = make_run(tmp_path / "run", **{**MODERNBERT, **model})
    assert main(["export", str(src), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    run = load_run(src)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "ModernBertForMaskedLM"
    assert set(hf.config.layer_types) == {"full_attention"} and hf.config.rope_parameters["full_attention"]["rope_theta"] == 500.0
    idx = _idx(run)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits.float(), run.model(idx), atol=ATOL, rtol=0)
        # a right-padded row: its real positions see only real keys, as in budgetlm's unpadded forward
        n = 25
        padded = idx.clone()
        padded[1, n:] = run.tokenizer.pad_id
        mask = torch.ones_like(idx)
        mask[1, n:] = 0
        theirs = hf(input_ids=padded, attention_mask=mask).logits.float()
        torch.testing.assert_close(theirs[1, :n], run.model(idx[1:, :n])[0], atol=ATOL, rtol=0)


def test_tokenizer_round_trip_and_special_tokens(tmp_path):
    src = make_run(tmp_path / "run", **MODERNBERT)
    export(src, tmp_path / "hf")
    ours = load_run(src).tokenizer
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == ours.encode(text) and tok.decode(ids) == ours.decode(ids)
    assert (tok.mask_token_id, tok.pad_token_id, tok.cls_token_id, tok.sep_token_id) == (ours.mask_id, ours.pad_id, ours.cls_id, ours.sep_id)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["pad_token_id"], config["cls_token_id"], config["sep_token_id"]) == (ours.pad_id, ours.cls_id, ours.sep_id)


@pytest.mark.parametrize(
    "task, method, file, extra, arch",
    [
        ("classify", "lora", "cls.csv", [], "ModernBertForSequenceClassification"),  # LoRA merged, mean pooling
        ("classify", "full", "cls.csv", ["--pooling", "first"], "ModernBertForSequenceClassification"),  # classifier_pooling=cls
        ("tag", "full", "pos.txt", ["--format", "tagged"], "ModernBertForTokenClassification"),
        ("regress", "full", "reg.jsonl", [], "ModernBertForSequenceClassification"),
    ],
)
def test_finetuned_classifier_exports_as_modernbert(tmp_path, data, task, method, file, extra, arch):  # noqa: F811
    base = make_run(tmp_path / "run", **MODERNBERT)
    ft = _finetune(base, tmp_path / "ft", data / file, "--task", task, "--method", method, *extra)
    hf, ours, theirs, _, _, space = export_task_logits(ft, tmp_path / "hf", task)
    assert type(hf).__name__ == arch
    if task != "regress":
        assert hf.config.id2label == dict(enumerate(space.labels)) and hf.config.label2id == {v: k for k, v in enumerate(space.labels)}
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


def test_a_pretrained_modernbert_layout_run_exports(prepared_wordpiece, tmp_path):
    """The options train: a short masked pretraining run in this layout (its loss through the prediction head) exports exactly."""
    keys = [f"model.{k}={v}" for k, v in MODERNBERT.items()]
    tiny = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.seq_len=32", "train.batch_tokens=256", "train.eval_tokens=512"]
    tiny.append("auto=false")
    metrics = pretrain(resolve_config(None, "steps:3", [*keys, *tiny], str(prepared_wordpiece)), tmp_path / "run")
    assert metrics["steps"] == 3
    export(tmp_path / "run", tmp_path / "hf")
    run = load_run(tmp_path / "run")
    assert run.model.mlm_head is not None and "layers.0.attention_norm.weight" not in run.model.state_dict()
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    idx = _idx(run, n=32)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits.float(), run.model(idx), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "model, option",
    [
        ({**MODERNBERT, "first_attention_norm": True}, "model.first_attention_norm=True"),  # the crammed-BERT recipe's layout
        ({**MODERNBERT, "mlm_head": False}, "model.mlm_head=False"),
        ({**MODERNBERT, "qk_norm": True}, "model.qk_norm=True"),
        ({**MODERNBERT, "n_kv_head": 2}, "model.n_kv_head=2"),
    ],
)
def test_layouts_modernbert_does_not_have_are_refused_with_one_line(tmp_path, capsys, model, option):
    src = make_run(tmp_path / "run", **model)
    assert main(["export", str(src), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and option in err, err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("targets", ["wq,wv", "wq,wk,wv,wo,w1,w2,w3"])
def test_lora_finetune_exports_as_a_peft_adapter_on_the_fused_modules(tmp_path, data, targets):  # noqa: F811
    """ModernBERT fuses q/k/v (Wqkv) and gate/value (Wi): each fused module gets one LoRA holding the updates of
    the matrices it fuses (A stacked, B block-diagonal, alpha scaled with the rank), which PEFT loads as it is."""
    peft = pytest.importorskip("peft")
    ft = _finetune(make_run(tmp_path / "run", **MODERNBERT), tmp_path / "ft", data / "cls.csv", "--method", "lora", "--lora-targets", targets)
    randomize_lora_b(ft)
    assert main(["export", str(ft), "--format", "hf", "--peft", "--out", str(tmp_path / "peft")]) == 0
    adapter = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["classifier"] and adapter["rank_pattern"]["attn.Wqkv"] == 8 * (2 if targets == "wq,wv" else 3)
    labels = transformers.AutoConfig.from_pretrained(tmp_path / "peft")
    hf_base = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "peft" / "base", config=labels)
    hf = peft.PeftModel.from_pretrained(hf_base, tmp_path / "peft").eval()
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in hf.named_modules() if n.endswith(".lora_A")}
    want = {"attn.Wqkv"} if targets == "wq,wv" else {"attn.Wqkv", "attn.Wo", "mlp.Wi", "mlp.Wo"}
    assert {n.split(".layers.0.", 1)[1] for n in adapted if ".layers.0." in n} == want  # Wo of attention and MLP kept apart
    ours, idx, mask, _ = _task_logits(ft, TEXTS, "classify")
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=idx, attention_mask=mask).logits.float(), ours, atol=ATOL, rtol=0)
        for name, p in hf.named_parameters():  # the LoRA updates off, the trained classifier kept: the logits move
            if "lora_B" in name:
                p.zero_()
        assert (hf(input_ids=idx, attention_mask=mask).logits.float() - ours).abs().max() > 1e-3
