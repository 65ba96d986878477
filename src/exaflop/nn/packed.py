"""Inference weights: projections that read the same input fused into one matmul, and bf16
weights reordered once into oneDNN's blocked layout.

Why (measured on an AMX CPU, 2 threads, `lm-124m` shapes): `F.linear` in bf16 reorders its
weight into oneDNN's layout on every call, which costs as much as the product itself at
decode's small batches; a weight reordered once (`mkldnn._reorder_linear_weight`, what
inductor's freezing does) runs the same kernel ~2x faster and gives bit-identical results.
Fusing q/k/v (and the SwiGLU gate/up pair) turns 5 matmuls per layer into 2, also
bit-identical: each output column is the same dot product whichever matrix it sits in.
Nothing here changes what a model computes, only how fast; a packed model is for inference
(serving), not for training or saving.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _pack(weight: Tensor) -> Tensor | None:
    """oneDNN's blocked copy of a bf16 CPU weight, or None where that does not apply or the CPU
    lacks the instructions for it (oneDNN refuses bf16 reorders below AVX-512 BW/VL/DQ)."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    except RuntimeError:
        return None


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


class PackedLinear(nn.Module):
    """A bias-free linear layer for inference over one or more stacked weights (out, in).

    `sizes` (when several linears are fused): the outputs are split back into them, so the
    caller gets a tuple as if it had called each linear.
    """

    def __init__(self, weights: list[Tensor], pack: bool = True):
        super().__init__()
        w = torch.cat([x.detach() for x in weights]) if len(weights) > 1 else weights[0].detach()
        self.sizes = [x.shape[0] for x in weights]
        # Non-persistent buffers: derived copies no checkpoint should contain, which a compiled
        # step takes as inputs (so a hot-reloaded checkpoint of the same shape reuses its graph).
        # Packed once the model has its final dtype and device; not to be moved after.
        self.register_buffer("packed", _pack(w) if pack else None, persistent=False)
        self.register_buffer("weight", None if self.packed is not None else w, persistent=False)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        if self.packed is not None and torch.compiler.is_compiling():
            y = _packed_linear(x, self.packed, sum(self.sizes))
        elif self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        else:
            y = torch.nn.functional.linear(x, self.weight)
        return y if len(self.sizes) == 1 else y.split(self.sizes, -1)


def pack_for_inference(model: nn.Module, pack: bool = True) -> nn.Module:
    """Fuse and pack `model`'s linear layers in place (the Attention and SwiGLU of nn/layers.py, the
    LM head); returns the model. The original weights are released, except where a module still
    needs them (a tied embedding). Call after the final `.to(device, dtype)`."""
    from exaflop.nn.layers import Attention, SwiGLU

    for m in list(model.modules()):
        if isinstance(m, Attention) and m.fused is None:
            m.fused = PackedLinear([m.wq.weight, m.wk.weight, m.wv.weight], pack)
            m.wo = PackedLinear([m.wo.weight], pack)
            del m.wq, m.wk, m.wv
        elif isinstance(m, SwiGLU) and m.fused is None:
            m.fused = PackedLinear([m.w1.weight, m.w3.weight], pack)
            m.w2 = PackedLinear([m.w2.weight], pack)
            del m.w1, m.w3
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        model.lm_head = PackedLinear([head.weight], pack)  # a tied embedding keeps its own reference
    model.packed_for_inference = True
    return model
