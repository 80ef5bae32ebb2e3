"""`parallelize`: every parallelism and memory saver applied to the model, in one place and one order.

    tensor parallel -> activation checkpointing -> torch.compile -> FSDP2 / DDP

(torchtitan's order). It starts from the model built on `meta`: tensor parallel and FSDP2 only
re-describe parameters as DTensor shards, and `Transformer.materialize` then allocates and
initialises each rank's shards, so no rank ever holds the whole model. DDP needs real tensors and
comes after materialisation.

Known limits of torch 2.13 reported for CPU/gloo (the compile paths here are not exercised by the
tests, which run eager on CPU): per-block compile with sequence parallel fails, and whole-model
compile of FSDP2 + tensor parallel + sequence parallel fails; so compile is per block under FSDP2
or a pipeline (without sequence parallel), whole-model otherwise, and switched off, with a
printed note, where sequence parallel meets FSDP2 or per-block compile.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from budgetlm.distributed.dims import ParallelDims
from budgetlm.distributed.process import print0
from budgetlm.errors import UserError


@dataclass
class Parallelized:
    """What the training step needs: the module to call, the bare model (for state), and how."""

    train_model: nn.Module  # call this (maybe compiled / DDP-wrapped)
    model: nn.Module  # the bare Transformer (parameters may be DTensor shards)
    compiled: str  # "", "whole" (the model), "blocks" (each block) or "model+loss" (the caller compiles its loss function)
    loss_parallel: bool  # the loss must run under torch.distributed.tensor.parallel.loss_parallel()


def check_parallel_config(cfg) -> None:
    """Settings that cannot work together, each named by key (before anything is built or written)."""
    p, m = cfg.parallel, cfg.model
    extras = [f"model.{k}" for k, on in (("value_embeddings", m.value_embeddings != "none"), ("smear", m.smear)) if on]
    if extras and (p.tp > 1 or p.pp > 1):
        # a pipeline stage gets hidden states, not the token ids its value embeddings look up; tensor parallel has no plan for them yet
        raise UserError(f"{' and '.join(extras)} work with data parallelism (DDP, FSDP2) only, not parallel.tp or parallel.pp > 1")
    if p.tp > 1:
        if m.objective != "causal":
            raise UserError("parallel.tp > 1 supports model.objective=causal only (sparse masked prediction needs whole sequences)")
        n_kv = m.n_kv_head or m.n_head
        if m.n_head % p.tp or n_kv % p.tp:
            raise UserError(f"parallel.tp={p.tp} must divide model.n_head={m.n_head} and the key/value heads ({n_kv})")
        if p.sequence_parallel and m.seq_len % p.tp:
            raise UserError(f"parallel.sequence_parallel needs model.seq_len={m.seq_len} divisible by parallel.tp={p.tp}")
    if p.pp > 1:
        if m.tie_embeddings:
            raise UserError("parallel.pp > 1 needs model.tie_embeddings=false (the first and last stages cannot share one matrix)")
        if m.objective != "causal":
            raise UserError("parallel.pp > 1 supports model.objective=causal only")
        per_rank = p.pp_virtual_stages if p.pp_schedule == "Interleaved1F1B" else 1
        if m.n_layer < p.pp * per_rank:
            what = f"parallel.pp={p.pp} x parallel.pp_virtual_stages={per_rank}" if per_rank > 1 else f"parallel.pp={p.pp}"
            raise UserError(f"{what} stages need at least as many layers (model.n_layer={m.n_layer})")
    if p.ddp_comm_hook != "none" and (p.dp_shard != 1 or p.tp > 1 or p.pp > 1):
        raise UserError("parallel.ddp_comm_hook applies to DDP only (parallel.dp_shard=1, parallel.tp=1, parallel.pp=1)")
    if p.fsdp_cpu_offload and not torch.cuda.is_available():
        raise UserError("parallel.fsdp_cpu_offload needs a CUDA GPU (FSDP2 moves each block from CPU memory to the GPU as it runs)")
    if p.ddp_comm_hook in ("bf16", "fp16") and not torch.cuda.is_available():
        raise UserError(f"parallel.ddp_comm_hook={p.ddp_comm_hook} needs NCCL on CUDA GPUs (gloo has no compressed all-reduce hook)")
    if cfg.train.precision == "fp16" and (p.dp_shard != 1 or p.tp > 1 or p.fsdp_cpu_offload):
        raise UserError("train.precision=fp16 is not supported with FSDP2 or tensor parallel; use bf16")


def _compile_plan(dims: ParallelDims, cfg, compile_on: bool) -> str:
    if not compile_on:
        return ""
    sp = dims.tp_enabled and cfg.parallel.sequence_parallel
    if sp and dims.fsdp:
        print0("note: torch.compile is off: torch 2.13 cannot compile FSDP2 + tensor parallel + sequence parallel")
        return ""
    if dims.fsdp or dims.pp_enabled:
        if sp:
            print0("note: torch.compile is off: torch 2.13 cannot compile blocks with sequence parallel")
            return ""
        return "blocks"
    return "whole"


def parallelize(
    model: nn.Module, dims: ParallelDims, cfg, mesh, device: torch.device, *, compile_on: bool, param_dtype=None, seed: int | None = None
) -> Parallelized:
    """Apply cfg.parallel to `model` (a Transformer, or one pipeline stage, on `meta`), allocate and
    initialise it on `device` (from `seed`, else one draw of torch's global generator), and return
    what to train. A pipeline's schedule goes around the parallelised stages
    (`budgetlm.distributed.pipeline.build_pipeline`)."""
    p = cfg.parallel
    # between pipeline stages activations travel whole: no sequence-sharded hand-over, no sharded logits
    sequence_parallel = p.sequence_parallel and not dims.pp_enabled
    loss_parallel = p.loss_parallel and not dims.pp_enabled
    if dims.tp_enabled:
        apply_tp(model, mesh["tp"], sequence_parallel=sequence_parallel, loss_parallel=loss_parallel)
    if p.activation_checkpointing != "none":
        apply_ac(model, p.activation_checkpointing)
    compiled = _compile_plan(dims, cfg, compile_on)
    if compiled == "blocks":
        for block in model.layers.values():
            block.compile()  # in place: parameter names do not change
    if dims.fsdp:
        dp_mesh = mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]
        apply_fsdp(model, dp_mesh, param_dtype=param_dtype, reshard_after_forward=p.reshard_after_forward, cpu_offload=p.fsdp_cpu_offload)
    model.materialize("cpu" if p.fsdp_cpu_offload else device, seed)
    train_model = model
    if compiled == "whole" and not dims.ddp:
        # one graph for the model and its loss, compiled by the caller around its loss function: the
        # cross-entropy over the vocabulary fuses with the output projection. On one CPU core at
        # 2 x 128 that made the whole step 1.65x faster, against 1.44x for the model alone.
        compiled = "model+loss"
    elif compiled == "whole":
        train_model = torch.compile(model)
    if dims.ddp:  # DDP is only chosen without tensor or pipeline parallel or sharding: every rank a replica
        train_model = apply_ddp(train_model, device, comm_hook=p.ddp_comm_hook)
    return Parallelized(train_model, model, compiled, loss_parallel=dims.tp_enabled and loss_parallel)


# ---------------------------------------------------------------------------------------------
# the pieces


def apply_tp(model: nn.Module, tp_mesh, *, sequence_parallel: bool, loss_parallel: bool) -> None:
    """Megatron-style tensor parallel with DTensor: q/k/v and w1/w3 column-wise, wo and w2 row-wise,
    the embedding row-wise (vocabulary-sharded) and the output column-wise. With sequence parallel
    the norms and the residual stream between blocks are split along the sequence; with loss
    parallel the logits stay vocabulary-sharded into the loss."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    between = Shard(1) if sequence_parallel else Replicate()  # layout of the residual stream
    top = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=between)
    if model.output is not None:
        top["norm"] = SequenceParallel() if sequence_parallel else _ReplicatedParams()
        top["output"] = ColwiseParallel(
            input_layouts=between,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    if top:
        parallelize_module(model, tp_mesh, top)
    for block in model.layers.values():
        rest = (None,) * 5  # cos, sin, kv_cache, start_pos, attn_mask pass through untouched
        plan = {
            "attention": PrepareModuleInput(input_layouts=(between, *rest), desired_input_layouts=(Replicate(), *rest)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=between),
            "feed_forward": PrepareModuleInput(input_layouts=(between,), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=between),
        }
        if block.feed_forward.w3 is not None:
            plan["feed_forward.w3"] = ColwiseParallel()
        if block.attention.q_norm is not None:
            # QK-norm normalises each head over head_dim, and q, k (B, nh, T, hs) arrive split by heads:
            # the gains are replicated, each rank normalises its own heads, and the gains' gradients
            # (partial sums over this rank's heads) are summed over the mesh (torchtitan's Qwen3 plan)
            plan["attention.q_norm"] = SequenceParallel(sequence_dim=1, use_local_output=True)
            plan["attention.k_norm"] = SequenceParallel(sequence_dim=1, use_local_output=True)
        if not isinstance(block.attention_norm, nn.Identity):  # model.first_attention_norm=false: block 0 has none
            plan["attention_norm"] = SequenceParallel() if sequence_parallel else _ReplicatedParams()
        plan["ffn_norm"] = SequenceParallel() if sequence_parallel else _ReplicatedParams()
        parallelize_module(block, tp_mesh, plan)
    model.tie_weights()  # both sides are now Shard(0) of the same (vocab, n_embd) matrix


def _ReplicatedParams():
    """A parallel style for a module whose work is replicated (a norm without sequence parallel):
    its parameters become Replicate DTensors, so every parameter is a DTensor on the same mesh
    (fused AdamW and the gradient norm cannot mix plain tensors with DTensors); activations stay plain."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module
    from torch.distributed.tensor.parallel.style import ParallelStyle

    class ReplicatedParams(ParallelStyle):
        def _apply(self, module, mesh):
            def inputs(mod, args, mesh):
                return tuple(DTensor.from_local(a, mesh, [Replicate()], run_check=False) if isinstance(a, torch.Tensor) else a for a in args)

            def outputs(mod, out, mesh):
                return out.to_local() if isinstance(out, DTensor) else out

            return distribute_module(module, mesh, input_fn=inputs, output_fn=outputs)

    return ReplicatedParams()


def _selective_policy(ctx, op, *args, **kwargs):
    """Keep the matmul and attention outputs (expensive to recompute), recompute the rest (norms,
    activations, rotary: cheap elementwise work that holds most of the activation memory)."""
    from torch.utils.checkpoint import CheckpointPolicy

    keep = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
    keep |= {
        getattr(torch.ops.aten, name).default
        for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu")
        if hasattr(torch.ops.aten, name)
    }
    return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE


def apply_ac(model: nn.Module, mode: str) -> None:
    """Wrap every block in activation checkpointing: `full` keeps only the block's input,
    `selective` also keeps matmul and attention outputs. Parameter names in state dicts do not
    change (the wrapper's hooks strip its prefix)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    for key, block in list(model.layers.items()):
        if mode == "selective":
            wrapped = checkpoint_wrapper(block, context_fn=partial(create_selective_checkpoint_contexts, _selective_policy), preserve_rng_state=False)
        else:
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        model.layers[key] = wrapped


def apply_fsdp(model: nn.Module, dp_mesh, *, param_dtype=None, reshard_after_forward: bool = True, cpu_offload: bool = False) -> None:
    """FSDP2: each block its own unit (gathered just before it runs), the rest (embedding, final
    norm, output) the root's. Gradients are reduced in fp32 whatever the compute dtype.

    `reshard_after_forward` applies to the blocks. The root gets torch's default (None), which keeps
    its parameters gathered from forward into backward: backward starts with the output projection,
    so resharding it would only all-gather it again at once (passing True explicitly turns that rule
    off: 13% more bytes per step for FSDP2 on 2 processes in bench/results/scaling.md)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again right away by backward: keep them gathered
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=None)


def apply_ddp(model: nn.Module, device: torch.device, *, group=None, comm_hook: str = "none") -> nn.Module:
    """DistributedDataParallel, optionally with a gradient-compression communication hook.

    Buffers are not re-broadcast before every forward: the model's only buffers are the rotary
    tables, non-persistent and computed from the config on every rank (`Transformer.init_weights`),
    so rank 0's copy is the one each rank already has. DDP still broadcasts them once, with the
    parameters, when it is built."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [device.index] if device.type == "cuda" else None
    # torch 2.13 renamed the switch (and deprecated broadcast_buffers); older torch has only the old name
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters else {"broadcast_buffers": False}
    ddp = DDP(model, device_ids=device_ids, process_group=group, **no_sync)
    if comm_hook != "none":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

        if comm_hook == "powersgd":
            state = powerSGD_hook.PowerSGDState(process_group=group, matrix_approximation_rank=1, start_powerSGD_iter=2)
            ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        else:
            hook = default_hooks.bf16_compress_hook if comm_hook == "bf16" else default_hooks.fp16_compress_hook
            ddp.register_comm_hook(group, hook)
    return ddp
