"""`budgetlm import`: tiny random Hugging Face models saved locally become runs that compute the same
logits, generate the same tokens, fine-tune, and export back to the same weights."""

import json

import pytest
import torch

from budgetlm.cli import main
from budgetlm.errors import UserError
from budgetlm.export import export
from budgetlm.generate import generate
from budgetlm.importer import import_hf
from budgetlm.run import load_run

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXT = "the cat sat on the mat and the dog ran after the cat"


def hf_tokenizer(eos="</s>"):
    """A byte-level BPE as a transformers tokenizer whose end-of-text token is `eos` (Llama 2 names it so)."""
    tk = tokenizers
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=290, special_tokens=["<s>", eos, "<pad>"], initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos, pad_token="<pad>")


def save_hf(path, arch="llama", **overrides):
    """A random 2-layer model (grouped-query attention, untied head, vocabulary not a multiple of 64) saved with save_pretrained."""
    # vocab_size: the tokenizer's (not a multiple of 64)
    tok = hf_tokenizer()
    rope = {"rope_type": "default", "rope_theta": 500.0}
    kwargs = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_parameters=rope,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, initializer_range=0.1)  # fmt: skip
    kwargs.update(overrides)
    torch.manual_seed(0)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[arch]
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


@pytest.mark.parametrize(
    "arch, overrides", [("llama", {}), ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}), ("qwen3", {"head_dim": 16})]
)
def test_imported_run_computes_the_same_logits_and_greedy_tokens(tmp_path, arch, overrides):
    hf, tok = save_hf(tmp_path / "hf", arch, **overrides)
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    run = load_run(tmp_path / "run")
    assert run.model.cfg.qk_norm == (arch == "qwen3") and run.model.cfg.tie_embeddings == bool(overrides.get("tie_word_embeddings"))
    V = len(tok)
    assert V % 64 and run.model.vocab_size == V
    idx = torch.randint(0, V, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(idx).logits.float()
        torch.testing.assert_close(run.model(idx)[..., :V], theirs, atol=1e-5, rtol=0)
    # the tokenizer: same ids, and its end-of-text token (</s> there) is what budgetlm stops at
    assert run.tokenizer.encode(TEXT) == tok(TEXT)["input_ids"]
    assert run.tokenizer.eos_id == tok.eos_token_id and run.tokenizer.decode(run.tokenizer.encode(TEXT)) == TEXT
    prompt = torch.tensor([tok("the cat")["input_ids"]])
    ours = generate(run.model, prompt, 12, temperature=0, eos_id=run.tokenizer.eos_id)
    assert hf.generate(prompt, max_new_tokens=12, do_sample=False)[0].tolist() == ours[0].tolist()


def test_import_then_export_gives_back_the_same_model(tmp_path):
    save_hf(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    export(tmp_path / "run", tmp_path / "back")
    from safetensors.torch import load_file

    original, back = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert torch.equal(back[name][: tensor.shape[0]], tensor), name  # budgetlm padded the vocabulary rows to a multiple of 64
    a, b = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "hf", tmp_path / "back"))
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "tie_word_embeddings",
    ):
        assert a[key] == b[key], key
    assert a["rope_parameters"]["rope_theta"] == b["rope_parameters"]["rope_theta"]


def imported_with_data(tmp_path, text: str) -> None:
    """tmp_path/run imported from a saved HF model, tmp_path/data: `text` prepared with its tokenizer."""
    save_hf(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    (tmp_path / "corpus.txt").write_text(text)
    prep = ["--set", f"tokenizer_file={tmp_path / 'run' / 'tokenizer.json'}", "--set", "val_fraction=0.2", "--set", "txt_document_chars=400"]
    assert main(["data", "prepare", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "data"), *prep]) == 0


def test_imported_run_evaluates_and_fine_tunes(tmp_path, capsys):
    # eval: on a corpus prepared with the imported tokenizer
    imported_with_data(tmp_path, "".join(f"the cat {i} sat on the mat and the dog ran after cat {i * 7}.\n\n" for i in range(200)))
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--tokens", "256", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["val_loss"] > 0
    rows = "".join(f"{'pos' if i % 2 else 'neg'},the cat sat {i}\n" for i in range(16))
    (tmp_path / "train.csv").write_text(rows)
    args = ["finetune", str(tmp_path / "run"), "--train", str(tmp_path / "train.csv"), "--out", str(tmp_path / "ft"), "--budget", "steps:2"]
    assert main([*args, "--batch-size", "8"]) == 0
    assert main(["predict", str(tmp_path / "ft"), "--input", str(tmp_path / "train.csv"), "--output", str(tmp_path / "pred.csv")]) == 0
    assert len((tmp_path / "pred.csv").read_text().splitlines()) == 16


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"attention_bias": True}, "attention_bias=True"),
        ({"hidden_act": "relu"}, "hidden_act='relu'"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}}, "rope_type='linear'"),
        ({"head_dim": 32}, "head_dim=32"),
    ],
)
def test_options_budgetlm_lacks_are_refused_with_one_line(tmp_path, capsys, overrides, match):
    save_hf(tmp_path / "hf", **overrides)
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err
    assert not (tmp_path / "run").exists()


def test_bad_directories(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        import_hf(tmp_path, tmp_path / "run")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError, match="cannot import architecture GPT2LMHeadModel"):
        import_hf(tmp_path / "gpt2", tmp_path / "run")
    save_hf(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="has no weights"):
        import_hf(tmp_path / "hf", tmp_path / "run")


def test_pretrain_init_from_an_imported_run_continues_from_its_weights(tmp_path, capsys):
    imported_with_data(tmp_path, "".join(f"the dog {i} ran after the cat on the mat {i * 3}.\n\n" for i in range(200)))
    train = ["--data", str(tmp_path / "data"), "--set", "train.batch_tokens=256", "--set", "train.eval_tokens=256"]
    # one step: the schedule's warm-up starts at learning rate 0, so the weights are still the imported ones
    assert main(["pretrain", "--init-from", str(tmp_path / "run"), "--out", str(tmp_path / "cont"), "--budget", "steps:1", *train]) == 0
    before, after = load_run(tmp_path / "run").model.state_dict(), load_run(tmp_path / "cont").model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((tmp_path / "cont" / "init_from.json").read_text())["run"] == str((tmp_path / "run").resolve())
    assert main(["pretrain", "--resume", str(tmp_path / "cont"), "--budget", "steps:3"]) == 0  # and it trains on, resumably
    assert not torch.equal(before["layers.0.attention.wq.weight"], load_run(tmp_path / "cont").model.state_dict()["layers.0.attention.wq.weight"])
    capsys.readouterr()
    bad = ["pretrain", "--init-from", str(tmp_path / "run"), "--out", str(tmp_path / "x"), "--budget", "steps:1"]
    assert main([*bad, *train, "--set", "model.n_layer=3"]) == 2
    assert "--init-from keeps" in capsys.readouterr().err
    own_tokenizer = ["--set", "vocab_size=300", "--set", "val_fraction=0.2", "--set", "txt_document_chars=400"]
    assert main(["data", "prepare", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "other"), *own_tokenizer]) == 0
    capsys.readouterr()
    assert main([*bad, "--data", str(tmp_path / "other")]) == 2
    assert "tokenized with another tokenizer" in capsys.readouterr().err
