"""Transformer building blocks shared by the language model and the driving model.

Shapes: B batch, T sequence length, C model width, H query heads, K key/value
heads (grouped-query attention: each KV head serves H/K query heads), D head dim.

The reference computation, read top to bottom; incremental decoding (the KV cache, its
kernels and CPU / compiler heuristics) lives in nn/decode.py.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exaflop.nn.cpu_ops import _rmsnorm_kernel_dtype, _RMSNormCPU, _SwiGLUCPU, swiglu_kernel
from exaflop.nn.kernels import trace_constant
from exaflop.nn.moe import MoE

if TYPE_CHECKING:
    from exaflop.nn.decode import CacheView


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        out_dtype = _rmsnorm_kernel_dtype(x, None, self.weight)
        if out_dtype is not None:
            return _RMSNormCPU.apply(x, None, self.weight, self.eps, out_dtype)
        # Normalise in fp32 so bf16 activations do not lose the mean-square precision.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = x32 * self.weight.float()
        # Under autocast, hand the next matmuls their compute dtype once here; otherwise
        # each of q/k/v (and gate/up) would cast the same fp32 activation separately.
        if torch.is_autocast_enabled(x.device.type):
            return out.to(torch.get_autocast_dtype(x.device.type))
        return out.type_as(x)

    def add_forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(x + y, self(x + y)): a residual add and the norm after it, in one pass while training
        on CPU (nn/csrc/rmsnorm.cpp)."""
        out_dtype = _rmsnorm_kernel_dtype(x, y, self.weight)
        if out_dtype is not None:
            return _RMSNormCPU.apply(x, y, self.weight, self.eps, out_dtype)
        s = x + y
        return s, self(s)


def rope_tables(head_dim: int, max_len: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos/sin tables of shape (max_len, head_dim/2) for rotary position embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (first half, second half) of the head dim; x: (B, H, T, D), cos/sin: (T, D/2).

    The half-split layout (not interleaved pairs) matches Hugging Face Llama, so
    weights export without permuting q/k.
    """
    d2 = x.shape[-1] // 2
    x1, x2 = x[..., :d2].float(), x[..., d2:].float()
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, n_kv_head: int, causal: bool = True, dropout: float = 0.0):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, dim // n_head
        self.causal, self.dropout = causal, dropout
        self.wq = Linear(dim, n_head * self.head_dim, bias=False)
        self.wk = Linear(dim, n_kv_head * self.head_dim, bias=False)
        self.wv = Linear(dim, n_kv_head * self.head_dim, bias=False)
        self.wo = Linear(n_head * self.head_dim, dim, bias=False)
        self.fused = None  # wq/wk/wv as one packed matmul, for inference only (nn/packed.py)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, kv: CacheView | None = None) -> Tensor:
        """x (B, T, C). `kv`: this layer's view of a KV cache when decoding (nn/decode.py):
        the chunk's keys and values are appended there and attention covers the prefix."""
        B, T, _ = x.shape
        # -1 instead of n_head: under tensor parallelism each rank holds a slice of the heads.
        # Fused for inference only (nn/packed.py): while training, one matmul over the stacked
        # weights measured slower than three (the stacking and the gradient split cost more).
        q, k, v = self.fused(x) if self.fused is not None else (self.wq(x), self.wk(x), self.wv(x))
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)
        if kv is None:
            y = attend(q, k, v, None, self.causal, self.dropout if self.training else 0.0, rope)
        else:
            y = kv.attend(q, k, v, rope)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.wo(y)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, dropout: float = 0.0,
           rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Scaled dot-product attention; q (B, H, T, D), k/v (B, K, S, D) with K dividing H. `rope`:
    cos/sin tables (positions 0 .. T-1) to rotate q and k with first (apply_rope)."""
    if causal and mask is None and dropout == 0.0 and _amx_applies(q, k, v, rope):
        # GQA included: the kernel maps heads to key heads; RoPE too, as it lays out each head.
        return _CausalAttentionAMX.apply(q, k, v, *(rope or (None, None)))
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # GQA: share each KV head across its group of query heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    B, H, T, _ = q.shape
    if (causal and mask is None and dropout == 0.0 and q.device.type == "cpu" and type(q) is torch.Tensor
            and q.requires_grad and k.shape[2] == T and B * H * T * T <= _MATMUL_BACKWARD_MAX_SCORES
            and torch.compiler.is_compiling()):
        return _CausalAttentionCPU.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                          is_causal=causal and mask is None)


# Compiled training on CPU: causal attention's backward as matmuls whose elementwise work the
# compiler fuses. PyTorch's CPU flash-attention backward runs at ~1/7 of its forward's rate; this
# one is 2x faster per layer (lm-small shapes, AMX, 2 threads, compiled: bf16 7.5 vs 15.6 ms
# forward + backward; fp32 13.7 vs 15.3), with the same or smaller error against fp64. Eager, the
# unfused elementwise passes make it slower than flash, so eager keeps flash. The backward holds
# one (B, H, T, T) fp32 score tensor: above this many elements, flash (bounded memory).
_MATMUL_BACKWARD_MAX_SCORES = 1 << 25


class _CausalAttentionCPU(torch.autograd.Function):
    """Causal attention: flash forward (keeping its log-sum-exp), backward by recomputing the
    probabilities from it. q/k/v (B, H, T, D) with as many key as query heads."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, out, lse = ctx.saved_tensors
        T, D = q.shape[-2], q.shape[-1]
        scale = D ** -0.5
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        # p = softmax(q k^T * scale) from the forward's log-sum-exp, without another reduction.
        p = (torch.matmul(q, k.transpose(-1, -2)).float() * scale - lse[..., None]).exp().masked_fill(future, 0)
        dv = torch.matmul(p.to(grad.dtype).transpose(-1, -2), grad)
        dp = torch.matmul(grad, v.transpose(-1, -2)).float()
        delta = (grad.float() * out.float()).sum(-1, keepdim=True)  # rowsum(p * dp) = rowsum(dO * O)
        ds = (p * (dp - delta) * scale).to(q.dtype)
        return torch.matmul(ds, k), torch.matmul(ds.transpose(-1, -2), q), dv


def _amx_allowed(kind: str) -> bool:
    """exaflop's AMX kernels (nn/csrc/*_amx.cpp) may run: the kernels build (AVX-512 capability),
    the CPU has AMX and the process may use it, and neither EXAFLOP_AMX=0, EXAFLOP_AMX_<KIND>=0
    nor a ONEDNN_MAX_CPU_ISA without AMX (a run capped below it) says otherwise."""
    if os.environ.get("EXAFLOP_AMX", "1") == "0" or os.environ.get(f"EXAFLOP_AMX_{kind}", "1") == "0":
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa and isa not in ("ALL", "DEFAULT") and "AMX" not in isa:
        return False
    from exaflop.nn.kernels import cpu_has, cpu_kernels

    return cpu_has("amx_bf16") and cpu_kernels() and bool(torch.ops.exaflop.attention_amx_available())


# A compiled step asks once, at trace time (building the kernels there if needed), and keeps the answer.
@trace_constant
def amx_attention() -> bool:
    """Whether causal bf16 attention runs on exaflop's AMX kernel (nn/csrc/attention_amx.cpp)."""
    return _amx_allowed("ATTENTION")


@trace_constant
def amx_wgrad() -> bool:
    """Whether bf16 linear layers take their weight gradient from exaflop's AMX kernel
    (nn/csrc/wgrad_amx.cpp) while training."""
    return _amx_allowed("WGRAD")


def _amx_applies(q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor] | None) -> bool:
    T, D = q.shape[-2], q.shape[-1]
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.dim() == 4
            and type(q) is torch.Tensor and k.shape[2] == T and T % 32 == 0 and D % 32 == 0 and D <= 256
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and (rope is None or all(t.dtype == torch.float32 and t.is_contiguous() and t.shape == (T, D // 2)
                                     for t in rope))
            and amx_attention())


class _CausalAttentionAMX(torch.autograd.Function):
    """Causal bf16 attention on AMX tiles, forward and backward (nn/csrc/attention_amx.cpp):
    lm-small's 48 heads of 256 x 64, forward + backward 2.7-2.8 ms a layer against flash's 19-21
    (eager) and the compiled matmul backward's 10 (AMX CPU, 2 threads). q (B, H, T, D), k/v
    (B, K, T, D) with K dividing H; outputs and gradients come in the memory of (B, T, H, D), the
    layout the projections around attention read and write. With RoPE tables (cos, sin: (T, D/2)
    fp32), q and k are rotated inside the kernel and their gradients rotated back (no gradient for
    the tables: they are buffers)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, cos: Tensor | None, sin: Tensor | None) -> Tensor:
        scale = q.shape[-1] ** -0.5
        out, lse = torch.ops.exaflop.attention_amx_fwd(q, k, v, scale, cos, sin)
        ctx.save_for_backward(q, k, v, out, lse, cos, sin)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse, cos, sin = ctx.saved_tensors
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        return (*torch.ops.exaflop.attention_amx_bwd(grad, q, k, v, out, lse, ctx.scale, cos, sin), None, None)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose weight gradient, while training in bf16 on
    an AMX CPU, comes from exaflop's kernel (nn/csrc/wgrad_amx.cpp) in fp32 — the fp32 master
    weight's dtype, so no bf16 gradient is cast back. lm-small's products (2048 tokens, 2 threads):
    384 x 384 0.45-0.49 vs 0.73-0.75 ms for oneDNN's product and the cast, 1024 x 384 0.98-1.01 vs
    1.41-1.53. Forward and input gradient stay on oneDNN (~2 TFLOP/s there; exaflop's own tile
    kernel for them measured slower). Elsewhere: nn.Linear."""

    def forward(self, x: Tensor) -> Tensor:
        if self.bias is None and _wgrad_applies(x, self.weight):
            return _LinearAMX.apply(x, self.weight)
        return F.linear(x, self.weight, self.bias)


def _wgrad_applies(x: Tensor, w: Tensor) -> bool:
    if not (torch.is_grad_enabled() and w.requires_grad and x.device.type == "cpu" and type(w.data) is torch.Tensor):
        return False
    if torch.is_autocast_enabled("cpu"):
        compute = torch.get_autocast_dtype("cpu")
    else:
        compute = x.dtype if x.dtype == w.dtype else None
    N, K = w.shape
    return (compute == torch.bfloat16 and N % 32 == 0 and K % 32 == 0 and x.shape[-1] == K
            and (x.numel() // max(K, 1)) % 32 == 0 and amx_wgrad())


class _LinearAMX(torch.autograd.Function):
    """y = x w^T in bf16 (oneDNN); backward dx = g w (oneDNN), dw = g^T x (exaflop's AMX kernel, fp32)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        xc, wc = x.to(torch.bfloat16), w.to(torch.bfloat16)  # autocast's casts, made here
        ctx.save_for_backward(xc, wc)
        ctx.dtypes = (x.dtype, w.dtype)
        return F.linear(xc, wc)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        xc, wc = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        if g.stride(-1) != 1:
            g = g.contiguous()
        dx = (g @ wc).view(*grad.shape[:-1], wc.shape[1]) if ctx.needs_input_grad[0] else None
        dw = torch.ops.exaflop.linear_wgrad_amx(g, xc.reshape(-1, xc.shape[-1])) if ctx.needs_input_grad[1] else None
        return (dx.to(ctx.dtypes[0]) if dx is not None else None,
                dw.to(ctx.dtypes[1]) if dw is not None else None)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)  # gate
        self.w3 = Linear(dim, hidden, bias=False)  # up
        self.w2 = Linear(hidden, dim, bias=False)  # down
        self.fused = None  # w1/w3 as one packed matmul, for inference only (nn/packed.py)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.fused(x) if self.fused is not None else (self.w1(x), self.w3(x))
        if (gate.requires_grad and gate.dtype == up.dtype == torch.bfloat16 and gate.device.type == "cpu"
                and type(gate) is torch.Tensor and gate.is_contiguous() and up.is_contiguous() and swiglu_kernel()):
            return self.w2(_SwiGLUCPU.apply(gate, up))
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, n_head: int, n_kv_head: int, d_ff: int, causal: bool = True,
                 norm_eps: float = 1e-5, dropout: float = 0.0, n_experts: int = 1, top_k: int = 1,
                 capacity_factor: float = 0.0, aux_coef: float = 0.0):
        super().__init__()
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.attn = Attention(dim, n_head, n_kv_head, causal=causal, dropout=dropout)
        self.mlp_norm = RMSNorm(dim, norm_eps)
        self.mlp = (MoE(dim, d_ff, n_experts, top_k, capacity_factor, aux_coef) if n_experts > 1
                    else SwiGLU(dim, d_ff))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, kv: CacheView | None = None) -> Tensor:
        if self.training and self.drop.p > 0:
            x = x + self.drop(self.attn(self.attn_norm(x), rope, kv))
            return x + self.drop(self.mlp(self.mlp_norm(x)))
        # Without dropout, no module call for it: decoding runs this per layer per token.
        x, h = self.mlp_norm.add_forward(x, self.attn(self.attn_norm(x), rope, kv))
        return x + self.mlp(h)
