"""Autograd wrappers of exaflop's elementwise CPU kernels for training (nn/csrc/rmsnorm.cpp,
swiglu.cpp) and the embedding's gradient: what nn/layers.py's RMSNorm, SwiGLU and the language
model's token table call where they apply, each with its own switch and a PyTorch fallback in
the caller. The AMX matmul-shaped kernels (attention, weight gradients) stay beside the layers
that use them in nn/layers.py."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exaflop.nn.kernels import trace_constant


def rmsnorm_kernel() -> bool:
    """Whether training on CPU takes RMSNorm (and the residual add before it) from exaflop's kernel
    (nn/csrc/rmsnorm.cpp; EXAFLOP_RMSNORM_KERNEL=0 keeps PyTorch's)."""
    if os.environ.get("EXAFLOP_RMSNORM_KERNEL", "1") == "0":
        return False
    from exaflop.nn.kernels import cpu_kernels

    return cpu_kernels()


def _rmsnorm_kernel_dtype(x: Tensor, y: Tensor | None, w: Tensor) -> torch.dtype | None:
    """The output dtype where the kernel applies (eager training on CPU, an fp32 residual stream
    and weight, a bf16 / fp32 branch), else None. Eager, it replaces ~8 passes of separate ops per
    norm: lm-small bf16 steps 8,430-8,750 vs 7,170-7,520 tokens/s (AMX CPU, 2 threads). Compiled,
    it measured slower (9,370-9,960 vs 10,010-10,150): the residual adds, casts and gradient sums
    the compiler fuses into its norm kernels become passes of their own around an opaque op."""
    if not (torch.is_grad_enabled() and not torch.compiler.is_compiling() and x.device.type == "cpu"
            and type(x) is torch.Tensor
            and type(w.data) is torch.Tensor and x.dtype == w.dtype == torch.float32 and x.is_contiguous()):
        return None
    if y is not None and not (type(y) is torch.Tensor and y.shape == x.shape and y.is_contiguous()
                              and y.dtype in (torch.float32, torch.bfloat16)):
        return None
    out = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    return out if out in (torch.float32, torch.bfloat16) and rmsnorm_kernel() else None


class _RMSNormCPU(torch.autograd.Function):
    """RMSNorm (after adding y to x, when given) forward and backward in one pass each
    (nn/csrc/rmsnorm.cpp). x, y (..., C); returns the norm's output, or (x + y, the norm's output)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor | None, w: Tensor, eps: float, out_dtype: torch.dtype):
        C = x.shape[-1]
        s, h, rstd = torch.ops.exaflop.rmsnorm_fwd(x.view(-1, C), None if y is None else y.view(-1, C), w, eps,
                                                   out_dtype)
        s = x if y is None else s.view(x.shape)
        ctx.save_for_backward(s, rstd, w)
        ctx.low = torch.bfloat16 if y is not None and y.dtype == torch.bfloat16 else torch.float32
        ctx.has_y = y is not None
        h = h.view(x.shape)
        return (s, h) if y is not None else h

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        s, rstd, w = ctx.saved_tensors
        ds_out, dh = grads if ctx.has_y else (None, grads[0])
        C = s.shape[-1]
        if dh is None:
            dh = torch.zeros_like(s)
        dres = None if ds_out is None else ds_out.reshape(-1, C).contiguous()
        ds, ds_low, dw = torch.ops.exaflop.rmsnorm_bwd(dh.reshape(-1, C).contiguous(), s.view(-1, C), rstd, w,
                                                       dres, ctx.low)
        ds = ds.view(s.shape)
        dy = (ds_low.view(s.shape) if ctx.low == torch.bfloat16 else ds) if ctx.has_y else None
        return ds, dy, dw, None, None


def embedding(idx: Tensor, table: nn.Embedding) -> Tensor:
    """table(idx). In a compiled CPU training step the weight gradient comes from a kernel kept
    opaque to the compiler (whose decomposition scatters the rows with an atomic add per element:
    lm-small's 2048 x 384 into 8192 rows measured ~3.8 ms in the step against PyTorch's CPU kernel's
    ~1.2; AMX CPU, 2 threads): exaflop's (csrc/embedding.cpp) where built, else PyTorch's. A table
    with hooks (a parallel plan's) is called as is."""
    w = table.weight
    if (torch.compiler.is_compiling() and torch.is_grad_enabled() and w.requires_grad and w.device.type == "cpu"
            and type(w.data) is torch.Tensor and table.padding_idx is None and table.max_norm is None
            and not table.scale_grad_by_freq and not table.sparse
            and not (table._forward_hooks or table._forward_pre_hooks)):
        return _EmbeddingCPU.apply(idx, w)
    return table(idx)


@torch.library.custom_op("exaflop::embedding_grad", mutates_args=())
def _embedding_grad(grad: Tensor, idx: Tensor, rows: int) -> Tensor:
    from exaflop.nn.kernels import cpu_kernels

    if grad.dtype == torch.float32 and cpu_kernels():
        # exaflop's kernel (csrc/embedding.cpp): each thread zeroes its share of the rows and adds
        # the tokens landing there; 0.37 vs 0.55 ms alone for lm-small, the same sums.
        return torch.ops.exaflop.embedding_grad_rows(grad, idx, rows)
    return torch.ops.aten.embedding_dense_backward(grad, idx, rows, -1, False)


@_embedding_grad.register_fake
def _(grad: Tensor, idx: Tensor, rows: int) -> Tensor:
    return grad.new_empty((rows, grad.shape[-1]))


class _EmbeddingCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.rows = weight.shape[0]
        return F.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:
        (idx,) = ctx.saved_tensors
        C = grad.shape[-1]
        return None, _embedding_grad(grad.reshape(-1, C).contiguous(), idx.reshape(-1), ctx.rows)


@trace_constant
def swiglu_kernel() -> bool:
    """Whether bf16 training on CPU takes SwiGLU's elementwise part from exaflop's kernel
    (nn/csrc/swiglu.cpp; EXAFLOP_SWIGLU_KERNEL=0 keeps PyTorch's)."""
    if os.environ.get("EXAFLOP_SWIGLU_KERNEL", "1") == "0":
        return False
    from exaflop.nn.kernels import cpu_kernels

    return cpu_kernels()


class _SwiGLUCPU(torch.autograd.Function):
    """silu(gate) * up in one pass, its backward in one (nn/csrc/swiglu.cpp): lm-small's 2048 x 1024
    in bf16, 0.66 + 0.92 ms alone; in a compiled step (cold data) 1.09 + 1.70 against inductor's
    1.39 + 1.44 (AMX CPU, 2 threads); eager steps +2-6%. Computed in fp32 and rounded once
    (PyTorch rounds silu's output to bf16 before the product)."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return torch.ops.exaflop.swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        gate, up = ctx.saved_tensors
        return tuple(torch.ops.exaflop.swiglu_bwd(grad.contiguous(), gate, up))
