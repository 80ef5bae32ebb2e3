"""`budgetlm compress RUN --method M --out DIR`: read a run, apply one method, write a run directory.

Each method's work lives in its own module (quantize, sparsity, prune, distill); this one checks
the request, opens the run and its data, writes the output directory and `compression.json`, and
reports parameters and size on disk before and after.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from budgetlm.compress import COMPRESSION_FILE, FORMAT, METHODS, QUANTIZED, compression_info
from budgetlm.config import CompressConfig, apply_overrides, save_config
from budgetlm.errors import UserError
from budgetlm.files import write_json
from budgetlm.run import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, Run, load_run, resolve_device, weights_path

PRUNED_FILE = "pruned.safetensors"
IMPORTANCE_BATCH = 8  # sequences per importance batch


# ---------------------------------------------------------------------------------------------
# shared pieces


def file_size(path: Path) -> int:
    return Path(path).stat().st_size if Path(path).is_file() else 0


def count_params(model: torch.nn.Module) -> int:
    """Parameters (a tied matrix once; a quantized one by its logical shape)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def open_data(run: Run, data_dir: str | None):
    """The prepared data to score and train on: --data, else the run's; its tokenizer must be the run's
    (or a vocabulary derived from it, as `budgetlm eval` accepts)."""
    from budgetlm.data.dataset import PreparedData
    from budgetlm.data.vocab import find_derived

    data_dir = data_dir or run.config.data
    if not data_dir:
        raise UserError("the run does not name its data directory; pass --data DIR")
    data = PreparedData(data_dir)
    if data.tokenizer.sha256 != run.tokenizer.sha256:
        data = find_derived(data, run.tokenizer.sha256) or data
    if data.tokenizer.sha256 != run.tokenizer.sha256:
        raise UserError(f"tokenizer mismatch: {data_dir} was prepared with another tokenizer than run {run.dir}")
    return data


def copy_run_files(src: Path, out: Path, cfg) -> None:
    """config (as given), tokenizer and data record of `src` into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / CONFIG_FILE)
    shutil.copyfile(src / TOKENIZER_FILE, out / TOKENIZER_FILE)
    for name in ("data.json", "env.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output directory {out} exists and is not empty")


# ---------------------------------------------------------------------------------------------
# methods


def quantize_run(run: Run, out: Path, method: str, device: torch.device) -> dict:
    from budgetlm.compress.quantize import check_quantize, quantize_model, quantized_summary, save_quantized

    check_quantize(method, device, run.model)
    model = quantize_model(run.model, method, device)
    copy_run_files(run.dir, out, run.config)
    save_quantized(model, out / WEIGHTS_FILE)
    return {"settings": {}, **quantized_summary(model), "params_after": count_params(model)}


def sparse_run(run: Run, out: Path, sparsity: float, pattern: str, device: torch.device) -> dict:
    from budgetlm.checkpoint import save_weights
    from budgetlm.compress.sparsity import has_semi_structured, magnitude_prune

    if pattern == "2:4" and not has_semi_structured(device):
        raise UserError("2:4 sparsity needs a CUDA GPU with sparse tensor cores (Ampere or later); on CPU use --pattern unstructured")
    report = magnitude_prune(run.model, sparsity, pattern)
    copy_run_files(run.dir, out, run.config)
    save_weights(out / WEIGHTS_FILE, run.model)
    nonzero = count_params(run.model) - report["pruned_weights"]
    return {"settings": {"sparsity": sparsity if pattern == "unstructured" else 0.5, "pattern": pattern}, "pattern": pattern,
            **report, "params_after": count_params(run.model), "nonzero_params_after": nonzero}  # fmt: skip


def importance_batches(run: Run, data, n: int, device: torch.device) -> list:
    from budgetlm.data.loader import TrainBatches
    from budgetlm.pretrain import make_batch

    cfg = run.config
    loader = TrainBatches(data.tokens("train"), cfg.model.seq_len, seed=cfg.train.seed + 1)
    out = []
    for _ in range(n):
        ids = loader.sample_ids(IMPORTANCE_BATCH) if cfg.model.objective == "masked" else None
        x, y = make_batch(loader.next(IMPORTANCE_BATCH), cfg, data.tokenizer, ids)
        out.append((x.to(device), y.to(device)))
    return out


def keep_for_speedup(model, speedup: float) -> float:
    """The fraction of the blocks' forward FLOPs to keep so the whole forward (output head included)
    gets `speedup` times cheaper."""
    from budgetlm.compress.prune import block_costs
    from budgetlm.model import layer_sizes

    cfg = model.cfg
    blocks = 0.0
    for i in range(cfg.n_layer):
        n_head, n_kv, ffn = layer_sizes(cfg, i)
        h, n, _ = block_costs(cfg, i, n_kv, ffn, model.head_dim, "flops")
        blocks += h * n_kv + n * ffn
    head = 2 * model.output.weight.numel()
    keep = ((blocks + head) / speedup - head) / blocks
    if keep <= 0:
        share = head / (blocks + head)
        raise UserError(f"a {speedup:g}x speed-up is out of reach: the output projection alone costs {share:.0%} of the forward pass")
    return keep


def prune_run(run: Run, out: Path, opts: CompressConfig, train_set: list[str], device: torch.device, begin=lambda detail: None) -> dict:
    from budgetlm.checkpoint import save_weights
    from budgetlm.compress.prune import UNITS, apply_plan, choose, importance
    from budgetlm.pretrain import check_config, pretrain

    units = tuple(u.strip() for u in (opts.units or ",".join(UNITS)).split(",") if u.strip())
    bad = [u for u in units if u not in UNITS]
    if bad or not units:
        raise UserError(f"--units takes a comma-separated subset of {','.join(UNITS)}, got {opts.units!r}")
    if opts.keep is not None and opts.speedup is not None:
        raise UserError("give the target as --keep or --speedup, not both")
    if opts.speedup is not None:
        if opts.speedup <= 1:
            raise UserError(f"--speedup must be above 1, got {opts.speedup}")
        keep, per = keep_for_speedup(run.model, opts.speedup), "flops"
    else:
        keep, per = (0.5 if opts.keep is None else opts.keep), "params"
        if not 0 < keep < 1:
            raise UserError(f"--keep is the fraction of the blocks' parameters to keep, in (0, 1); got {keep}")
    budget = opts.budget or "0"
    recovery_cfg = None
    if budget != "0":
        from budgetlm.budget import parse_budget

        parse_budget(budget)
    data = open_data(run, opts.data or None)
    if opts.importance_batches < 1:
        raise UserError(f"--importance-batches must be at least 1, got {opts.importance_batches}")
    model = run.model.to(device)
    scores = importance(model, importance_batches(run, data, opts.importance_batches, device))
    plan = choose(model, scores, keep, per=per, units=units)
    pruned = apply_plan(model, plan)
    cfg = copy.deepcopy(run.config)
    cfg.model = pruned.cfg
    cfg.data = str(data.path)
    cfg.auto = False  # the pruned shapes are the point: the planner must not choose another model
    copy_run_files(run.dir, out, cfg)
    save_weights(out / PRUNED_FILE, pruned)
    summary = {"settings": {"keep": keep, "per": per, "units": list(units), "budget": budget, "importance_batches": opts.importance_batches},
               "plan": plan.to_dict(), "params_after": count_params(pruned), "model_after": {"n_layer": pruned.cfg.n_layer,
               "layer_heads": pruned.cfg.layer_heads, "layer_ffn": pruned.cfg.layer_ffn}}  # fmt: skip
    if budget == "0":
        shutil.copyfile(out / PRUNED_FILE, out / WEIGHTS_FILE)
        return summary
    recovery_cfg = cfg
    recovery_cfg.budget.limit = budget
    apply_overrides(recovery_cfg, train_set)
    check_config(recovery_cfg)
    begin(summary)  # from here on DIR is a resumable run: `budgetlm pretrain --resume DIR` finishes a killed recovery
    summary["recovery"] = pretrain(recovery_cfg, out, init_weights=out / PRUNED_FILE)
    return summary


def distill_run(teacher: Run, out: Path, opts: CompressConfig, train_set: list[str], device: torch.device, begin=lambda detail: None) -> dict:
    from budgetlm.budget import parse_budget
    from budgetlm.compress.distill import distill_loss
    from budgetlm.distributed import init_distributed
    from budgetlm.model import Transformer
    from budgetlm.pretrain import check_config, plan_run, pretrain

    if not 0 <= opts.alpha <= 1:
        raise UserError(f"--alpha (weight of the teacher's soft targets) must be in [0, 1], got {opts.alpha}")
    if opts.temperature <= 0:
        raise UserError(f"--temperature must be positive, got {opts.temperature}")
    budget = opts.budget or "300s"
    parse_budget(budget)
    data = open_data(teacher, opts.data or None)
    t_cfg = teacher.config.model
    cfg = copy.deepcopy(teacher.config)
    cfg.data, cfg.budget.limit = str(data.path), budget
    cfg.model.layer_heads, cfg.model.layer_ffn = [], []  # a pruned teacher's per-block sizes are not the student's
    overrides = train_set
    apply_overrides(cfg, overrides)
    keys = {o.split("=", 1)[0].strip() for o in overrides}
    m = cfg.model
    if m.objective != t_cfg.objective:
        raise UserError(f"the student's objective ({m.objective}) must be the teacher's ({t_cfg.objective}): distillation matches their outputs")
    if m.vocab_size != t_cfg.vocab_size:
        raise UserError("the student keeps the teacher's vocabulary (model.vocab_size cannot change): their logits are matched id by id")
    if m.seq_len > t_cfg.seq_len:
        raise UserError(f"model.seq_len={m.seq_len} is longer than the teacher's context ({t_cfg.seq_len})")
    if not any(k.startswith("model.") for k in keys):  # no size given: the budget rules choose one
        cfg.auto = True
        plan_run(cfg, init_distributed(cfg.parallel.backend), keys | {"model.vocab_size", "model.objective", "model.seq_len"})
    cfg.auto = False
    check_config(cfg)
    student_params = Transformer.on_meta(cfg.model).num_params()
    if student_params >= teacher.model.num_params():
        how = "the budget rules chose" if not any(k.startswith("model.") for k in keys) else "these model keys give"
        raise UserError(f"{how} a student of {student_params:,} parameters, no smaller than the teacher ({teacher.model.num_params():,}); "
                        "set a smaller one, e.g. --set model.n_layer=2")  # fmt: skip
    teacher_model = teacher.model.to(device).eval().requires_grad_(False)
    loss_fn = distill_loss(teacher_model, temperature=opts.temperature, alpha=opts.alpha, z_loss=cfg.train.z_loss)
    detail = {"settings": {"temperature": opts.temperature, "alpha": opts.alpha, "budget": budget, "data": str(data.path)},
              "params_after": student_params,
              "model_after": {k: getattr(cfg.model, k) for k in ("n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden")}}  # fmt: skip
    begin(detail)
    detail["training"] = pretrain(cfg, out, loss_fn=loss_fn)
    return detail


# ---------------------------------------------------------------------------------------------
# the command


def compress(run_dir: Path, out: Path, cfg: CompressConfig, train_set: list[str] | None = None) -> dict:
    """Apply `cfg.method` to the run at `run_dir`, writing the compressed run to `out`; returns the record.

    `train_set`: run keys (`model.n_layer=2`) of the model that trains, distill's student or prune's recovery."""
    method, train_set = cfg.method, list(train_set or [])
    if not method:
        raise UserError(f"give --method (one of {', '.join(METHODS)})")
    if method not in METHODS:
        raise UserError(f"unknown method '{method}' (choose one of {', '.join(METHODS)})")
    if train_set and method not in ("prune", "distill"):
        raise UserError(f"--train-set {train_set[0]}: {method} trains nothing (run keys are for prune's recovery and distill's student)")
    run_dir, out = Path(run_dir), Path(out)
    source_info = compression_info(run_dir)
    if source_info and source_info["method"] in QUANTIZED:
        raise UserError(f"{run_dir} is already quantized ({source_info['method']}); compress the run it came from")
    check_out(out)
    device = resolve_device(cfg.device or "auto")
    if method not in ("prune", "distill") and cfg.budget:
        raise UserError(f"--budget is for prune (recovery training) and distill; {method} does not train")
    run = load_run(run_dir, device)
    head = {
        "format": FORMAT,
        "method": method,
        "source": str(run_dir.resolve()),
        "source_compression": source_info["method"] if source_info else None,
        "params_before": count_params(run.model),
        "size_before_bytes": file_size(weights_path(run_dir)),
    }

    def begin(detail: dict) -> None:
        """Training starts: the record goes in first (status "training"), so a killed run stays a run."""
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / COMPRESSION_FILE, {**head, "status": "training", **detail})

    try:
        if method in QUANTIZED:
            detail = quantize_run(run, out, method, device)
        elif method == "sparse":
            detail = sparse_run(run, out, cfg.sparsity, cfg.pattern, device)
        elif method == "prune":
            detail = prune_run(run, out, cfg, train_set, device, begin)
        else:
            detail = distill_run(run, out, cfg, train_set, device, begin)
    except BaseException:
        if out.is_dir() and not (out / COMPRESSION_FILE).exists():
            shutil.rmtree(out, ignore_errors=True)  # nothing half-written that looks like a run (training keeps its checkpoint)
        raise
    record = {**head, "status": "done", "size_after_bytes": file_size(out / WEIGHTS_FILE), **detail}
    write_json(out / COMPRESSION_FILE, record)
    return record


def split_set(items: list[str]) -> tuple[list[str], list[str]]:
    """`--set` items as (compress settings, run keys): a run key has a section (model.n_layer), no compress setting has one,
    so `--set model.n_layer=2` keeps its old meaning (the student's key) beside `--set keep=0.3`."""
    flat = [i for i in items if "." not in i.split("=", 1)[0]]
    return flat, [i for i in items if i not in flat]


def compress_command(args) -> int:
    from budgetlm.flags import flag_overrides, print_config

    own, run_keys = split_set(args.set or [])
    cfg = apply_overrides(CompressConfig(), flag_overrides(args) + own)
    train_set = run_keys + list(args.train_set or [])
    if args.print_config:
        print_config(cfg, args.json)
        return 0
    record = compress(Path(args.run), Path(args.out), cfg, train_set)
    if args.json:
        print(json.dumps(record))
        return 0
    mb = lambda n: f"{n / 1e6:.2f} MB"
    line = (f"{cfg.method}: {record['params_before']:,} -> {record['params_after']:,} parameters, "
            f"{mb(record['size_before_bytes'])} -> {mb(record['size_after_bytes'])} on disk")  # fmt: skip
    if "block_weight_sparsity" in record:
        line += f", blocks' weights {record['block_weight_sparsity']:.1%} zero ({record['overall_sparsity']:.1%} of all parameters)"
    print(line)
    print(f"written: {args.out} (loads like a run: budgetlm eval {args.out})")
    return 0
