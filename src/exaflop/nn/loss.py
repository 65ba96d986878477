"""Fused LM head + cross-entropy, computed in row chunks.

The plain path materialises fp32 logits for every token (batch·seq × vocab: 67 MB a
step for lm-small) and walks them three more times in log-softmax forward/backward.
Here each chunk of rows gets its logits, loss and gradients at once, and only the
gradients w.r.t. the hidden states and the head weight are kept: ~10% more training
throughput on CPU for a vocab of 8192, and a much smaller peak memory. On CPU a chunk's loss
and logit gradient come from exaflop's kernel (csrc/cross_entropy.cpp: one pass per row,
written over the logits) where it builds: 4-10% off a whole lm-small step.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from exaflop.nn.kernels import trace_constant

# Up to this many logits (rows x vocabulary), every chunk's logit gradient is kept (compute dtype,
# 64 MB in bf16) so the head's weight gradient is one matmul at the end.
_WHOLE_GRAD_ELEMENTS = 1 << 25


# A compiled step asks once, at trace time (building the kernels there if needed), and keeps the
# answer: the lock in cpu_kernels() is nothing to trace through.
@trace_constant
def xent_kernel() -> bool:
    """Whether exaflop's CPU cross-entropy kernel is used (nn/kernels.py builds it with the others
    on first use, ~20 s once per machine; EXAFLOP_XENT_KERNEL=0 keeps the PyTorch path)."""
    if os.environ.get("EXAFLOP_XENT_KERNEL", "1") == "0":
        return False
    from exaflop.nn.kernels import cpu_kernels

    return cpu_kernels()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, row_weights: Tensor,
                chunk: int, fused: bool) -> Tensor:
        # hidden (N, C) in the compute dtype, weight (V, C) as stored (fp32 master weights),
        # targets (N,), row_weights (N,) summing to the loss scale.
        w = weight.to(hidden.dtype)  # the compute copy, once per call (no-op in fp32)
        N, V = hidden.shape[0], w.shape[0]
        grad_hidden = torch.empty_like(hidden)  # eager: filled chunk by chunk
        # The weight gradient is one matmul over every chunk's logit gradients when they fit in
        # _WHOLE_GRAD_ELEMENTS (rounded to the compute dtype once, as autocast's own backward
        # does); a running fp32 sum of per-chunk products otherwise (mixed-dtype accumulation
        # measured ~5 ms a step for lm-small: a cast and an add over the whole head per chunk).
        whole = N * V <= _WHOLE_GRAD_ELEMENTS
        # Eager writes into preallocated buffers (no copies); compiled, the same computation is
        # written functionally (per-chunk results joined once), which the compiler fuses - writes
        # into slices of a buffer would become a copy of the whole buffer per chunk there.
        compiling = torch.compiler.is_compiling()
        g_buf = None if compiling else torch.empty((N if whole else min(chunk, N), V), dtype=hidden.dtype,
                                                   device=hidden.device)
        grad_weight = None if whole else torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        gs, ghs = [], []
        for s in range(0, N, chunk):
            h, t, rw = hidden[s:s + chunk], targets[s:s + chunk], row_weights[s:s + chunk]
            n = len(t)
            if fused:
                # exaflop's kernel (csrc/cross_entropy.cpp): each row's loss and gradient in one
                # pass over the row, held in fp32 close to the core, written in the compute dtype.
                # In place: the logits become their gradient (compiled, a fresh output per chunk
                # measured 2x slower: its pages are faulted in on every call).
                if compiling:
                    g = h @ w.t()
                    chunk_loss = torch.ops.exaflop.xent_rows_(g, t, rw)
                    ghs.append(g @ w)
                else:
                    g = torch.matmul(h, w.t(), out=g_buf[s:s + n] if whole else g_buf[:n])
                    chunk_loss = torch.ops.exaflop.xent_rows_(g, t, rw)
                    torch.matmul(g, w, out=grad_hidden[s:s + n])
                total += chunk_loss
            else:
                # Log-probabilities straight from the compute-dtype logits: the upcast to fp32 is fused
                # into log_softmax, so the chunk's fp32 logits are never written separately.
                logp = torch.log_softmax(h @ w.t(), dim=-1, dtype=torch.float32)  # (n, V)
                rows = torch.arange(n, device=t.device)
                total += (-logp[rows, t] * rw).sum()
                # d(nll)/d(logits) = softmax - onehot, scaled by each row's weight: built in place in
                # the log-probabilities' buffer; eager, the scaling writes the compute dtype in one pass.
                p = logp.exp_()
                p[rows, t] -= 1
                if compiling:
                    g = (p * rw[:, None]).to(hidden.dtype)
                    ghs.append(g @ w)
                else:
                    g = torch.mul(p, rw[:, None], out=g_buf[s:s + n] if whole else g_buf[:n])
                    torch.matmul(g, w, out=grad_hidden[s:s + n])
            if whole:
                gs.append(g)
            else:
                grad_weight += g.t() @ h
        if compiling:
            grad_hidden = torch.cat(ghs)
        if whole:
            g_all = torch.cat(gs) if compiling else g_buf
            if hidden.dtype == torch.bfloat16 and _amx_wgrad_fits(g_all, hidden):
                # exaflop's AMX kernel, straight to fp32 (nn/layers.py's Linear uses it too): the
                # head's 8192 x 384 gradient from 2048 rows 8.9 vs 14.6 ms for oneDNN's product + cast.
                grad_weight = torch.ops.exaflop.linear_wgrad_amx(g_all, hidden)
            else:
                grad_weight = g_all.t() @ hidden
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_out, (grad_weight * grad_out), None, None, None, None


def _amx_wgrad_fits(g: Tensor, x: Tensor) -> bool:
    from exaflop.nn.layers import amx_wgrad

    return (g.device.type == "cpu" and g.shape[0] % 32 == 0 and g.shape[1] % 32 == 0 and x.shape[1] % 32 == 0
            and g.stride(1) == 1 and x.stride(1) == 1 and amx_wgrad())


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor | None = None,
                         chunk: int | None = None, kernel: bool | None = None) -> Tensor:
    """Mean (or mask-weighted mean) cross-entropy of `hidden @ weight.T` against `targets`.

    hidden: (..., C) in the compute dtype; weight: (V, C); targets: (...,). Gradients are
    computed during the forward pass, so use it only when a backward will follow. `chunk`
    rows at a time (None: chosen here). PyTorch's path: 256, measured fastest for lm-small
    (vocab 8192; AMX, 2 threads: 60 ms per step vs 69 at 512 and 98 at 64) - small enough that
    a chunk's fp32 log-probabilities stay close to the core across their passes. The kernel
    reads and writes each row once, so there the fewest, largest matmuls win: every row in one
    chunk while all the logit gradients are kept anyway (_WHOLE_GRAD_ELEMENTS), which measured
    the head + loss 35 vs 43 ms (lm-small, AMX bf16, 2 threads, compiled; eager 37 vs 46).
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if mask is None:
        rw = torch.full((h.shape[0],), 1.0 / h.shape[0], device=h.device)
    else:
        m = mask.reshape(-1).float()
        rw = m / m.sum().clamp(min=1)
    # kernel: exaflop's CPU kernel for each chunk's loss and gradient where it is built (False: never).
    fused = h.device.type == "cpu" and kernel is not False and xent_kernel()
    if chunk is None:
        whole = fused and h.shape[0] * weight.shape[0] <= _WHOLE_GRAD_ELEMENTS
        chunk = max(h.shape[0], 1) if whole else 256
    return _ChunkedLinearCrossEntropy.apply(h, weight, t, rw, chunk, fused)
