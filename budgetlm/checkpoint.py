"""Atomic checkpoints and exact resume, in one of two formats.

A checkpoint is a directory (`RUN/checkpoint/`). A single process writes single files:

    model.safetensors   weights; tied/shared tensors stored once, ties listed in the metadata
    optimizer.pt        torch.save of the optimizer's state_dict (absent if none was given)
    rng.pt              python, numpy, torch CPU and (when present) CUDA generator states
    state.json          the loop's state (step, tokens, clock, data position, GradScaler, lr scale,
                        NaN counters, layout, ...) plus "format": "budgetlm-ckpt/1"; written last
    <extra files>       whatever the loop adds (resolved config, tokenizer, ...)

Several processes (any layout: DDP, FSDP2, HSDP, tensor or pipeline parallel) write one sharded
checkpoint with `torch.distributed.checkpoint` (DCP), every rank its own part, and nobody gathers
the model:

    .metadata           DCP's index: every tensor's global shape and which file holds which piece
    __R_0.distcp        rank R's shards of the model and optimizer state (a replicated tensor is
                        written by one rank only)
    rng-R.pt            rank R's generator states
    state.json          as above, with "format": "budgetlm-ckpt/2"; written last, by rank 0

Keys are the fully-qualified parameter names of the unsharded model (`layers.3.attention.wq.weight`;
the optimizer's flattened as `state.<name>.exp_avg`, `param_groups.<name>.lr`, by
`torch.distributed.checkpoint.state_dict` with `flatten_optimizer_state_dict`): tensor-parallel and
FSDP2 shards are DTensors of the whole parameter, and a pipeline stage is the model with other
stages' layers deleted, so its names are the whole model's. DCP's `.metadata` records each piece's
place in the whole tensor, so a checkpoint loads into any other layout or process count (4
processes -> 2, FSDP2 -> tensor parallel, pipeline -> none, N -> 1): each rank reads the pieces
that overlap what it now holds. The single-file format loads into any layout too (rank 0 reads
and scatters: the upgrade path for checkpoints written before the sharded format).

How a save stays atomic. Every file goes into a fresh sibling `checkpoint.tmp-XXXX/` and is
fsynced, then the directory itself; then `checkpoint/` is renamed to `checkpoint.old/`,
`checkpoint.tmp-XXXX/` is renamed to `checkpoint/`, the parent directory is fsynced and
`checkpoint.old/` is deleted. A directory named `checkpoint/` therefore only ever appears
through a rename of a complete, synced one. A kill at any moment leaves one of:
- `checkpoint/` (old or new, complete), possibly with a half-written `.tmp-*` or a `.old`;
- no `checkpoint/` but a complete `checkpoint.old/` (killed between the two renames).
Loading uses `checkpoint/`, else `checkpoint.old/`, and never writes. The next save first
repairs the directory: renames `.old` back if `checkpoint/` is missing, then deletes `.old`
and stale `.tmp-*` siblings. In a sharded save rank 0 alone repairs, creates the temporary
directory (its name is broadcast) and renames; every rank writes its files into it (DCP fsyncs
each), rank 0 writes `.metadata` once all have finished, and only after a barrier that every rank
passes once its files are synced does rank 0 write `state.json` and rename. So every process must
see the same run directory (one machine, or a shared file system across nodes).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from budgetlm.distributed import all_reduce_max, unwrap_model
from budgetlm.errors import UserError

FORMAT = "budgetlm-ckpt/1"  # single files
SHARDED_FORMAT = "budgetlm-ckpt/2"  # torch.distributed.checkpoint, one part per rank
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "state.json"
DCP_METADATA = ".metadata"
RESERVED = {MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE, DCP_METADATA}
ALIASES_KEY = "budgetlm.aliases"  # safetensors metadata: {"tied name": "stored name"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


# ---------------------------------------------------------------------------------------------
# durable file-system steps


def _fsync_path(path: Path) -> None:
    """Flush a file's or directory's data and metadata to disk (directories: where supported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open directories; its renames are not fsync-able anyway
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _old(path: Path) -> Path:
    return path.with_name(path.name + ".old")


def _repair(path: Path) -> None:
    """Finish or undo what a killed save left next to `path` (see the module docstring)."""
    old = _old(path)
    if old.exists() and not path.exists():
        os.replace(old, path)  # killed between the two renames: the old checkpoint is the latest
        _fsync_path(path.parent)
    elif old.exists():
        shutil.rmtree(old)
    for stale in path.parent.glob(_glob_escape(path.name) + ".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


# ---------------------------------------------------------------------------------------------
# weights (safetensors, with tied tensors stored once)


def _flatten_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors safetensors accepts (each owning its storage, on CPU) and the aliases of tied ones.

    safetensors refuses tensors that share storage. Two names for the very same tensor (tied
    embeddings) are stored once and recorded as an alias; a tensor that only overlaps another
    or views part of a larger storage is cloned.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state entry {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach()
        view = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in first and t.numel() > 0:
            aliases[name] = first[view]
            continue
        first[view] = name
        tensors[name] = t
    owners = Counter((t.device, t.untyped_storage().data_ptr()) for t in tensors.values() if t.numel() > 0)
    out = {}
    for name, t in tensors.items():
        whole = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if not whole or owners[(t.device, t.untyped_storage().data_ptr())] > 1:
            t = t.contiguous().clone()
        out[name] = t.cpu()
    return out, aliases


def _save_weights_file(state: dict[str, torch.Tensor], path: Path) -> None:
    tensors, aliases = _flatten_state(state)
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt", ALIASES_KEY: json.dumps(aliases)})
    _fsync_path(path)


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get(ALIASES_KEY, "{}"))
        state = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:  # the Rust reader raises its own error types for every kind of damage
        raise UserError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    for name, target in aliases.items():
        if target not in state:
            raise UserError(f"{path} is corrupt: tied tensor '{name}' points at missing '{target}'")
        state[name] = state[target]
    return state


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy `state` into `model`, naming the first tensor that does not fit."""
    model = unwrap_model(model)
    expected = model.state_dict()
    for name, t in expected.items():
        if name not in state:
            n = sum(k not in state for k in expected)
            raise UserError(f"{source} does not match this model: tensor '{name}' is missing from it ({n} missing in all)")
        if tuple(state[name].shape) != tuple(t.shape):
            raise UserError(
                f"{source} does not match this model: tensor '{name}' has shape {tuple(state[name].shape)} there but {tuple(t.shape)} in the model"
            )
    extra = [k for k in state if k not in expected]
    if extra:
        raise UserError(f"{source} does not match this model: it has tensor '{extra[0]}' that the model lacks ({len(extra)} extra in all)")
    with torch.no_grad():
        model.load_state_dict(state, strict=True)  # copies in place, so ties in the model stay tied


def save_weights(path: str | Path, model: nn.Module) -> None:
    """Write `model`'s weights to one safetensors file, atomically (temp file + rename).

    Tied tensors are stored once (see `load_weights`); DDP/compile wrappers are looked through.
    """
    save_weights_state(path, unwrap_model(model).state_dict())


def save_weights_state(path: str | Path, state: dict[str, torch.Tensor]) -> None:
    """`save_weights` for a state dict already gathered (see `full_model_state`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    os.close(fd)
    try:
        _save_weights_file(state, Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


def load_weights(path: str | Path, model: nn.Module) -> None:
    """Load weights written by `save_weights` (or `model.safetensors` of a checkpoint) into `model`."""
    path = Path(path)
    _load_into(model, _read_weights_file(path), path)


# ---------------------------------------------------------------------------------------------
# random number generators


def rng_state() -> dict:
    """Every generator a training step may draw from, in a form `torch.load(weights_only=True)` reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# ---------------------------------------------------------------------------------------------
# whole states (single-file checkpoints and the consolidated final weights), optimizer states by name
#
# A single-file checkpoint holds the whole model and optimizer state keyed by parameter name;
# torch.distributed.checkpoint's get_/set_state_dict gather shards on a single process (FSDP2 with
# CPU offload) and scatter a single-file checkpoint into any layout on load. Checkpoints written
# before the optimizer state was keyed by name (by parameter index) still load.


def is_sharded(model: nn.Module) -> bool:
    """True when some parameter is a DTensor (FSDP2 or tensor parallel)."""
    return any(hasattr(p, "device_mesh") for p in unwrap_model(model).parameters())


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter name of each optimizer index (torch numbers parameters across groups in order)."""
    names = {}
    for name, p in unwrap_model(model).named_parameters():
        names.setdefault(id(p), name.replace("_checkpoint_wrapped_module.", ""))
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """An `optimizer.state_dict()` keyed by parameter name instead of index (the layout-free form)."""
    names = _param_names(model, optimizer)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def optimizer_state_by_index(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """The inverse of `optimizer_state_by_name` for this model and optimizer (index-keyed states pass through)."""
    if not any(isinstance(k, str) for k in state.get("state", {})) and not any(
        isinstance(p, str) for g in state.get("param_groups", []) for p in g.get("params", ())
    ):
        return state
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    try:
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
        return {"state": {index[n]: v for n, v in state["state"].items()}, "param_groups": groups}
    except KeyError as e:
        raise UserError(f"the optimizer state names parameter {e} that this model does not have") from None


def full_model_state(model: nn.Module, gather: dict | None = None) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU, on rank 0 ({} elsewhere when sharded: a collective then).

    `gather` is for pipeline stages: every rank holds part of the model, so each stage's whole
    state is made on every rank of that stage and its first rank (`gather["sender"]`) sends it to
    rank 0, which merges them (a collective over all ranks). Used once, for the final weights."""
    model = unwrap_model(model)
    if gather is not None:
        import torch.distributed as dist

        if is_sharded(model):  # whole tensors on every rank of the stage (DSD's CPU copy goes to global rank 0 only)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            mine = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        else:
            mine = model.state_dict()
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object({k: v.detach().cpu() for k, v in mine.items()} if gather["sender"] else None, parts, dst=0)
        return {k: v for p in parts or () if p is not None for k, v in p.items()}
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options())
    if getattr(model, "output", None) is not None and getattr(model.cfg, "tie_embeddings", False) and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]  # one tensor under both names, as unsharded
    return state


def full_train_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    """Whole model and optimizer states (the optimizer's keyed by parameter name) of a single process,
    for `save_checkpoint` (a model sharded on one process, FSDP2 with CPU offload, is gathered)."""
    model = unwrap_model(model)
    if not is_sharded(model):
        return model.state_dict(), optimizer_state_by_name(model, optimizer, optimizer.state_dict()) if optimizer is not None else None
    return full_model_state(model), _full_optimizer_state(model, optimizer)


def _full_optimizer_state(model: nn.Module, optimizer, options=None) -> dict | None:
    if optimizer is None:
        return None
    if not optimizer.state:
        # before the first step: get_optimizer_state_dict would initialise the state with a zero-gradient
        # step, which advances Adam's step count and changes the bias correction of the real first step
        return optimizer_state_by_name(model, optimizer, optimizer.state_dict())
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=options or _full_options())


def _load_part(d: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load this rank's part (a pipeline stage) of a whole checkpoint: every rank reads the files and
    keeps the tensors its model names (no collective: stages hold different parameters)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    model = unwrap_model(model)
    expected = unwrap_model(model).state_dict()
    state = _read_weights_file(d / MODEL_FILE)
    missing = [k for k in expected if k not in state]
    if missing:
        raise UserError(f"{d / MODEL_FILE} does not match this model: tensor '{missing[0]}' is missing from it")
    for name, t in expected.items():
        if tuple(state[name].shape) != tuple(t.shape):
            there, here = tuple(state[name].shape), tuple(t.shape)
            raise UserError(f"{d / MODEL_FILE} does not match this model: tensor '{name}' has shape {there} there but {here} in the model")
    state = {k: state[k] for k in expected}
    options = StateDictOptions(full_state_dict=True)
    if is_sharded(model):
        set_model_state_dict(model, state, options=options)
    else:
        with torch.no_grad():
            model.load_state_dict(state, strict=True)
    if optimizer is None:
        return
    opt_state = _torch_load(d / OPTIMIZER_FILE, "optimizer state")
    if not any(isinstance(k, str) for k in opt_state.get("state", {})) and opt_state.get("state"):
        raise UserError(f"checkpoint {d} keeps its optimizer state by parameter index (an older format); resume it without pipeline parallelism once")
    mine = set(_param_names(model, optimizer))
    groups = [{**g, "params": [n for n in g["params"] if n in mine]} for g in opt_state["param_groups"]]
    # a stage's optimizer has no empty groups: one holding only the embedding or only the head lives on another stage
    opt_state = {"state": {k: v for k, v in opt_state["state"].items() if k in mine}, "param_groups": [g for g in groups if g["params"]]}
    if not opt_state["state"]:
        optimizer.state.clear()
    elif is_sharded(model):
        set_optimizer_state_dict(model, optimizer, opt_state, options=options)
    else:
        optimizer.load_state_dict(optimizer_state_by_index(model, optimizer, opt_state))


def _check_shapes(model: nn.Module, path: Path) -> None:
    """The `_load_into` checks from the file's header alone (every rank runs them, so all fail alike)."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get(ALIASES_KEY, "{}"))
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for name, target in aliases.items():
        shapes[name] = shapes.get(target)
    expected = {k: tuple(v.shape) for k, v in unwrap_model(model).state_dict().items()}
    for name, shape in expected.items():
        if name not in shapes:
            raise UserError(f"{path} does not match this model: tensor '{name}' is missing from it")
        if shapes[name] != shape:
            raise UserError(f"{path} does not match this model: tensor '{name}' has shape {shapes[name]} there but {shape} in the model")
    extra = [k for k in shapes if k not in expected]
    if extra:
        raise UserError(f"{path} does not match this model: it has tensor '{extra[0]}' that the model lacks ({len(extra)} extra in all)")


def _load_sharded(d: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Scatter a whole checkpoint into a sharded model (and optimizer): rank 0 reads, all receive."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    model = unwrap_model(model)
    _check_shapes(model, d / MODEL_FILE)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    options = _full_options(broadcast_from_rank0=True)
    state = _read_weights_file(d / MODEL_FILE) if rank0 else {}
    set_model_state_dict(model, state, options=options)
    if optimizer is not None:
        from budgetlm.distributed import broadcast_object

        opt_state = {}
        if rank0:
            opt_state = _torch_load(d / OPTIMIZER_FILE, "optimizer state")
            if not any(isinstance(k, str) for k in opt_state.get("state", {})):
                opt_state = optimizer_state_by_name(model, optimizer, opt_state)  # an index-keyed (older) checkpoint
        if broadcast_object(bool(opt_state.get("state")) if rank0 else None):
            set_optimizer_state_dict(model, optimizer, opt_state, options=options)
        else:  # saved before the first step: a fresh optimizer (set_optimizer_state_dict would take a zero step)
            optimizer.state.clear()


# ---------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(
    path: str | Path,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict | None,
    loop_state: dict,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a complete checkpoint to directory `path`, replacing the previous one atomically.

    `model_state` is the bare model's state_dict (see `distributed.unwrap_model`);
    `loop_state` must be JSON-serialisable and may not use the key "format". `extra_files`
    maps plain file names to their bytes. Returns `path`.
    """
    path = Path(path)
    extra_files = extra_files or {}
    state_bytes = _state_bytes(loop_state, extra_files, FORMAT)  # fails before touching disk
    path.parent.mkdir(parents=True, exist_ok=True)
    _repair(path)

    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    _save_weights_file(model_state, tmp / MODEL_FILE)
    if optimizer_state is not None:
        _torch_save(optimizer_state, tmp / OPTIMIZER_FILE)
    _torch_save(rng_state(), tmp / RNG_FILE)
    for name, data in extra_files.items():
        _write_bytes(tmp / name, data)
    _write_bytes(tmp / STATE_FILE, state_bytes)
    _fsync_path(tmp)

    _swap_in(tmp, path)
    return path


def _state_bytes(loop_state: dict, extra_files: dict[str, bytes], fmt: str) -> bytes:
    if "format" in loop_state:
        raise ValueError("loop_state may not use the key 'format'")
    for name in extra_files:
        if name in RESERVED or name.startswith("rng-") or not _SAFE_NAME.match(name) or name in (".", ".."):
            raise ValueError(f"extra file name {name!r} is reserved or not a plain file name")
    return json.dumps({"format": fmt, **loop_state}, indent=1).encode()


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename the complete, synced `tmp` to `path` (see the module docstring)."""
    if path.exists():
        os.replace(path, _old(path))
    os.replace(tmp, path)
    _fsync_path(path.parent)
    if _old(path).exists():
        shutil.rmtree(_old(path))


# ---------------------------------------------------------------------------------------------
# sharded checkpoints (torch.distributed.checkpoint): every rank writes and reads its own part


def _dcp_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)  # optimizer keys by parameter name, not index


def _first_error(err: str | None) -> str | None:
    """The first rank's error message on every rank (None when no rank has one), so that all ranks
    stop together instead of some waiting in a collective the others never reach."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return err
    errs = [None] * dist.get_world_size()
    dist.all_gather_object(errs, err)
    return next((e for e in errs if e is not None), None)


def save_sharded_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, loop_state: dict, extra_files: dict[str, bytes] | None = None
) -> Path:
    """`save_checkpoint` for several processes: called on every rank at once (a collective), each
    writing its own shards of the model and optimizer through torch.distributed.checkpoint. Rank
    0's `loop_state` and `extra_files` are written. The optimizer state is saved once every rank
    has one (before the first step there is none: see `_full_optimizer_state`)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    path = Path(path)
    extra_files = extra_files or {}
    state_bytes = _state_bytes(loop_state, extra_files, SHARDED_FORMAT)
    rank = dist.get_rank()
    tmp, err = None, None
    if rank == 0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _repair(path)
            tmp = tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent)
        except OSError as e:
            err = f"cannot write checkpoint {path}: {e}"
    box = [tmp, err]
    dist.broadcast_object_list(box, src=0)
    tmp, err = box
    if err:
        raise UserError(err)
    tmp = Path(tmp)
    model = unwrap_model(model)
    state = {"model": get_model_state_dict(model)}  # DTensor shards and this stage's tensors, by name
    if optimizer is not None and not all_reduce_max(0.0 if optimizer.state else 1.0):
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=_dcp_options())
    dcp.save(state, checkpoint_id=str(tmp))  # __R_0.distcp from every rank, then .metadata from rank 0
    _torch_save(rng_state(), tmp / f"rng-{rank}.pt")
    dist.barrier()  # every rank's files are written and synced
    if rank == 0:
        try:
            for name, data in extra_files.items():
                _write_bytes(tmp / name, data)
            _write_bytes(tmp / STATE_FILE, state_bytes)
            _fsync_path(tmp)
            _swap_in(tmp, path)
        finally:
            dist.barrier()
    else:
        dist.barrier()  # no rank goes on (and may save again) before the new checkpoint is in place
    return path


def _check_saved(saved: dict, state: dict, prefix: str, d: Path) -> str | None:
    """What in `state` (this rank's template) the checkpoint's index lacks or shapes otherwise."""
    for name, value in state.items():
        key = prefix + name
        if key not in saved:
            if prefix == "model.":
                return f"checkpoint {d} does not match this model: tensor '{name}' is missing from it"
            return f"checkpoint {d}: the optimizer state lacks '{name}' (written with another optimizer?)"
        size = getattr(saved[key], "size", None)
        if isinstance(value, torch.Tensor) and size is not None and tuple(size) != tuple(value.shape):
            return f"checkpoint {d} does not match this model: '{name}' has shape {tuple(size)} there but {tuple(value.shape)} here"
    return None


def _load_dcp(d: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a sharded checkpoint into this rank's part of `model` (any layout), on every rank at once."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict

    model = unwrap_model(model)
    saved, err = {}, None
    try:
        saved = dcp.FileSystemReader(str(d)).read_metadata().state_dict_metadata
    except Exception as e:  # a truncated or foreign .metadata
        err = f"checkpoint {d}: {DCP_METADATA} is unreadable ({type(e).__name__})"
    state, unsaved = {"model": get_model_state_dict(model)}, {}
    err = err or _check_saved(saved, state["model"], "model.", d)
    with_optimizer = optimizer is not None and any(k.startswith("optimizer.") for k in saved)
    if with_optimizer and err is None:
        if not optimizer.state:  # the template allocates the state with a zero step, which DSD skips while gradients exist
            optimizer.zero_grad(set_to_none=True)
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=_dcp_options())
        # a group setting this torch has and the writer's did not (torch adds them across versions) keeps its value here
        unsaved = {k: v for k, v in state["optimizer"].items() if k.startswith("param_groups.") and "optimizer." + k not in saved}
        for k in unsaved:
            del state["optimizer"][k]
        err = _check_saved(saved, state["optimizer"], "optimizer.", d)
    err = _first_error(err)
    if err:
        raise UserError(err)
    try:
        with warnings.catch_warnings():  # one process reading a sharded checkpoint is meant, not a slip
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(d), no_dist=not torch.distributed.is_initialized())
    except Exception as e:  # damaged shard files; DCP reports every rank's failure at once
        raise UserError(f"checkpoint {d} could not be read ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
    set_model_state_dict(model, state["model"])
    if with_optimizer:
        set_optimizer_state_dict(model, optimizer, {**state["optimizer"], **unsaved}, options=_dcp_options())
    elif optimizer is not None:  # saved before the first step: a fresh optimizer
        optimizer.state.clear()


def find_checkpoint(path: str | Path) -> Path:
    """The complete checkpoint directory for `path`: itself, or its `.old` twin after a kill."""
    path = Path(path)
    for candidate in (path, _old(path)):
        if (candidate / STATE_FILE).is_file():
            return candidate
    raise UserError(f"no checkpoint at {path}")


def read_loop_state(path: str | Path) -> dict:
    """The loop state stored in a checkpoint, without loading any tensors."""
    d = find_checkpoint(path)
    try:
        state = json.loads((d / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {d}: {STATE_FILE} is unreadable ({e})") from None
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, SHARDED_FORMAT):
        found = state.get("format") if isinstance(state, dict) else None
        raise UserError(f"checkpoint {d} has format {found!r}; this budgetlm reads {FORMAT} and {SHARDED_FORMAT}")
    state.pop("format")
    return state


def read_extra_file(path: str | Path, name: str) -> bytes:
    """One of the `extra_files` saved with a checkpoint."""
    f = find_checkpoint(path) / name
    if not f.is_file():
        raise UserError(f"checkpoint {f.parent} has no {name}")
    return f.read_bytes()


def _torch_load(path: Path, what: str):
    if not path.is_file():
        raise UserError(f"checkpoint {path.parent} has no {what} ({path.name})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, ...: all mean a damaged file
        raise UserError(f"checkpoint {path.parent}: {path.name} is unreadable ({type(e).__name__})") from None


def _check_optimizer_state(state: dict, optimizer: torch.optim.Optimizer, d: Path) -> None:
    # load_state_dict checks group sizes but not tensor shapes: a state from another model with
    # the same parameter count per group would load and fail later inside the fused kernel.
    groups = state.get("param_groups", [])
    if [len(g.get("params", ())) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise UserError(f"checkpoint {d}: the optimizer state does not match this model's parameter groups")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for index, per_param in state.get("state", {}).items():
        if not isinstance(index, int) or index >= len(params):
            raise UserError(f"checkpoint {d}: the optimizer state does not match this model's parameters")
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape != params[index].shape:
                raise UserError(
                    f"checkpoint {d}: optimizer state '{key}' of parameter {index} has shape {tuple(value.shape)} "
                    f"but the parameter has {tuple(params[index].shape)}"
                )


def load_weights_any_layout(run_dir: str | Path, model: nn.Module) -> None:
    """Load a run's final weights (`run_dir/model.safetensors`) into `model` in any layout: whole,
    sharded (rank 0's full state scattered) or one pipeline stage (the tensors it holds)."""
    _load_part(Path(run_dir), model, None)


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, restore_rng: bool = True, partial: bool = False
) -> dict:
    """Restore weights (and the optimizer and RNG states) from a checkpoint; returns the loop state.

    The optimizer must have been built the same way as the saved one (same parameter groups);
    its tensors move to the parameters' device. A sharded checkpoint is read on every rank at once,
    each rank its own part, whatever layout wrote it (into one unsharded model too); a single-file
    checkpoint is read by rank 0 and scattered into a sharded model, or read per stage (`partial`).
    Raises UserError for a missing, damaged or mismatched checkpoint, naming the first tensor that
    does not fit.
    """
    d = find_checkpoint(path)
    loop_state = read_loop_state(d)
    if (d / DCP_METADATA).is_file():  # sharded: each rank reads the pieces it holds now
        _load_dcp(d, model, optimizer)
        if restore_rng:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            rng = d / f"rng-{rank}.pt"
            set_rng_state(_torch_load(rng if rng.is_file() else d / "rng-0.pt", "random generator states"))
        return loop_state
    if partial:  # a pipeline stage: the part of the whole checkpoint this model holds
        _load_part(d, model, optimizer)
        optimizer = None
    elif is_sharded(model):
        _load_sharded(d, model, optimizer)
    else:
        _load_into(model, _read_weights_file(d / MODEL_FILE), d / MODEL_FILE)
    if optimizer is not None and not is_sharded(model):  # (a stage's optimizer was loaded with it)
        opt_state = optimizer_state_by_index(model, optimizer, _torch_load(d / OPTIMIZER_FILE, "optimizer state"))
        _check_optimizer_state(opt_state, optimizer, d)
        try:
            optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"checkpoint {d}: the optimizer state does not match this model's parameters ({e})") from None
    if restore_rng:
        set_rng_state(_torch_load(d / RNG_FILE, "random generator states"))
    return loop_state
