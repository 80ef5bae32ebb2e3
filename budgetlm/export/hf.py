"""Runs and fine-tuned directories as Hugging Face `transformers` directories.

Which family takes a budgetlm model is decided by its options, never approximated:

    causal, RMSNorm, gated MLP (SwiGLU or GEGLU)         -> LlamaForCausalLM
      ... with QK-norm                                   -> Qwen3ForCausalLM (RMSNorm on q/k per head, before rotary)
    masked, RMSNorm, gated MLP                           -> EuroBertForMaskedLM (Llama's blocks without the causal mask)
      ... with QK-norm                                   -> EuroBertQKNormForMaskedLM: EuroBERT plus Qwen3's QK-norm, in
                                                            a modeling file written into the directory (no masked-LM
                                                            family has QK-norm); load with trust_remote_code=True
    causal with value embeddings or the smear            -> Qwen3TokenFeaturesForCausalLM: Qwen3 (QK-norm optional)
                                                            plus the two token features, in a modeling file written
                                                            into the directory; load with trust_remote_code=True
    masked, LayerNorm, embedding norm, no first-block    -> ModernBertForMaskedLM (`budgetlm.export.modernbert`)
      attention norm, prediction head, gated MLP

Everything else is refused with one line naming the option: LayerNorm outside ModernBERT's layout
(no Llama-layout family has it), plain GELU / squared-ReLU MLPs (the families' MLPs are gated), an
embedding norm outside ModernBERT's layout, QK-norm in ModernBERT's layout, and the logit soft-cap
(only Gemma 2 has one, and its blocks differ). The weights are a rename (`budgetlm.hf_names`): the
rotary layout is already Hugging Face's "rotate-half".

Fine-tuned directories become the family's `...ForSequenceClassification` (classify, pair,
regress) or `...ForTokenClassification` (tag) with id2label/label2id, LoRA merged; with
`peft=True` a LoRA fine-tune is written unmerged as a PEFT adapter next to an exported base.
Where a head differs from budgetlm's (see `_eurobert_sequence_head`), the exported weights are
chosen so the function is the same; where no weights can make it the same, the export refuses.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import torch

from budgetlm.config import ModelConfig
from budgetlm.errors import UserError
from budgetlm.files import write_json
from budgetlm.hf_names import shape_kwargs, to_hf_name

WEIGHTS_FILE = "model.safetensors"
LORA_TARGETS = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
GATED_ACT = {"swiglu": "silu", "geglu": "gelu"}  # budgetlm mlp -> HF hidden_act of the gated MLP (exact erf GELU)


# ---------------------------------------------------------------------------------------------
# which family


# the budget's plan turns both on for causal models; a masked model (or a GGUF file) has no family with them
UNPLANNED = "pretrain with --set model.value_embeddings=none --set model.smear=false to export"


def _remote_module(family: str):
    """The modeling file an exported directory of this family carries, or None for a family transformers has."""
    if family == "qwen3_token_features":
        from budgetlm.export import modeling_qwen3_token_features as remote
    elif family == "eurobert_qk_norm":
        from budgetlm.export import modeling_eurobert_qk_norm as remote
    else:
        return None
    return remote


def hf_family(cfg: ModelConfig) -> str:
    """'llama', 'qwen3', 'qwen3_token_features', 'eurobert', 'eurobert_qk_norm' or 'modernbert' for a model config,
    or UserError naming the option no family has."""
    if cfg.objective == "masked" and (cfg.norm == "layernorm" or cfg.embed_norm or cfg.mlm_head or not cfg.first_attention_norm):
        from budgetlm.export.modernbert import modernbert_refusal

        why = modernbert_refusal(cfg)
        if why is None:
            return "modernbert"
        raise UserError(
            f"cannot export to Hugging Face: a masked model with LayerNorm, an embedding norm or a prediction head is ModernBERT's layout "
            f"only with model.norm=layernorm, embed_norm=true, first_attention_norm=false, mlm_head=true, a gated MLP and no QK-norm; "
            f"this one has {why}"
        )
    refusals = {
        "norm": (cfg.norm != "rmsnorm", "the Llama-layout families (Llama, Qwen3, EuroBERT) use RMSNorm; train with model.norm=rmsnorm"),
        "mlp": (cfg.mlp not in GATED_ACT, "their MLP is gated (swiglu or geglu); plain gelu and relu2 have no Hugging Face counterpart"),
        "embed_norm": (cfg.embed_norm, "no Llama-layout family normalises the embeddings before the first block"),
        "logit_softcap": (cfg.logit_softcap > 0, "only Gemma 2 soft-caps the logits, and its blocks differ from budgetlm's"),
    }
    if cfg.objective == "masked":  # the exported token-features file is Qwen3's causal model
        refusals["value_embeddings"] = (cfg.value_embeddings != "none", f"the exported token features are causal models'; {UNPLANNED}")
        refusals["smear"] = (cfg.smear, f"the exported token features are causal models'; {UNPLANNED}")
    for option, (bad, why) in refusals.items():
        if bad:
            raise UserError(f"cannot export to Hugging Face: model.{option}={getattr(cfg, option)!r} ({why})")
    if cfg.objective == "masked":
        return "eurobert_qk_norm" if cfg.qk_norm else "eurobert"
    if cfg.value_embeddings != "none" or cfg.smear:
        return "qwen3_token_features"
    return "qwen3" if cfg.qk_norm else "llama"


def hf_class_prefix(cfg: ModelConfig) -> str:
    """The family's class names start with this: `{prefix}ForMaskedLM`, `{prefix}ForSequenceClassification`, ..."""
    prefixes = {"llama": "Llama", "qwen3": "Qwen3", "qwen3_token_features": "Qwen3TokenFeatures", "eurobert": "EuroBert",
                "eurobert_qk_norm": "EuroBertQKNorm", "modernbert": "ModernBert"}  # fmt: skip
    return prefixes[hf_family(cfg)]


def hf_config(cfg: ModelConfig, tokenizer, **extra):
    """The transformers config of the family that holds `cfg`, special token ids from `tokenizer`."""
    import transformers

    family = hf_family(cfg)
    if family == "modernbert":
        from budgetlm.export.modernbert import modernbert_config_kwargs

        ids = special_token_ids(tokenizer)
        config = transformers.ModernBertConfig(**modernbert_config_kwargs(cfg), **ids, cls_token_id=ids["bos_token_id"],
                                               sep_token_id=ids["eos_token_id"], **extra)  # fmt: skip
        config.dtype = "float32"
        return config
    kwargs = dict(shape_kwargs(cfg), hidden_act=GATED_ACT[cfg.mlp], attention_dropout=0.0, **special_token_ids(tokenizer))
    if family == "llama":
        config = transformers.LlamaConfig(**kwargs, mlp_bias=False, **extra)
    elif family == "qwen3":
        config = transformers.Qwen3Config(**kwargs, use_sliding_window=False, **extra)
    elif family == "qwen3_token_features":
        from budgetlm.model import value_embedding_layers

        config = _remote_module(family).Qwen3TokenFeaturesConfig(
            **kwargs, use_sliding_window=False, qk_norm=cfg.qk_norm, value_embedding_layers=value_embedding_layers(cfg), smear=cfg.smear, **extra
        )  # fmt: skip
    elif family == "eurobert_qk_norm":
        config = _remote_module(family).EuroBertQKNormConfig(**kwargs, mlp_bias=False, mask_token_id=tokenizer.mask_id, **extra)
    else:
        config = transformers.EuroBertConfig(**kwargs, mlp_bias=False, mask_token_id=tokenizer.mask_id, **extra)
    if remote := _remote_module(family):
        module = Path(remote.__file__).stem
        config.auto_map = {auto: f"{module}.{name}" for auto, name in remote.AUTO_MAP.items()}
    config.dtype = "float32"
    return config


def _modeling_file(config) -> str | None:
    """The modeling file (one of this package's `modeling_*.py`) that the config's `auto_map` names, if any."""
    if auto_map := getattr(config, "auto_map", None):
        return next(iter(auto_map.values())).split(".")[0] + ".py"
    return None


def save_hf_config(config, out: Path) -> None:
    """config.json, and the modeling file its `auto_map` names, if any: the directory must load on its own."""
    config.save_pretrained(str(out))
    if name := _modeling_file(config):
        shutil.copyfile(Path(__file__).with_name(name), out / name)


def _remote_code(config) -> dict:
    """The summary's note that the directory's own modeling file must be trusted to load it."""
    return {"trust_remote_code": True, "modeling_file": name} if (name := _modeling_file(config)) else {}


def special_token_ids(tokenizer) -> dict:
    """bos/eos/pad ids as HF configs name them. budgetlm has no separate start token: a causal model
    sees <|endoftext|> before each document (as GPT-2), a masked one [CLS] (as BERT)."""
    if tokenizer.kind == "bpe":
        return {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    return {"bos_token_id": tokenizer.cls_id, "eos_token_id": tokenizer.sep_id, "pad_token_id": tokenizer.pad_id}


def body_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The body's weights under HF names (`model.*`, `lm_head.weight` unless tied: safetensors refuses shared tensors)."""
    if hf_family(model.cfg) == "modernbert":
        from budgetlm.export.modernbert import to_modernbert_state_dict

        return to_modernbert_state_dict(model)
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "output.weight" and model.cfg.tie_embeddings:
            continue
        out[to_hf_name(name)] = tensor.detach().to(torch.float32).contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# the tokenizer


def write_tokenizer(tokenizer, out: Path, seq_len: int, template: str | None = None) -> None:
    """tokenizer.json + tokenizer_config.json with bos/eos/pad/unk/mask/cls/sep set, loadable by `AutoTokenizer`.

    `template`: 'causal-cls' appends <|endoftext|> after each text, 'masked-cls' wraps texts as
    [CLS] a [SEP] (b [SEP]) -- the way budgetlm's fine-tuning encodes examples, so
    `tokenizer(text)` feeds an exported classifier exactly what it was trained on."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    hf = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    if template == "causal-cls":
        eos = ("<|endoftext|>", tokenizer.eos_id)
        hf.post_processor = tokenizers.processors.TemplateProcessing(
            single="$A <|endoftext|>", pair="$A <|endoftext|> $B:1 <|endoftext|>:1", special_tokens=[eos]
        )
    elif template == "masked-cls":
        specials = [("[CLS]", tokenizer.cls_id), ("[SEP]", tokenizer.sep_id)]
        hf.post_processor = tokenizers.processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=specials
        )
    if tokenizer.kind == "bpe":
        names = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>", "mask_token": "<|mask|>"}
    else:
        names = {"bos_token": "[CLS]", "eos_token": "[SEP]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
        names |= {"pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]"}
    vocab = hf.get_vocab(with_added_tokens=True)
    names = {k: v for k, v in names.items() if v in vocab}  # an imported tokenizer may lack some; never add tokens here
    fast = PreTrainedTokenizerFast(tokenizer_object=hf, model_max_length=seq_len, clean_up_tokenization_spaces=False, **names)
    fast.save_pretrained(str(out))


# ---------------------------------------------------------------------------------------------
# runs


def export_run(run, out: Path) -> dict:
    """A pretrained run -> `...ForCausalLM` / `...ForMaskedLM` directory. Returns a summary."""
    from transformers import GenerationConfig

    cfg = run.config.model
    arch = hf_class_prefix(cfg) + ("ForCausalLM" if cfg.objective == "causal" else "ForMaskedLM")
    config = hf_config(cfg, run.tokenizer, architectures=[arch])
    _save(out, config, body_state_dict(run.model))
    write_tokenizer(run.tokenizer, out, cfg.seq_len)
    if cfg.objective == "causal":
        ids = special_token_ids(run.tokenizer)
        # the padded rows of the output projection are not tokens: budgetlm's sampler never draws them, nor may transformers'
        padded = list(range(run.model.vocab_size, run.model.padded_vocab_size))
        gen = GenerationConfig(**ids, suppress_tokens=padded or None)
        gen.save_pretrained(str(out))
    return {"format": "hf", "architecture": arch, "out": str(out), **_remote_code(config)}


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """Atomically, readable by everyone the umask allows (an export is made to be shared)."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp.replace(path)


def _save(out: Path, config, state: dict[str, torch.Tensor]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_hf_config(config, out)
    save_safetensors(state, out / WEIGHTS_FILE)


# ---------------------------------------------------------------------------------------------
# fine-tuned classifiers


def export_finetuned(model_dir: Path, out: Path, peft: bool = False) -> dict:
    """A fine-tuned directory -> `...ForSequenceClassification` / `...ForTokenClassification`
    (LoRA merged), or with `peft` a PEFT LoRA adapter directory plus the base it applies to (`out/base`)."""
    from budgetlm.finetune.predict import load_finetuned

    model, tokenizer, space, meta = load_finetuned(model_dir, merge=not peft)
    if peft and meta["method"] != "lora":
        raise UserError(f"--peft writes LoRA adapters; {model_dir} was fine-tuned with --method {meta['method']}")
    if meta["method"] == "prefix":
        raise UserError("cannot export a prefix-tuned model: no transformers model takes trained prefix keys/values (use --method lora or full)")
    if meta["method"] == "adapter":
        raise UserError(
            "cannot export a bottleneck-adapter model: no transformers Llama-family model has Houlsby adapters (use --method lora or full)"
        )
    body = model.body
    cfg = body.cfg
    family = hf_family(cfg)
    task = meta["task"]
    config_extra, head, arch = _head(model, hf_class_prefix(cfg), family, task, space, meta)
    config = hf_config(cfg, tokenizer, architectures=[arch], **config_extra)
    template = None if task == "tag" else ("causal-cls" if cfg.objective == "causal" else "masked-cls")
    if peft:
        return _export_peft(model, meta, family, config, head, arch, tokenizer, template, out)
    state = {k: v for k, v in body_state_dict(body).items() if k not in ("lm_head.weight", "decoder.weight")}
    _save(out, config, {**state, **head})
    write_tokenizer(tokenizer, out, cfg.seq_len, template)
    return {"format": "hf", "architecture": arch, "task": task, "method": meta["method"], "out": str(out), **_remote_code(config)}


def _head(model, prefix: str, family: str, task: str, space, meta: dict) -> tuple[dict, dict[str, torch.Tensor], str]:
    """(config additions, head weights under HF names, architecture) of a task model."""
    W = model.head.weight.detach().float()
    b = model.head.bias.detach().float() if model.head.bias is not None else None
    if task == "regress":
        # budgetlm's head predicts the standardised target; fold the scale back in so the export predicts the target itself
        mean, std = space.stats["mean"], space.stats["std"]
        W, b = W * std, (b * std if b is not None else torch.zeros(1)) + mean
        extra = {"num_labels": 1, "problem_type": "regression"}
    else:
        id2label = dict(enumerate(space.labels))
        extra = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
        extra["problem_type"] = "single_label_classification" if task != "tag" else None
    extra = {k: v for k, v in extra.items() if v is not None}
    if family == "modernbert":
        # head = the body's prediction head (in the body's weights, as `head.*`), then classifier, which always has a bias
        head = {"classifier.weight": W, "classifier.bias": b if b is not None else torch.zeros(W.shape[0])}
        if task == "tag":
            return extra, head, f"{prefix}ForTokenClassification"
        pooling = {"mean": "mean", "first": "cls"}.get(model.pooling)
        if pooling is None:
            raise UserError(f"cannot export: ModernBertForSequenceClassification pools the first token or the mean, not '{model.pooling}'")
        return {**extra, "classifier_pooling": pooling}, head, f"{prefix}ForSequenceClassification"
    if task == "tag":
        name = "classifier" if family.startswith("eurobert") else "score"
        head = {f"{name}.weight": W, f"{name}.bias": b if b is not None else torch.zeros(W.shape[0])}
        return extra, head, f"{prefix}ForTokenClassification"
    arch = f"{prefix}ForSequenceClassification"
    if family.startswith("eurobert"):
        pooling = {"mean": "mean", "first": "bos"}.get(model.pooling)
        if pooling is None:
            raise UserError(f"cannot export: EuroBertForSequenceClassification pools the first token or the mean, not '{model.pooling}'")
        return {**extra, "classifier_pooling": pooling}, _eurobert_sequence_head(model, W, b), arch
    if model.pooling != "last":
        raise UserError(f"cannot export: {arch} pools the last token, this head pools '{model.pooling}'")
    if task == "regress":
        raise UserError(f"cannot export a causal regression head: it adds the target's mean, and {arch}'s score layer has no bias")
    if b is not None and b.abs().max() > 0:
        raise UserError(
            f"cannot export: {arch}'s score layer has no bias and this head's bias is not zero "
            "(fine-tune again: causal classifiers are trained without a head bias now)"
        )
    return extra, {"score.weight": W}, arch


def _eurobert_sequence_head(model, W: torch.Tensor, b: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """EuroBERT's sequence head is classifier(GELU(dense(pooled))); budgetlm's is head(pooled).

    With dense = identity plus a shift c on every unit, GELU sees pooled + c, and GELU(z) = z Phi(z)
    equals z in fp32 once z >= 10 (1 - Phi(10) ~ 8e-24). An RMS-normalised vector has norm sqrt(C),
    so no unit of the pooled (normed, gain-scaled, then averaged) state exceeds max|gain| sqrt(C):
    c = that bound + 10 makes the GELU the identity for every possible input, and the classifier's
    bias takes the shift back out: logits = W (pooled + c) + (b - W c)."""
    C = model.body.cfg.n_embd
    gain = model.body.norm.weight.detach().float().abs().max().item()
    c = gain * math.sqrt(C) + 10.0
    shift = torch.full((C,), c)
    bias = (b if b is not None else torch.zeros(W.shape[0])) - W @ shift
    return {"dense.weight": torch.eye(C), "dense.bias": shift, "classifier.weight": W, "classifier.bias": bias}


# ---------------------------------------------------------------------------------------------
# LoRA unmerged, in PEFT's format


def _export_peft(model, meta, family, config, head, arch, tokenizer, template, out: Path) -> dict:
    """out/adapter_config.json + out/adapter_model.safetensors (LoRA A/B under HF names, the head as
    modules_to_save), tokenizer, and out/base: the base run exported as a plain LM directory.

    Load with `config = AutoConfig.from_pretrained(out)` (labels, pooling, pad id), then
    `PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(out/'base', config=config), out)`;
    add `trust_remote_code=True` to both `from_pretrained` calls where the directory carries a modeling file."""
    from budgetlm.run import load_run

    base_out = out / "base"
    base_run = load_run(Path(meta["base"]["run"]))
    export_run(base_run, base_out)
    # the classification config (labels, pooling, pad id) goes with the adapter: the base is a plain LM
    save_hf_config(config, out)
    opts = meta["method_options"]
    targets = sorted({LORA_TARGETS[t] for t in opts["lora_targets"]})
    state, patterns = {}, {}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in model.body.named_parameters():
        if "lora_A" not in name and "lora_B" not in name:
            continue
        # peft names them layers.0.attention.wq.lora_A.default.weight; PEFT files drop the adapter name
        module, kind = name.split(".lora_")
        lora.setdefault(module, {})[kind[0]] = p.detach().float()
        if family != "modernbert":
            base_name = to_hf_name(module + ".weight")[: -len(".weight")]
            state[f"base_model.model.{base_name}.lora_{kind.split('.')[0]}.weight"] = p.detach().float().contiguous()
    if family == "modernbert":  # q/k/v and gate/value are fused there: one LoRA per fused module, the same update
        from budgetlm.export.modernbert import LORA_PARTS, fused_lora

        fused, ranks, alphas = fused_lora(lora, opts["lora_rank"], opts["lora_alpha"])
        state = {f"base_model.model.{k}": v for k, v in fused.items()}
        modules = sorted({LORA_PARTS[t][0] for t in opts["lora_targets"]})
        targets = r".*\.(" + "|".join(re.escape(m) for m in modules) + ")"  # a regex: attn.Wo and mlp.Wo share the name Wo
        patterns = {"rank_pattern": ranks, "alpha_pattern": alphas}
    for k, v in head.items():
        state[f"base_model.model.{k}"] = v.contiguous()
    task_type = "TOKEN_CLS" if meta["task"] == "tag" else "SEQ_CLS"
    adapter_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": str(base_out.resolve()),
        "r": opts["lora_rank"],
        "lora_alpha": opts["lora_alpha"],
        "lora_dropout": 0.0,
        "target_modules": targets,
        "modules_to_save": sorted({k.split(".")[0] for k in head}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        **patterns,
    }
    write_json(out / "adapter_config.json", adapter_config)
    save_safetensors(state, out / "adapter_model.safetensors")
    write_tokenizer(tokenizer, out, model.body.cfg.seq_len, template)
    return {"format": "hf-peft", "architecture": arch, "task": meta["task"], "base": str(base_out), "out": str(out), **_remote_code(config)}
