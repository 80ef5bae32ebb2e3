"""`budgetlm export --format hf`: each exported kind loads with transformers' Auto classes alone and
computes budgetlm's logits (fp32, 1e-5); the tokenizer round-trips; greedy generation matches;
options no Hugging Face family holds are refused with one line."""

import json
from pathlib import Path

import pytest
import torch

from budgetlm.checkpoint import save_weights
from budgetlm.cli import main
from budgetlm.config import ModelConfig, RunConfig, save_config
from budgetlm.data.tokenizer import train_tokenizer
from budgetlm.errors import UserError
from budgetlm.export import export
from budgetlm.finetune.heads import collate, encode_examples
from budgetlm.finetune.predict import load_finetuned
from budgetlm.finetune.tasks import Example
from budgetlm.generate import generate
from budgetlm.model import Transformer
from budgetlm.run import load_run

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

FEATURES = {"value_embeddings": "all", "smear": True}
WORDS = "the a good bad film movie great awful plot actor boring fun dull fine dog cat sat on mat".split()
TEXTS = ["the film was good and the plot was fun", "a dog sat on the mat", "awful"]
ATOL = 1e-5


def make_run(path, objective="causal", seed=0, **model):
    """A 2-layer, 64-wide run with random weights, its norm gains away from 1 and its token features' gates
    (zero at initialisation) live, so a mapping slip shows."""
    path.mkdir(parents=True, exist_ok=True)
    kind = "bpe" if objective == "causal" else "wordpiece"
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
    tok = train_tokenizer(kind, texts, vocab_size=300, min_frequency=1)
    defaults = dict(objective=objective, n_layer=2, n_head=4, n_embd=64, vocab_size=tok.vocab_size, seq_len=64, mlp="swiglu", norm="rmsnorm",
                    rope_theta=500.0, norm_eps=1e-6, init_std=0.1)  # fmt: skip
    cfg = RunConfig(model=ModelConfig(**{**defaults, **model}))
    torch.manual_seed(seed)
    m = Transformer.build(cfg.model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            elif "gate" in name:
                p.normal_(0, 0.5)
    save_config(cfg, path / "config.yaml")
    tok.save(path / "tokenizer.json")
    save_weights(path / "model.safetensors", m)
    return path


def _idx(run, n=40, seed=1):
    return torch.randint(0, run.model.vocab_size, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "model, arch",
    [
        ({}, "LlamaForCausalLM"),  # tied, multi-head
        ({"tie_embeddings": False, "n_kv_head": 2}, "LlamaForCausalLM"),  # untied head, grouped-query attention
        ({"mlp": "geglu", "n_kv_head": 1}, "LlamaForCausalLM"),  # GELU-gated MLP: Llama's hidden_act=gelu
        ({"qk_norm": True, "tie_embeddings": False}, "Qwen3ForCausalLM"),  # QK-norm: Qwen3 has it, Llama does not
        # the token features (the plan's small causal models): Qwen3 plus them, in the directory's modeling file
        ({"qk_norm": True, "tie_embeddings": False, "n_kv_head": 2, **FEATURES}, "Qwen3TokenFeaturesForCausalLM"),
        ({"value_embeddings": "alternate", "n_layer": 3}, "Qwen3TokenFeaturesForCausalLM"),  # no QK-norm, no smear
        ({"smear": True}, "Qwen3TokenFeaturesForCausalLM"),
    ],
)
def test_causal_run_exports_with_equal_logits_and_greedy_tokens(tmp_path, model, arch):
    src = make_run(tmp_path / "run", **model)
    assert main(["export", str(src), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    run = load_run(src)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert type(hf).__name__ == arch
    idx = _idx(run)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits.float(), run.model(idx), atol=ATOL, rtol=0)
    # greedy generation, stopping at <|endoftext|> like `budgetlm generate --temperature 0`
    prompt = torch.tensor([run.tokenizer.encode("the film")])
    ours = generate(run.model, prompt, 20, temperature=0, eos_id=run.tokenizer.eos_id)
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False)
    assert theirs[0].tolist() == ours[0].tolist()


def test_token_features_export_generates_left_padded_batches_and_beams_as_single_prompts(tmp_path):
    """The smear reads the token before each one: generate() passes it per step, masked where the batch pads."""
    export(make_run(tmp_path / "run", qk_norm=True, **FEATURES), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True, padding_side="left")
    texts = ["the film was good and", "a dog"]
    batch = hf.generate(**tok(texts, return_tensors="pt", padding=True), max_new_tokens=12, do_sample=False)
    for row, text in zip(batch, texts):
        single = hf.generate(**tok(text, return_tensors="pt"), max_new_tokens=12, do_sample=False)
        assert row[-12:].tolist() == single[0, -12:].tolist()
    one = tok(texts[0], return_tensors="pt")
    beams = hf.generate(**one, max_new_tokens=12, do_sample=False, num_beams=3)
    assert beams.tolist() == hf.generate(**one, max_new_tokens=12, do_sample=False, num_beams=3, use_cache=False).tolist()


@pytest.mark.parametrize("model", [{"qk_norm": True, **FEATURES}, {"value_embeddings": "alternate", "n_layer": 3}])
def test_token_features_export_imports_back_to_the_same_model(tmp_path, model):
    from budgetlm.importer import import_hf

    src = make_run(tmp_path / "run", **model)
    export(src, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "back")
    a, b = load_run(src), load_run(tmp_path / "back")
    for key in ("qk_norm", "value_embeddings", "smear", "n_layer", "tie_embeddings"):
        assert getattr(a.config.model, key) == getattr(b.config.model, key), key
    back = b.model.state_dict()
    for name, tensor in a.model.state_dict().items():
        assert torch.equal(back[name], tensor), name


def test_tokenizer_round_trip_and_special_tokens(tmp_path):
    src = make_run(tmp_path / "run")
    export(src, tmp_path / "hf")
    ours = load_run(src).tokenizer
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in [*TEXTS, "Ünïcödé and  spaces\n\ttabs", ""]:
        ids = tok(text)["input_ids"]
        assert ids == ours.encode(text)
        assert tok.decode(ids) == ours.decode(ids) == text
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == ("<|endoftext|>", "<|endoftext|>", "<|pad|>")
    assert (tok.eos_token_id, tok.pad_token_id) == (ours.eos_id, ours.pad_id)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"]) == (ours.eos_id, ours.pad_id)
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ours.eos_id and gen["suppress_tokens"][0] == ours.vocab_size


@pytest.mark.parametrize(
    "model, arch",
    [
        ({"mlp": "geglu", "tie_embeddings": False}, "EuroBertForMaskedLM"),
        # the planner's masked default; no masked-LM family has QK-norm, so the directory carries EuroBERT plus it
        ({"qk_norm": True, "tie_embeddings": False, "n_kv_head": 2}, "EuroBertQKNormForMaskedLM"),
    ],
)
def test_masked_run_exports_as_eurobert(tmp_path, model, arch):
    src = make_run(tmp_path / "run", objective="masked", **model)
    assert export(src, tmp_path / "hf").get("trust_remote_code", False) == bool(model.get("qk_norm"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert ("auto_map" in config) == (tmp_path / "hf" / "modeling_eurobert_qk_norm.py").exists() == bool(model.get("qk_norm"))
    run = load_run(src)
    if model.get("qk_norm"):  # the modeling file is code: transformers runs it only when told to
        with pytest.raises(ValueError, match="trust_remote_code"):
            transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf", trust_remote_code=False)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert type(hf).__name__ == arch
    idx = _idx(run)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits.float(), run.model(idx), atol=ATOL, rtol=0)
        if model.get("qk_norm"):  # padded rows: the bidirectional mask reaches the replaced attention
            mask = torch.ones_like(idx)
            mask[1, 25:] = 0
            padded = hf(idx, attention_mask=mask).logits.float()
            torch.testing.assert_close(padded[1, :25], run.model(idx[1:, :25])[0], atol=ATOL, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)  # it reads config.json first
    assert tok(TEXTS[0], add_special_tokens=False)["input_ids"] == run.tokenizer.encode(TEXTS[0])
    assert (tok.mask_token_id, tok.pad_token_id, tok.cls_token_id) == (run.tokenizer.mask_id, run.tokenizer.pad_id, run.tokenizer.cls_id)


# ---------------------------------------------------------------------------------------------
# fine-tuned classifiers


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ftdata")
    rows = [("pos" if i % 2 else "neg", f"the film was {WORDS[i % len(WORDS)]}") for i in range(24)]
    (d / "cls.csv").write_text("".join(f"{a},{b}\n" for a, b in rows))
    (d / "reg.jsonl").write_text("".join(json.dumps({"text": b, "label": 3.0 + (a == "pos")}) + "\n" for a, b in rows))
    tag = {"the": "DT", "a": "DT", "dog": "NN", "cat": "NN", "mat": "NN", "sat": "VB", "on": "IN"}
    sents = [["the", ["dog", "cat"][i % 2], "sat", "on", "a", "mat"] for i in range(16)]
    (d / "pos.txt").write_text("".join(" ".join(f"{w}/{tag[w]}" for w in s) + "\n" for s in sents))
    return d


def _finetune(run, out, train, *extra):
    assert (
        main(["finetune", str(run), "--train", str(train), "--out", str(out), "--budget", "steps:3", "--batch-size", "8", "--lr", "1e-2", *extra])
        == 0
    )
    return out


def randomize_lora_b(ft):
    """A short fine-tune keeps its best state, often step 1's, where every LoRA B is still zero and the adapter
    changes nothing; random B (seeded) makes its update real, so a wrong mapping or scale of it shows."""
    from safetensors.torch import load_file, save_file

    path = ft / "head_and_method.safetensors"
    state = load_file(path)
    gen = torch.Generator().manual_seed(0)
    for k, v in state.items():
        if "lora_B" in k:
            state[k] = torch.randn(v.shape, generator=gen) * 0.1
    save_file(state, path)
    return ft


def _task_logits(model_dir, texts, task):
    """budgetlm's logits for `texts` and the padded batch they were computed on."""
    model, tok, space, meta = load_finetuned(model_dir)
    examples = [Example(t.split() if task == "tag" else t, None) for t in texts]
    batch = collate(encode_examples(tok, model.objective, task, examples, 64, None, None), tok.pad_id, task)
    with torch.no_grad():
        logits = model(batch["idx"], batch["lengths"])
    mask = (torch.arange(batch["idx"].shape[1])[None] < batch["lengths"][:, None]).long()
    return logits, batch["idx"], mask, space


@pytest.mark.parametrize(
    "objective, task, method, file, arch",
    [
        ("causal", "classify", "full", "cls.csv", "LlamaForSequenceClassification"),
        ("causal", "tag", "lora", "pos.txt", "LlamaForTokenClassification"),
        ("masked", "classify", "lora", "cls.csv", "EuroBertForSequenceClassification"),
        ("masked", "tag", "full", "pos.txt", "EuroBertForTokenClassification"),
        ("masked", "regress", "full", "reg.jsonl", "EuroBertForSequenceClassification"),
        ("masked-qk-norm", "classify", "lora", "cls.csv", "EuroBertQKNormForSequenceClassification"),
        ("masked-qk-norm", "tag", "full", "pos.txt", "EuroBertQKNormForTokenClassification"),
        ("causal-features", "classify", "full", "cls.csv", "Qwen3TokenFeaturesForSequenceClassification"),
        ("causal-features", "tag", "lora", "pos.txt", "Qwen3TokenFeaturesForTokenClassification"),
    ],
)
def test_finetuned_classifier_exports_with_labels_and_equal_logits(tmp_path, data, objective, task, method, file, arch):
    base = make_base(tmp_path / "run", objective)
    fmt = ["--format", "tagged"] if file.endswith(".txt") else []
    ft = _finetune(base, tmp_path / "ft", data / file, "--task", task, "--method", method, *fmt)
    hf, ours, theirs, idx, mask, space = export_task_logits(ft, tmp_path / "hf", task)
    assert type(hf).__name__ == arch
    if task == "regress":
        assert hf.config.problem_type == "regression" and abs(space.stats["mean"] - 3.5) < 0.1
    else:
        assert hf.config.id2label == dict(enumerate(space.labels))
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    if task != "tag":  # the exported tokenizer encodes examples as fine-tuning did: the first text's ids are row 0
        tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
        assert tok(TEXTS[0])["input_ids"] == idx[0, : int(mask[0].sum())].tolist()


def make_base(path, objective):
    """A run to fine-tune: 'causal' (Llama), 'masked' (EuroBERT), 'masked-qk-norm' (the planner's masked default),
    'causal-features' (the planner's small causal default: QK-norm, value embeddings and the smear)."""
    if objective == "masked-qk-norm":
        return make_run(path, objective="masked", qk_norm=True)
    if objective == "causal-features":
        return make_run(path, qk_norm=True, **FEATURES)
    return make_run(path, objective=objective, mlp="swiglu" if objective == "causal" else "geglu")


def export_task_logits(ft: Path, out: Path, task: str):
    """Export a fine-tuned directory as a Hugging Face directory, load it with its task's Auto class, and
    return (model, budgetlm logits, its logits, ids, mask, label space), the two logits comparable:
    regression in the target's units (budgetlm's head predicts it standardised), tags at real tokens."""
    assert main(["export", str(ft), "--format", "hf", "--out", str(out)]) == 0
    auto = transformers.AutoModelForTokenClassification if task == "tag" else transformers.AutoModelForSequenceClassification
    hf = auto.from_pretrained(out, trust_remote_code=True).eval()
    texts = ["the dog sat on a mat", "a cat sat"] if task == "tag" else TEXTS
    ours, idx, mask, space = _task_logits(ft, texts, task)
    with torch.no_grad():
        theirs = hf(input_ids=idx, attention_mask=mask).logits.float()
    if task == "regress":
        ours, theirs = ours * space.stats["std"] + space.stats["mean"], theirs.squeeze(-1)
    if task == "tag":
        ours, theirs = ours[mask.bool()], theirs[mask.bool()]  # pads carry no labels
    return hf, ours, theirs, idx, mask, space


def test_causal_regression_head_is_refused(tmp_path, data, capsys):
    ft = _finetune(make_run(tmp_path / "run"), tmp_path / "ft", data / "reg.jsonl", "--task", "regress")
    capsys.readouterr()
    assert main(["export", str(ft), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "causal regression head" in capsys.readouterr().err


@pytest.mark.parametrize(
    "objective, head",
    [("causal", ["score"]), ("causal-features", ["score"]), ("masked", ["classifier", "dense"]), ("masked-qk-norm", ["classifier", "dense"])],
)
def test_lora_finetune_exports_unmerged_as_peft_adapter(tmp_path, data, objective, head):
    base = make_base(tmp_path / "run", objective)
    ft = randomize_lora_b(_finetune(base, tmp_path / "ft", data / "cls.csv", "--method", "lora", "--lora-targets", "wq,wv,w2"))
    assert main(["export", str(ft), "--format", "hf", "--peft", "--out", str(tmp_path / "peft")]) == 0
    adapter = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == ["down_proj", "q_proj", "v_proj"] and adapter["modules_to_save"] == head
    labels = transformers.AutoConfig.from_pretrained(tmp_path / "peft", trust_remote_code=True)
    hf_base = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "peft" / "base", config=labels, trust_remote_code=True)
    hf = peft.PeftModel.from_pretrained(hf_base, tmp_path / "peft").eval()
    ours, idx, mask, _ = _task_logits(ft, TEXTS, "classify")
    with torch.no_grad():
        lora = hf(input_ids=idx, attention_mask=mask).logits.float()
        torch.testing.assert_close(lora, ours, atol=ATOL, rtol=0)
        for name, p in hf.named_parameters():  # the LoRA updates off, the trained head kept: the logits move (the update is real)
            if "lora_B" in name:
                p.zero_()
        assert (hf(input_ids=idx, attention_mask=mask).logits.float() - ours).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize(
    "model, option",
    [
        ({"norm": "layernorm"}, "model.norm"),
        ({"mlp": "relu2"}, "model.mlp"),
        ({"logit_softcap": 15.0}, "model.logit_softcap"),
        ({"embed_norm": True}, "model.embed_norm"),
    ],
)
def test_options_no_family_holds_are_refused_with_one_line(tmp_path, capsys, model, option):
    src = make_run(tmp_path / "run", **model)
    assert main(["export", str(src), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and option in err
    assert not (tmp_path / "hf").exists()


def test_bad_sources_and_formats(tmp_path, capsys):
    src = make_run(tmp_path / "run")
    with pytest.raises(UserError, match="neither a budgetlm run"):
        export(tmp_path, tmp_path / "out")
    with pytest.raises(UserError, match="unknown export format"):
        export(src, tmp_path / "out", fmt="onnx")
    (src / "model.safetensors").rename(src / "elsewhere.safetensors")
    with pytest.raises(UserError, match="no final weights"):
        export(src, tmp_path / "out")
    assert main(["export", str(src), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2  # the setting's own choice check
    assert "config key 'format': 'onnx' is not one of hf, gguf" in capsys.readouterr().err
