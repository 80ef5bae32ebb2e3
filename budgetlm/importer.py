"""`budgetlm import`: a local Hugging Face Llama-family directory becomes a budgetlm run.

    HF_DIR/ config.json, model.safetensors (or model-0000x-of-0000y.safetensors + index), tokenizer.json
      -> RUN/ config.yaml, tokenizer.json, model.safetensors, env.json, import.json

Accepted: `LlamaForCausalLM`, `MistralForCausalLM` without a sliding window, `Qwen3ForCausalLM`
(QK-norm) and `Qwen3TokenFeaturesForCausalLM` (what `budgetlm export` writes for a model with value
embeddings or the smear), whose options budgetlm's model has: RMSNorm, a SiLU- or GELU-gated MLP without biases,
no attention biases, plain rotary positions (no scaling), head_dim = hidden_size / heads. Anything
else is refused with one line naming the option. The weights are a rename (`budgetlm.hf_names`).
The run's vocabulary is the tokenizer's: the embedding and output keep their rows up to budgetlm's
padded size (the tokenizer's ids rounded up to a multiple of 64), zero rows fill the rest, and
rows past that (ids no token has, as in Qwen's 151936-row tables) are dropped.

budgetlm names its document separator `<|endoftext|>` (byte-level BPE) or `[SEP]` (WordPiece); a
tokenizer whose end-of-text token has another name (`</s>`, `<|end_of_text|>`) keeps its ids
and gets that name for its end-of-text token, so `generate` stops where the original stops.

The run has final weights and no optimizer state: `eval` (with `--data`: a corpus prepared with
`data prepare --set tokenizer_file=RUN/tokenizer.json`), `generate`, `finetune`, `suite`, `export`
and `serve` use it as they use a trained run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from budgetlm.config import ModelConfig, RunConfig, save_config
from budgetlm.errors import UserError
from budgetlm.files import write_json
from budgetlm.hf_names import from_hf_name
from budgetlm.run import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen3ForCausalLM": "qwen3",
                 "Qwen3TokenFeaturesForCausalLM": "qwen3_token_features"}  # fmt: skip
ACT_TO_MLP = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}


def model_config_from_hf(hf: dict) -> ModelConfig:
    """The budgetlm model config of an HF config.json dict, or UserError naming the option budgetlm lacks."""
    archs = hf.get("architectures") or [hf.get("model_type", "?")]
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise UserError(f"cannot import architecture {arch}: budgetlm imports {', '.join(ARCHITECTURES)}")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    n_kv = hf.get("num_key_value_heads") or n_head
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    refusals = [
        ("hidden_act", hf.get("hidden_act", "silu") not in ACT_TO_MLP, "budgetlm's gated MLP takes silu or gelu"),
        ("attention_bias", bool(hf.get("attention_bias")), "budgetlm's attention has no biases"),
        ("mlp_bias", bool(hf.get("mlp_bias")), "budgetlm's MLP has no biases"),
        ("rope_type", rope_type != "default", "budgetlm has plain rotary positions, no scaling"),
        ("head_dim", (hf.get("head_dim") or n_embd // n_head) * n_head != n_embd, "budgetlm's head size is hidden_size / num_attention_heads"),
        ("sliding_window", arch == "MistralForCausalLM" and hf.get("sliding_window"), "budgetlm attends to the whole context"),
        ("use_sliding_window", bool(hf.get("use_sliding_window")), "budgetlm attends to the whole context"),
    ]
    for option, bad, why in refusals:
        if bad:
            value = {"rope_type": rope_type, "head_dim": hf.get("head_dim")}.get(option, hf.get(option))
            raise UserError(f"cannot import {arch} with {option}={value!r} ({why})")
    features = arch == "Qwen3TokenFeaturesForCausalLM"
    return ModelConfig(
        objective="causal",
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=0 if n_kv == n_head else n_kv,
        n_embd=n_embd,
        ffn_hidden=hf["intermediate_size"],
        mlp=ACT_TO_MLP[hf.get("hidden_act", "silu")],
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        vocab_size=hf["vocab_size"],
        seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(theta),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qk_norm=arch == "Qwen3ForCausalLM" or (features and bool(hf.get("qk_norm", True))),
        init_std=hf.get("initializer_range", 0.02),
        value_embeddings=_value_embeddings(hf) if features else "none",
        smear=features and bool(hf.get("smear")),
    )


def _value_embeddings(hf: dict) -> str:
    """model.value_embeddings for the blocks config.json lists: every one, every other one ending with the last, or none."""
    from budgetlm.model import value_embedding_layers

    layers = list(hf.get("value_embedding_layers") or [])
    for choice in ("none", "all", "alternate"):
        if value_embedding_layers(ModelConfig(n_layer=hf["num_hidden_layers"], value_embeddings=choice)) == layers:
            return choice
    raise UserError(f"cannot import value embeddings in blocks {layers}: budgetlm puts them in every block or every other one ending with the last")


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    from safetensors.torch import load_file

    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({hf_dir / f for f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
    else:
        raise UserError(f"{hf_dir} has no weights (model.safetensors or model.safetensors.index.json); .bin checkpoints are not read")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def to_budgetlm_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    from budgetlm.model import padded_vocab_size

    out = {}
    for name, tensor in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        try:
            out[from_hf_name(name)] = tensor.to(torch.float32)
        except KeyError:
            raise UserError(f"cannot import: weight {name} has no place in budgetlm's model") from None
    if cfg.tie_embeddings:
        out.pop("output.weight", None)
        out["output.weight"] = out["tok_embeddings.weight"]
    padded = padded_vocab_size(cfg.vocab_size)
    for name in ("tok_embeddings.weight", "output.weight", *(k for k in out if k.startswith("value_embeddings."))):
        w = out[name][:padded]  # rows past the tokenizer's ids (and budgetlm's padding) are not tokens
        if w.shape[0] < padded:  # budgetlm pads the vocabulary to a multiple of 64 with rows the sampler never draws
            w = torch.cat([w, w.new_zeros(padded - w.shape[0], w.shape[1])])
        out[name] = w
    if cfg.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def import_tokenizer(hf_dir: Path, hf: dict):
    """budgetlm's Tokenizer over the directory's tokenizer.json, its end-of-text token named as budgetlm names it."""
    from budgetlm.data.tokenizer import Tokenizer

    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{hf_dir} has no tokenizer.json (a fast tokenizer); slow sentencepiece-only tokenizers are not read")
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    vocab.update(data.get("model", {}).get("vocab", {}) if isinstance(data.get("model", {}).get("vocab"), dict) else {})
    if "<|endoftext|>" not in vocab and "[SEP]" not in vocab:
        eos_id = hf.get("eos_token_id")
        eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
        if eos_id is None:
            raise UserError(f"{hf_dir}'s tokenizer has no end-of-text token (config.json eos_token_id is not set)")
        _rename_token(data, eos_id, "<|endoftext|>")
    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


def _rename_token(data: dict, token_id: int, new: str) -> None:
    vocab = data.get("model", {}).get("vocab")
    vocab = vocab if isinstance(vocab, dict) else {}
    added = data.get("added_tokens", [])
    old = next((t["content"] for t in added if t["id"] == token_id), None) or next((k for k, v in vocab.items() if v == token_id), None)
    if old is None:
        raise UserError(f"the tokenizer has no token with the end-of-text id {token_id}")
    for t in added:
        if t["id"] == token_id:
            t["content"] = new
    if old in vocab:
        vocab[new] = vocab.pop(old)
    if data.get("post_processor"):  # templates name their special tokens
        data["post_processor"] = json.loads(json.dumps(data["post_processor"]).replace(json.dumps(old), json.dumps(new)))


def import_hf(hf_dir: Path, out: Path, seq_len: int = 0, data: str = "") -> dict:
    """HF_DIR as a run in `out`; `seq_len` (0 = config.json's) is the run's context, `data` the prepared data it names."""
    from budgetlm.model import Transformer
    from budgetlm.tracking import environment

    hf_dir, out = Path(hf_dir), Path(out)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output directory {out} exists and is not empty")
    try:
        hf = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError(f"{cfg_path} is not valid JSON") from None
    model_cfg = model_config_from_hf(hf)
    if seq_len < 0:
        raise UserError(f"--seq-len must be positive (0 = config.json's), got {seq_len}")
    if data and not Path(data).is_dir():
        raise UserError(f"--data {data} is not a directory (a `budgetlm data prepare` output)")
    model_cfg.seq_len = seq_len or model_cfg.seq_len  # rotary positions: no weight depends on the context length
    tokenizer = import_tokenizer(hf_dir, hf)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model_cfg.vocab_size} embedding rows")
    model_cfg.vocab_size = tokenizer.vocab_size  # budgetlm's vocabulary is the tokenizer's; embedding rows past it are never drawn
    state = to_budgetlm_state(read_hf_weights(hf_dir), model_cfg)
    model = Transformer.on_meta(model_cfg)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise UserError(f"cannot import: weights {'missing' if missing else 'unexpected'}: {', '.join(sorted(missing or unexpected)[:3])}")
    for name, tensor in model.state_dict().items():
        if name in state and tuple(state[name].shape) != tuple(tensor.shape):
            raise UserError(f"cannot import: {name} has shape {tuple(state[name].shape)}, config.json implies {tuple(tensor.shape)}")

    from budgetlm.checkpoint import save_weights_state

    out.mkdir(parents=True, exist_ok=True)
    run_cfg = RunConfig(model=model_cfg, auto=False, data=data)
    save_config(run_cfg, out / CONFIG_FILE)
    tokenizer.save(out / TOKENIZER_FILE)
    save_weights_state(out / WEIGHTS_FILE, state)  # a tied output is the embedding tensor itself: stored once
    write_json(out / "env.json", environment("cpu"))
    summary = {"source": str(hf_dir.resolve()), "architecture": hf.get("architectures", ["?"])[0], "run": str(out), "params": model.num_params()}
    write_json(out / "import.json", summary)
    return summary


def import_command(args) -> int:
    from budgetlm.config import ImportConfig
    from budgetlm.flags import print_config, settings_from_args

    cfg = settings_from_args(ImportConfig, args)
    if args.print_config:
        print_config(cfg, args.json)
        return 0
    summary = import_hf(Path(args.hf_dir), Path(args.out), seq_len=cfg.seq_len, data=cfg.data)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"imported {summary['architecture']} ({summary['params'] / 1e6:.2f}M parameters) from {summary['source']} -> {summary['run']}")
    return 0
