"""MoE layer forward + backward: the stacked experts' grouped matmul vs a loop over experts.

Same shapes, same routing, one run: exaflop's `nn.MoE` (tokens sorted by expert, one
grouped matmul per projection: torch._grouped_mm, or the batched fallback) against the
layout it replaced, kept here as the peer: one SwiGLU module per expert, a Python loop that
gathers each expert's tokens with `nonzero` and scatters its output back (the common
reference implementation, e.g. Mixtral's in transformers). Tokens/s of forward+backward.

    python bench/moe_layer.py [--experts 8] [--top-k 2] [--tokens 4096] [--dim 384] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from exaflop.engine.precision import cpu_capability
from exaflop.nn.moe import MoE


class LoopMoE(nn.Module):
    """The previous exaflop MoE: experts as separate modules, a loop with nonzero."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.top_k, self.router = moe.top_k, moe.router
        self.w1 = nn.ParameterList(nn.Parameter(moe.w1[e].detach().t().clone()) for e in range(moe.n_experts))
        self.w3 = nn.ParameterList(nn.Parameter(moe.w3[e].detach().t().clone()) for e in range(moe.n_experts))
        self.w2 = nn.ParameterList(nn.Parameter(moe.w2[e].detach().t().clone()) for e in range(moe.n_experts))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.router(x).float().softmax(-1)
        weight, expert = probs.topk(self.top_k, dim=-1)
        weight = (weight / weight.sum(-1, keepdim=True)).type_as(x)
        out = torch.zeros_like(x)
        for e in range(len(self.w1)):
            token, slot = (expert == e).nonzero(as_tuple=True)
            if token.numel():
                xe = x[token]
                h = F.silu(F.linear(xe, self.w1[e])) * F.linear(xe, self.w3[e])
                out.index_add_(0, token, F.linear(h, self.w2[e]) * weight[token, slot, None])
        return out.view(shape)


def rate(layer: nn.Module, x: torch.Tensor, dtype, steps: int) -> float:
    def once():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            y = layer(x)
        y.float().pow(2).mean().backward()
    for _ in range(2):
        once()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return x.shape[0] * x.shape[1] / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="a seconds-long rehearsal (smoke test); numbers mean nothing")
    a = ap.parse_args()
    if a.tiny:
        a.tokens, a.dim, a.hidden, a.steps = 256, 64, 128, 2
    torch.manual_seed(0)
    moe = MoE(a.dim, a.hidden, a.experts, a.top_k)
    loop = LoopMoE(moe)
    x = torch.randn(a.tokens // 256 or 1, min(256, a.tokens), a.dim)
    with torch.no_grad():  # the two compute the same function
        torch.testing.assert_close(moe(x), loop(x), atol=1e-4, rtol=1e-4)
    cpu = cpu_capability()
    print(f"MoE E={a.experts} top-{a.top_k}, {x.shape[0] * x.shape[1]} tokens, d {a.dim}, hidden {a.hidden}  [{cpu}]")
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        ours, theirs = rate(moe, x, dtype, a.steps), rate(loop, x, dtype, a.steps)
        print(f"{name}: grouped {ours:10,.0f} tok/s   loop {theirs:10,.0f} tok/s   ratio {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
