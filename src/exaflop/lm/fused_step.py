"""The fp32 decode step as one operator (`exaflop::decode_f32`, nn/csrc/decode_f32.cpp): what
`serve` decodes with where `auto` serves fp32, i.e. where PyTorch dispatches to AVX2 (CPUs
without fast bf16).

A drop-in for a compiled `LM.logits_at` (the `step` LM.decode takes): one new token per packed
row of a paged cache goes through the operator; anything else (a prompt, gathered rows, a dense
cache) through `LM.logits_at` itself. Against the compiled step it removes what a decode step
spends outside the products and attention — entering and leaving ~100 parallel regions, the
wrapper, the guards — and needs no compile (docs/benchmarks.md, issue 24).
"""

from __future__ import annotations

import torch
from torch import Tensor

from exaflop.engine.host_memory import huge_page_share
from exaflop.lm.model import LM
from exaflop.nn.kernels import cpu_kernels
from exaflop.nn.packed import PackedLinear, f32_rows_kernel
from exaflop.nn.paged import PagedKVCache


def _weights(model: LM) -> list[Tensor] | None:
    """The operator's weight list for `model` (per layer: attention norm, q/k/v, output, MLP
    norm, gate/up, down; then the final norm and the head), or None where it does not apply."""
    cfg = model.cfg
    if cfg.n_experts > 1 or model.tok_emb.weight.dtype != torch.float32 or model.tok_emb.weight.device.type != "cpu":
        return None
    out: list[Tensor] = []
    for b in model.blocks:
        a, m = b.attn, b.mlp
        mats = [a.fused, a.wo, getattr(m, "fused", None), getattr(m, "w2", None)]
        if not all(isinstance(x, PackedLinear) and _f32(x.weight) for x in mats):
            return None
        if b.attn_norm.eps != cfg.norm_eps or b.mlp_norm.eps != cfg.norm_eps:
            return None
        out += [b.attn_norm.weight.detach(), a.fused.weight, a.wo.weight, b.mlp_norm.weight.detach(),
                m.fused.weight, m.w2.weight]
    head = model.lm_head
    if not (isinstance(head, PackedLinear) and _f32(head.weight)) or model.norm.eps != cfg.norm_eps:
        return None
    return [*out, model.norm.weight.detach(), head.weight]


def _f32(w: Tensor | None) -> bool:
    return w is not None and w.dtype == torch.float32 and w.shape[1] % 8 == 0


def fused_step_applies(model: LM) -> bool:
    """Whether `model` (packed for inference, nn/packed.py) should decode through the operator
    here: a dense fp32 model where PyTorch dispatches to AVX2 (where its matrices take exaflop's
    fp32 kernel; at AVX-512, MKL's). Builds exaflop's kernels on first call (nn/kernels.py), and
    prepares the operator's weights where it applies (`prepare_fused_step`: once per model)."""
    return f32_rows_kernel() and prepare_fused_step(model) is not False


def fused_step(model: LM, idx: Tensor, cache, rows: Tensor | None, last: Tensor,  # noqa: ANN001
               key_pos: Tensor | None = None, huge_pages: bool | None = None) -> Tensor:
    """`LM.logits_at`'s arguments and result: fp32 logits (B, V) after each row's chunk. Runs on
    any CPU with AVX2 + FMA (the operator checks); `fused_step_applies` says where it pays.
    `huge_pages`: stream the weights as if they were (True) or were not (False) in 2 MB pages
    (bench/linear_f32.py compares the two; the same numbers either way); None: as they are."""
    B, T = idx.shape
    prepared = prepare_fused_step(model)
    if T != 1 or rows is not None or not isinstance(cache, PagedKVCache) or cache.pairs or prepared is False:
        return LM.logits_at(model, idx, cache, rows, last, key_pos)
    weights, huge = prepared
    huge = huge if huge_pages is None else huge_pages
    cfg = model.cfg
    return torch.ops.exaflop.decode_f32(idx.reshape(B), model.tok_emb.weight, weights, model.rope_cos,
                                        model.rope_sin, cache.keys, cache.values, cache.table, cache.lengths[:B],
                                        cfg.n_head, cfg.n_kv_head, cfg.norm_eps, huge)


def prepare_fused_step(model: LM) -> tuple[list[Tensor], bool] | bool:
    """The operator's weights and whether they sit in 2 MB pages (most of their bytes: `serve`
    asks for them, engine/host_memory.py), which picks how its products stream them
    (nn/csrc/linear_f32.h wide_scheme); False where the operator does not apply. Worked out once
    per model object (a hot reload brings a new one; reading /proc/self/smaps takes ~20 ms, so
    the server does it while preparing the weights, through `fused_step_applies`, not in its
    first decode step)."""
    prepared = model.__dict__.get("_decode_f32_weights")
    if prepared is None:
        weights = cpu_kernels() and _weights(model)
        prepared = (weights, huge_page_share(weights) >= 0.5) if weights else False
        model.__dict__["_decode_f32_weights"] = prepared
    return prepared


fused_step.needs_key_pos = False  # LM.decode then skips making it; the fallback makes its own
