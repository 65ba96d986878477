"""Inference weights: projections that read the same input fused into one matmul, and bf16
weights reordered once into oneDNN's blocked layout.

Why (measured on an AMX CPU, 2 threads, `lm-124m` shapes): `F.linear` in bf16 reorders its
weight into oneDNN's layout on every call, which costs as much as the product itself at
decode's small batches; a weight reordered once (`mkldnn._reorder_linear_weight`, what
inductor's freezing does) runs the same kernel ~2x faster and gives bit-identical results.
Fusing q/k/v (and the SwiGLU gate/up pair) turns 5 matmuls per layer into 2, also
bit-identical where the BLAS computes each output column the same whichever matrix it sits in
(oneDNN in bf16, MKL's AVX-512 fp32 kernels); MKL's AVX2 fp32 kernels block the reduction by
the matrix's width, so there fused columns differ by a few ulps (tests/test_fast_decode.py).

One row (decoding a single sequence) is a pass over the weights, bound by how fast each core
streams them, and oneDNN's kernel is not at that limit there: where the CPU has AVX512-BF16,
bf16 matrices also keep their plain row-major copy for exaflop's own single-row kernel
(csrc/linear_row.cpp, ~0.7x oneDNN's time over an lm-124m step's matrices), at the cost of
holding the bf16 weights twice. It sums each product in another order than oneDNN, so one-row
outputs can differ from a batch's in the last bf16 bit; everything else here is bit-identical.
Nothing here changes what a model computes beyond that, only how fast; a packed model is for
inference (serving), not for training or saving.

fp32 where PyTorch dispatches to AVX2 (what `auto` serves on CPUs without fast bf16): a decode
step's rows (one per running sequence) go through exaflop's own kernel (csrc/linear_f32.cpp),
which reads each weight row once for all of them; MKL's AVX2 sgemm at those sizes neither
streams the weights at the memory's speed nor keeps the FMAs busy (lm-124m's matrices, 2
threads: 0.53-0.69x MKL's time at 2-8 rows, 0.90-0.94x at 16-32, equal at one). It computes
each output as one dot product in a fixed order, so a sequence decodes bit for bit the same
alone or batched, and its fused columns equal the unfused ones. The LM head's rows (one per
sequence, in prefill too) take it as well; prompts' other products stay on MKL. It differs
from MKL's product of the same row by a few ulps.

The one exception is opt-in: `quantize="int8"` keeps each matrix as int8 with one scale per
output row (weight-only, symmetric), half the bytes of bf16. Decoding a few rows is bound by
reading the weights, and `aten._weight_int8pack_mm` (the CPU kernel torchao's int8
weight-only path calls) reads half as much: 1.3-1.8x faster than packed bf16 at one row with
the weights out of cache (lm-124m shapes, AMX CPU, 2 threads); at exactly one row exaflop's
own int8 kernel (csrc/linear_row.cpp, where the CPU has AVX-512) streams the same matrix in
0.66-0.71x that kernel's time. `_weight_int8pack_mm` does not use the matrix units, so from
`INT8_KERNEL_ROWS` rows on (larger decode batches, every prefill) the int8 matrix is widened
to the activations' dtype for a plain matmul instead.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from exaflop.nn.kernels import cpu_has, cpu_kernels


def _pack(weight: Tensor) -> Tensor | None:
    """oneDNN's blocked copy of a bf16 CPU weight, or None where that does not apply or the CPU
    lacks the instructions for it (oneDNN refuses bf16 reorders below AVX-512 BW/VL/DQ)."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    except RuntimeError:
        return None


def row_kernel() -> bool:
    """Whether the single-row bf16 kernel runs here: a CPU with AVX512-BF16, PyTorch dispatching
    to AVX-512 (not capped below it), and exaflop's kernels built (nn/kernels.py)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and cpu_has("avx512_bf16") and cpu_kernels()


def int8_row_kernel() -> bool:
    """Whether the one-row int8 kernel runs here: PyTorch dispatching to AVX-512 on a CPU with
    AVX-512 BW, and exaflop's kernels built."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and cpu_has("avx512bw") and cpu_kernels()


def f32_rows_kernel() -> bool:
    """Whether the fp32 decode kernel runs here: PyTorch dispatching to AVX2 (the CPUs where
    `auto` serves fp32: no fast bf16) on a CPU with AVX2 + FMA, and exaflop's kernels built.
    At AVX-512, MKL's own fp32 kernels are faster from 16 rows and the kernel is not used."""
    return (torch.backends.cpu.get_cpu_capability() == "AVX2" and cpu_has("avx2") and cpu_has("fma")
            and cpu_kernels())


@torch.library.custom_op("exaflop::packed_linear", mutates_args=())
def _packed_linear(x: Tensor, packed: Tensor, out_features: int) -> Tensor:
    """The packed product as an opaque op for the compiler: inductor's own oneDNN lowering accepts
    only weights it packed itself (at freezing, which would bake one checkpoint's weights into the
    graph); this way a compiled step calls the same kernel on the weights it is given."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


@_packed_linear.register_fake
def _(x: Tensor, packed: Tensor, out_features: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


_lowered = False


def lower_packed_linear() -> bool:
    """Have inductor emit the packed product as a direct call of oneDNN's kernel instead of a
    call back into the Python op above; True when that is in place (idempotent).

    Why: the Python op costs ~14 us per call through the dispatcher, 49 calls per `lm-124m`
    decode step, and a compiled step with a C++ wrapper (`cpp_wrapper`, no Python between
    kernels) cannot call it without re-entering Python. Lowered to a fallback kernel of
    `mkldnn._linear_pointwise` itself, the C++ wrapper calls oneDNN directly: one decode row
    5.1-5.4 ms per token vs 6.4-6.7 ms (AMX CPU, 2 threads, bf16, measured alternately).
    Uses inductor's lowering registry, a private API: if it is not there, the Python op is
    what the compiler calls, slower but the same kernel and the same numbers."""
    global _lowered
    if _lowered:
        return True
    try:
        from torch._inductor.lowering import fallback_handler, register_lowering

        kernel = fallback_handler(torch.ops.mkldnn._linear_pointwise.default, add_to_fallback_set=False)

        @register_lowering(torch.ops.exaflop.packed_linear.default)
        def _lower(x, packed, out_features):  # noqa: ANN001, ANN202 — inductor IR nodes
            return kernel(x, packed, None, "none", [], "")
    except (ImportError, AttributeError, TypeError) as e:  # another torch: keep the Python op
        import logging

        logging.getLogger(__name__).info("packed linear not lowered for inductor (%s)", e)
        return False
    _lowered = True
    return True


QUANTIZE = ("none", "int8")
# Rows (tokens) from which the int8 matrix is widened for a matmul rather than read by
# `_weight_int8pack_mm` (lm-124m shapes, AMX CPU, 2 threads, weights out of cache: 2304x768 at
# 1 / 4 / 8 / 32 rows, int8 kernel 114 / 116 / 243 / 734 us, widened 352 / 277 / 269 / 327 us).
INT8_KERNEL_ROWS = 8


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """(q int8 (out, in), scale (out,) in w's dtype) with w ~= q * scale[:, None]: per output row,
    symmetric, the scale being the row's largest magnitude / 127 (a zero row gets scale 1)."""
    w32 = w.detach().float()
    amax = w32.abs().amax(1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).to(w.dtype)
    # Rounded against the scale as stored (bf16 here), so q * scale is the weight served.
    q = torch.round(w32 / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class PackedLinear(nn.Module):
    """A bias-free linear layer for inference over one or more stacked weights (out, in).

    `sizes` (when several linears are fused): the outputs are split back into them, so the
    caller gets a tuple as if it had called each linear. `quantize="int8"`: the weights are kept
    as int8 with per-row scales (see the module's docstring), the only mode that changes results.
    """

    def __init__(self, weights: list[Tensor], pack: bool = True, quantize: str = "none", single_row: bool = False):
        super().__init__()
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize={quantize!r}: expected one of {', '.join(QUANTIZE)}")
        w = torch.cat([x.detach() for x in weights]) if len(weights) > 1 else weights[0].detach()
        self.sizes = [x.shape[0] for x in weights]
        # Non-persistent buffers: derived copies no checkpoint should contain, which a compiled
        # step takes as inputs (so a hot-reloaded checkpoint of the same shape reuses its graph).
        # Packed once the model has its final dtype and device; not to be moved after.
        q, scale = quantize_int8(w) if quantize == "int8" else (None, None)
        self.register_buffer("qweight", q, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("packed", _pack(w) if pack and q is None else None, persistent=False)
        self.register_buffer("weight", None if self.packed is not None or q is not None else w, persistent=False)
        # The row-major copy for one-row products (see the module's docstring), next to the packed one.
        row = single_row and self.packed is not None and w.shape[1] % 32 == 0 and row_kernel()
        self.register_buffer("row", w.contiguous() if row else None, persistent=False)
        # int8: one row reads the same int8 matrix through exaflop's kernel (no copy needed).
        self.int8_row = q is not None and w.shape[1] % 64 == 0 and int8_row_kernel()
        # fp32 on AVX2: the decode step's rows through exaflop's kernel (see the module's docstring).
        self.f32_rows = (self.weight is not None and w.dtype == torch.float32 and w.device.type == "cpu"
                         and w.shape[1] % 8 == 0 and f32_rows_kernel())

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        if self.qweight is not None:
            y = self._int8(x)
        elif self.row is not None and x.numel() == x.shape[-1]:  # one row: a pass over the weights
            y = torch.ops.exaflop.linear_bf16_row(x, self.row)
        elif self.packed is not None and torch.compiler.is_dynamo_compiling():
            y = _packed_linear(x, self.packed, sum(self.sizes))
        elif self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        elif self.f32_rows and (x.dim() == 2 or x.shape[-2] == 1):
            # One row per sequence: a decode step (B, 1, C), or the LM head's (B, C) (one position per
            # row, in prefill too). Prompts' (B, T, C) stay on MKL.
            y = torch.ops.exaflop.linear_f32_rows(x, self.weight)
        else:
            y = torch.nn.functional.linear(x, self.weight)
        return y if len(self.sizes) == 1 else y.split(self.sizes, -1)

    def _int8(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] == 1 and self.int8_row:
            y = torch.ops.exaflop.linear_int8_row(x2, self.qweight, self.scale)
        elif x2.shape[0] < INT8_KERNEL_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scale)
        else:
            y = torch.nn.functional.linear(x2, self.qweight.to(x.dtype)) * self.scale
        return y.reshape(*x.shape[:-1], y.shape[-1])


# The row-major copies may take at most this share of the memory available when packing: a
# model whose bf16 weights are a large part of the machine's memory is served without them
# (one-row decoding then runs on oneDNN, ~1.3x slower per step) rather than risk running out.
ROW_COPY_MEMORY_SHARE = 0.25


def _copies_fit(model: nn.Module) -> bool:
    need = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 2)
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return True  # unknown (not Linux): as on a machine with room
    if need > ROW_COPY_MEMORY_SHARE * avail:
        import logging

        logging.getLogger(__name__).info(
            "one-row bf16 kernel off: its weight copies (%.1f GB) would take more than %d%% of the "
            "memory available (%.1f GB)", need / 1e9, ROW_COPY_MEMORY_SHARE * 100, avail / 1e9)
        return False
    return True


def pack_for_inference(model: nn.Module, pack: bool = True, quantize: str = "none",
                       single_row: bool | None = None) -> nn.Module:
    """Fuse and pack `model`'s linear layers in place (the Attention and SwiGLU of nn/layers.py, the
    LM head); returns the model. The original weights are released, except where a module still
    needs them (a tied embedding). Call after the final `.to(device, dtype)`. `quantize="int8"`:
    those matrices become int8 weight-only (changes results; see the module's docstring).
    `single_row`: keep bf16 matrices' row-major copies for the single-row kernel (None: where
    it runs, `row_kernel()`, and the copies take at most ROW_COPY_MEMORY_SHARE of the memory
    available)."""
    from exaflop.nn.layers import Attention, SwiGLU

    if single_row is None:  # asked only of a bf16 CPU model: the first ask builds the kernels
        w = next(model.parameters(), None)
        single_row = (pack and quantize == "none" and w is not None and w.dtype == torch.bfloat16
                      and w.device.type == "cpu" and row_kernel() and _copies_fit(model))
    kw = {"pack": pack, "quantize": quantize, "single_row": single_row}

    for m in list(model.modules()):
        if isinstance(m, Attention) and m.fused is None:
            m.fused = PackedLinear([m.wq.weight, m.wk.weight, m.wv.weight], **kw)
            m.wo = PackedLinear([m.wo.weight], **kw)
            del m.wq, m.wk, m.wv
        elif isinstance(m, SwiGLU) and m.fused is None:
            m.fused = PackedLinear([m.w1.weight, m.w3.weight], **kw)
            m.w2 = PackedLinear([m.w2.weight], **kw)
            del m.w1, m.w3
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        model.lm_head = PackedLinear([head.weight], **kw)  # a tied embedding keeps its own reference
    model.packed_for_inference = True
    model.quantized = quantize
    return model
