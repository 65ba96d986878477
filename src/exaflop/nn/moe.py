"""Mixture of experts with stacked expert weights (Grok-1 style: 8 experts, 2 active).

Tokens are routed (router in fp32), their copies sorted by expert, and each projection of
all experts runs as one grouped matmul over the sorted rows: no Python loop over experts,
no per-expert `nonzero`, and every expert weight receives a gradient on every step, zeros
for an expert no token chose (so data-parallel ranks always reduce the same tensors).

Balancing, two mechanisms (both configurable, see lm/config.py):
- auxiliary-loss-free (DeepSeek-V3, arXiv 2412.19437 §2.1.2): a per-expert bias is added to
  the routing scores for the choice of experts only (the gate weights use the unbiased
  probabilities); after each optimizer step it moves by `rate` toward balance (the sign
  of the load error, as theirs), from token counts summed over the step's micro-batches
  and over the data-parallel ranks. DeepSeek-V3 routes on sigmoid affinities; with a
  softmax router the bias goes on the logits, where its step means the same at any
  skew (on the probabilities a fixed step overshoots near balance and cannot close a
  large gap: measured in tests/nn/test_moe.py's skewed router, which oscillated between
  1.6x and 3.8x max/mean load after 100 steps, against <= 1.5x on the logits);
- a sequence-wise auxiliary loss (same paper, eq. 17-20), returned separately so that
  validation loss never contains it.
An optional capacity factor drops, in training, the copies an expert receives beyond its
capacity (counted in `dropped`); inference computes every copy.

Expert parallel (engine/mesh.py, lm/parallel_plan.py's `apply_ep`): each rank of an `ep`
group holds E/ep experts. Routing stays local; the per-expert copy counts are exchanged
first (one all-to-all of E integers), then the sorted copies travel to the ranks owning
their experts and the results come back, each with one `all_to_all_single` of variable
splits. Every rank takes part in every exchange, zero rows or not, so an expert nobody
chose on some rank cannot leave ranks waiting on each other; its weights still get a
(zero) gradient from the grouped matmul.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _aligned(*tensors: Tensor) -> bool:
    # torch._grouped_mm needs 16-byte aligned strides (and on CUDA, bf16 on sm90+).
    return all(t.stride(-1) == 1 and (t.shape[-1] * t.element_size()) % 16 == 0 for t in tensors)


def _grouped_native(x: Tensor, w: Tensor, counts: Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cuda" and not (x.dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] >= 9):
        return False
    return _aligned(x, w) and (w.shape[1] * w.element_size()) % 16 == 0


class _GroupedMM(torch.autograd.Function):
    """y[rows of group e] = x[rows of group e] @ w[e], with torch._grouped_mm both ways (its own
    CPU backward is not implemented in torch 2.13)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
        ctx.save_for_backward(x, w, offs)
        return torch._grouped_mm(x, w, offs=offs)

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, w, offs = ctx.saved_tensors
        gy = gy.contiguous()
        gx = torch._grouped_mm(gy, w.transpose(-1, -2), offs=offs) if ctx.needs_input_grad[0] else None
        # (K, M) @ (M, N) split along M by group: one (K, N) gradient per expert, zeros if empty.
        gw = torch._grouped_mm(x.t(), gy, offs=offs) if ctx.needs_input_grad[1] else None
        return gx, gw, None


def grouped_mm(x: Tensor, w: Tensor, counts: Tensor, max_count: int | None = None) -> Tensor:
    """x (M, K) rows sorted by group, w (G, K, N), counts (G,) rows per group -> (M, N).

    torch._grouped_mm where it runs (aligned shapes); otherwise the rows are scattered into
    a (G, max_count, K) buffer and multiplied with one batched matmul (measured in
    bench/moe_layer.py): still no loop over groups.
    """
    if _grouped_native(x, w, counts):
        return _GroupedMM.apply(x, w, counts.cumsum(0).to(torch.int32))
    G = w.shape[0]
    starts = counts.cumsum(0) - counts
    group = torch.repeat_interleave(torch.arange(G, device=x.device), counts, output_size=x.shape[0])
    pos = torch.arange(x.shape[0], device=x.device) - starts[group]
    cap = max_count if max_count is not None else int(counts.max()) if x.shape[0] else 0
    buf = x.new_zeros(G, cap, x.shape[1])
    buf = buf.index_put((group, pos), x)
    return torch.bmm(buf, w)[group, pos]


class MoE(nn.Module):
    def __init__(self, dim: int, hidden: int, n_experts: int, top_k: int, capacity_factor: float = 0.0,
                 aux_coef: float = 0.0):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.capacity_factor, self.aux_coef = capacity_factor, aux_coef
        self.router = nn.Linear(dim, n_experts, bias=False)
        # SwiGLU experts, stacked: gate and up (E, C, F), down (E, F, C).
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        for p in (self.w1, self.w3, self.w2):
            nn.init.normal_(p, std=0.02)
        # Routing bias for balancing (a buffer: no gradient; checkpointed with the model).
        self.register_buffer("expert_bias", torch.zeros(n_experts))
        # Copies routed to each expert since the last balancing update (training only). Not a
        # buffer: DDP would overwrite every rank's count with rank 0's at each forward.
        self.load: Tensor | None = None
        self.aux_loss: Tensor | None = None
        self.dropped = 0  # copies dropped by the capacity factor in the last forward
        # Process groups set by the parallel plan (lm/parallel_plan.py); None: not split.
        self.tp_group = None  # ranks holding slices of every expert's hidden units
        self.ep_group = None  # ranks holding different experts

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, C)
        N, E, k = x.shape[0], self.n_experts, self.top_k
        # Router in fp32, also under autocast.
        logits = F.linear(x.float(), self.router.weight.float())  # (N, E)
        probs = logits.softmax(-1)
        expert = (logits + self.expert_bias).topk(k, dim=-1).indices  # (N, k): bias picks, never weighs
        gate = probs.gather(-1, expert)
        gate = gate / gate.sum(-1, keepdim=True)
        flat = expert.flatten()  # (N*k,) copy j is token j // k
        counts = torch.bincount(flat, minlength=E)
        order = flat.argsort(stable=True)
        if self.training:
            c = counts.detach().float()
            self.load = c if self.load is None else self.load + c
        cap = None
        if self.capacity_factor > 0 and self.training:  # inference computes every copy
            cap = max(1, math.ceil(self.capacity_factor * N * k / E))
            starts = counts.cumsum(0) - counts
            pos = torch.arange(N * k, device=x.device) - starts[flat[order]]
            keep = pos < cap
            self.dropped = int((~keep).sum())
            order = order[keep]
            counts = counts.clamp(max=cap)
        token = order // k
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        group = self.tp_group
        # Tensor parallel (lm/parallel_plan.py): each rank holds a slice of every expert's
        # hidden units, so its expert output is a partial sum. Megatron's pair of operators:
        # `_enter` (identity forward, all-reduce of the gradient) on what feeds the partial
        # computation, `_leave` (all-reduce forward, identity backward) on its result.
        x_in, gate_in = (x, gate) if group is None else (_enter(x, group), _enter(gate, group))
        xs = x_in[token].to(dtype)
        if self.ep_group is None:
            y = self._experts(xs, counts, dtype, cap)
        else:
            y = self._experts_ep(xs, counts, dtype)
        y = y * gate_in.flatten()[order, None].to(dtype)
        out = torch.zeros(N, y.shape[-1], dtype=y.dtype, device=x.device).index_add_(0, token, y)
        if group is not None:
            out = _leave(out, group)
        self.aux_loss = self._sequence_aux(probs, expert, shape) if self.aux_coef > 0 else None
        return out.to(x.dtype).view(shape)

    def _experts(self, xs: Tensor, counts: Tensor, dtype: torch.dtype, cap: int | None = None) -> Tensor:
        """SwiGLU of the rows `xs`, sorted by (local) expert with `counts` rows each."""
        w1, w3, w2 = (_local(p).to(dtype) for p in (self.w1, self.w3, self.w2))
        h = F.silu(grouped_mm(xs, w1, counts, cap)) * grouped_mm(xs, w3, counts, cap)
        return grouped_mm(h, w2, counts, cap)

    def _experts_ep(self, xs: Tensor, counts: Tensor, dtype: torch.dtype) -> Tensor:
        """`_experts` with the experts spread over the ep group: dispatch, compute, combine."""
        g = self.ep_group
        P = torch.distributed.get_world_size(g)
        El = self.n_experts // P
        # recv[src, j]: copies rank `src` sends to this rank's local expert j.
        recv = torch.empty_like(counts)
        torch.distributed.all_to_all_single(recv, counts, group=g)
        recv = recv.view(P, El)
        send_splits = counts.view(P, El).sum(1).tolist()
        recv_splits = recv.sum(1).tolist()
        xr = _AllToAll.apply(xs, recv_splits, send_splits, g)  # grouped by (source rank, expert)
        # Regroup by local expert for the grouped matmul, and back afterwards.
        local = torch.repeat_interleave(torch.arange(El, device=xs.device).repeat(P), recv.flatten(),
                                        output_size=xr.shape[0])
        perm = local.argsort(stable=True)
        hr = self._experts(xr[perm], recv.sum(0), dtype)
        back = torch.empty_like(hr).index_copy_(0, perm, hr)
        return _AllToAll.apply(back, send_splits, recv_splits, g)

    def _sequence_aux(self, probs: Tensor, expert: Tensor, shape: torch.Size) -> Tensor:
        """DeepSeek-V3's sequence-wise balance loss: sum_e f_e * P_e per sequence, averaged.
        f_e = E / (k T) * (tokens of the sequence choosing e), P_e = mean routing probability."""
        E, k = self.n_experts, self.top_k
        T = shape[-2] if len(shape) == 3 else probs.shape[0]
        p = probs.view(-1, T, E)
        chosen = F.one_hot(expert, E).sum(-2).view(-1, T, E).float()  # (B, T, E)
        f = chosen.sum(1) * E / (k * T)
        return (f * p.mean(1)).sum(-1).mean()

    def take_load(self) -> Tensor:
        """Copies routed to each expert since the last call (zeros if none), and reset."""
        load = self.load if self.load is not None else torch.zeros(self.n_experts, device=self.expert_bias.device)
        self.load = None
        return load

    @torch.no_grad()
    def balance(self, load: Tensor, rate: float) -> None:
        """Move the routing bias toward balance from `load` (copies per expert, summed over ranks):
        up for experts below the mean load, down for those above."""
        self.expert_bias += rate * torch.sign(load.mean() - load)


def _local(p: Tensor) -> Tensor:
    """A tensor-parallel DTensor weight's local shard (the MoE computes on local shards)."""
    return p.to_local() if hasattr(p, "to_local") else p


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; its gradient travels the same way back."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        torch.distributed.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        out_splits, in_splits = ctx.splits
        gx = g.new_empty(sum(in_splits), *g.shape[1:])
        torch.distributed.all_to_all_single(gx, g.contiguous(), in_splits, out_splits, group=ctx.group)
        return gx, None, None, None


class _Enter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        g = g.contiguous()
        torch.distributed.all_reduce(g, group=ctx.group)
        return g, None


class _Leave(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        x = x.contiguous().clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None


def _enter(x: Tensor, group) -> Tensor:
    return _Enter.apply(x, group)


def _leave(x: Tensor, group) -> Tensor:
    return _Leave.apply(x, group)
