"""The output projection and its cross-entropy as one chunked operation, gradients included.

The plain way, `cross_entropy(h @ W^T, y)`, writes an (N, V) logit matrix (N tokens, V the vocabulary)
to memory, upcasts it to fp32, writes its log-softmax, and in the backward pass a zero-filled
(N, V) gradient and the log-softmax gradient: five passes over the largest tensor of a small
model's step, each bound by memory bandwidth. On a CPU at 2-14M parameters these passes were 14-23%
of a bf16 training step (torch.profiler: `_log_softmax`, its backward, the fp32 upcast and the fill).

Here the logits are made in one matmul, in the compute dtype, and then turned in place, chunk by
chunk of rows small enough to stay in cache, into their own gradient: one exp per logit gives both
the loss (log Z minus the target's logit) and the softmax, which less the one-hot and over the number
of counted targets is the gradient. No fp32 copy, log-softmax or zero-filled gradient of the (N, V)
matrix is written. The gradients of the hidden states (`g W`) and of the weight (`g^T h`) are made in
the forward pass (per chunk while it is in cache, in fp32 on a CPU when chunks have enough rows;
otherwise as two whole-matrix products), and the backward pass only scales them by the incoming
gradient. The matmuls are the same three the plain way does, in the same precision (under autocast
in the autocast dtype, as `nn.Linear`'s would); the softmax is in fp32 either way. This is the idea
of Liger Kernel's fused linear cross-entropy (Hsu et al. 2024), in plain PyTorch.

It needs the loss to be the last thing computed from the logits, which holds for pretraining; the
tensor-parallel loss (logits sharded over the vocabulary) and pipeline stages keep the plain path.
"""

from __future__ import annotations

import functools

import torch

IGNORE_INDEX = -100  # targets with this value carry no loss (PyTorch's cross_entropy default)
CHUNK_ELEMENTS = 1 << 18  # logits per chunk on a CPU: 256K fp32 = 1 MiB, which stays in a core's L2 on current CPUs
GPU_CHUNK_ELEMENTS = 1 << 24  # on a GPU cache residency is not the point, few kernel launches are: 64 MiB fp32 chunks
# In fp32 on a CPU, chunks of at least this many rows turn their gradient into `g W` and `g^T h` at once,
# while it is in cache, instead of in two whole-matrix products after the loop. On one core of an
# Intel Xeon (torch 2.13), both products over 2048 x 2048 logits at width 128: 18.8 ms at 128 rows a
# chunk against 23.1 whole, 5.2 against 6.7 at 1024 x 64; with fewer rows (a larger vocabulary) the
# accumulation into `g^T h` loses (64 rows at 4096 x 192: 54.7 against 49.5).
IN_LOOP_MIN_ROWS = 128
# PyTorch's vectorised CPU exp2 kernel ran faster than its exp on one EPYC core (torch 2.13, 2048 x 2048 fp32
# values): 1.25 against 3.54 ms with AVX-512, 1.87 against 3.47 with AVX2; enough to make exp(x) = 2^(x log2 e),
# one more multiply, worth it. The exp had been a fifth of the loss's time at 1 x 64 and vocabulary 2048, whose
# forward and backward went from 16.1 to 13.2 ms. Unvectorised (ATEN_CPU_CAPABILITY=default), exp2 is 2.7x slower.
LOG2E = 1.4426950408889634
EXP2_CAPABILITIES = {"AVX2", "AVX512"}


@functools.cache
def exp2_is_faster() -> bool:
    return torch.backends.cpu.get_cpu_capability() in EXP2_CAPABILITIES


def chunk_rows(vocab: int, n_rows: int, device_type: str = "cpu") -> int:
    elements = CHUNK_ELEMENTS if device_type == "cpu" else GPU_CHUNK_ELEMENTS
    return max(16, min(n_rows, elements // max(vocab, 1)))


def _compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, z_loss: float, grad_mode: bool) -> torch.Tensor:
        N, V = h.size(0), weight.size(0)
        dtype = _compute_dtype(h.device.type, h.dtype)
        need_grad = grad_mode and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(dtype), weight.to(dtype)
            logits = hc @ wc.t()  # (N, V) in the compute dtype: one large, efficient matmul
            keep = targets != IGNORE_INDEX
            scale = 1.0 / keep.sum().clamp(min=1).float()  # a tensor: no device sync
            t_safe = targets.clamp(min=0).unsqueeze(1)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            step = chunk_rows(V, N, h.device.type)
            in_loop = need_grad and h.device.type == "cpu" and dtype == torch.float32 and step >= IN_LOOP_MIN_ROWS
            grad_h = grad_w = None
            if in_loop:
                grad_h = torch.empty_like(hc) if ctx.needs_input_grad[0] else None
                grad_w = torch.zeros_like(wc) if ctx.needs_input_grad[1] else None
            for start in range(0, N, step):  # in cache: fp32 softmax, loss, and the logits' gradient over the logits
                rows = slice(start, min(start + step, N))
                chunk = logits[rows].float()  # fp32 logits: a view, turned in place; else an fp32 copy
                picked = chunk.gather(1, t_safe[rows]).squeeze(1)  # before the chunk is overwritten
                # one exp per logit: exp(x - max) gives both log Z (from its row sums) and the softmax
                top = chunk.amax(dim=-1, keepdim=True)
                e = chunk.sub_(top)
                e = e.mul_(LOG2E).exp2_() if h.device.type == "cpu" and exp2_is_faster() else e.exp_()
                z = e.sum(dim=-1)  # (n,) Z / exp(max)
                lse = top.squeeze(1) + z.log()
                row_loss = lse - picked
                if z_loss:
                    row_loss = row_loss + z_loss * lse.square()
                kept = keep[rows] * scale  # 1 / count on counted rows, 0 on ignored ones
                total += (row_loss * keep[rows]).sum()
                if not need_grad:
                    continue
                # d loss / d logits = (softmax x (1 + 2 z lse) - one-hot) / count: one pass over the chunk
                factor = kept / z
                if z_loss:
                    factor = factor * (1 + 2 * z_loss * lse)
                g = e.mul_(factor.unsqueeze(1)).scatter_add_(1, t_safe[rows], -kept.unsqueeze(1))
                if in_loop:
                    if grad_h is not None:
                        torch.mm(g, wc, out=grad_h[rows])
                    if grad_w is not None:
                        grad_w.addmm_(g.t(), hc[rows])
                elif chunk.dtype != logits.dtype:  # a copy: the gradient goes back into the logits' buffer
                    logits[rows] = g
            if need_grad and not in_loop:
                if ctx.needs_input_grad[0]:
                    grad_h = logits @ wc  # (N, C)
                if ctx.needs_input_grad[1]:
                    grad_w = logits.t() @ hc  # (V, C)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = (grad_h * grad_out).to(ctx.h_dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_out).to(ctx.w_dtype)
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of `h @ weight^T` against `targets` over the targets that are not
    IGNORE_INDEX, plus `z_loss` times the mean log(Z)^2 (as `budgetlm.model.lm_loss`).

    h (..., C) hidden states after the final norm; weight (V, C); targets (...) matching h's leading dims."""
    # Grad mode is read here: inside `forward` it is always off, and `needs_input_grad` says only whether the
    # inputs require grad, which the weights do under `torch.no_grad()` too. Evaluation would otherwise make
    # the gradients as well: two more matmuls the size of the logits' and a pass over them, per batch.
    grad_mode = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(h.reshape(-1, h.size(-1)), weight, targets.reshape(-1), float(z_loss), grad_mode)
