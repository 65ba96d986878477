"""Transformer building blocks shared by the language model and the driving model.

Shapes: B batch, T sequence length, C model width, H query heads, K key/value
heads (grouped-query attention: each KV head serves H/K query heads), D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 so bf16 activations do not lose the mean-square precision.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = x32 * self.weight.float()
        # Under autocast, hand the next matmuls their compute dtype once here; otherwise
        # each of q/k/v (and gate/up) would cast the same fp32 activation separately.
        if torch.is_autocast_enabled(x.device.type):
            return out.to(torch.get_autocast_dtype(x.device.type))
        return out.type_as(x)


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


class KVCache:
    """Preallocated key/value buffers for incremental decoding, one per attention layer.

    `slots` batch rows each hold one sequence; `lengths[i]` is how many positions
    row i has filled. Generation appends at each row's own length, so rows of
    different lengths (continuous batching) share one tensor.

    Both are (slots, K, max_len, D), one tensor per layer.
    """

    def __init__(self, n_layer: int, slots: int, n_kv_head: int, max_len: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (slots, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)

    @property
    def slots(self) -> int:
        return self.lengths.shape[0]

    def write(self, layer: int, rows: Tensor, pos: Tensor, k: Tensor, v: Tensor) -> None:
        """Store k/v (B, K, T, D) of rows `rows` (B,) at positions `pos` (B, T)."""
        # Advanced indices on dims 0 and 2 put (B, T) first: (B, T, K, D).
        self.k[layer][rows[:, None], :, pos] = k.transpose(1, 2).to(self.k[layer].dtype)
        self.v[layer][rows[:, None], :, pos] = v.transpose(1, 2).to(self.v[layer].dtype)

    def read(self, layer: int, rows: Tensor | int, end: int) -> tuple[Tensor, Tensor]:
        """Keys and values (B, K, end, D) of `rows` (a gathered copy), or, for an int B, of
        rows 0..B-1 as a view of the cache."""
        kc, vc = self.k[layer], self.v[layer]
        if isinstance(rows, int):
            return kc[:rows, :, :end], vc[:rows, :, :end]
        return kc[rows, :, :end], vc[rows, :, :end]

    def advance(self, rows: Tensor | None, n: Tensor | int) -> None:
        """Rows `rows` (default 0..len(n)-1, or every row for an int) filled `n` more positions."""
        if rows is None:
            if isinstance(n, int):
                self.lengths += n
            else:
                self.lengths[:n.shape[0]] += n
        else:
            self.lengths[rows] += n

    def reset(self, rows: Tensor) -> None:
        """Rows `rows` start a new sequence (their old keys are overwritten as it fills)."""
        self.lengths[rows] = 0

    def move_row(self, src: int, dst: int) -> None:
        """Copy row src's filled prefix into row dst (used to keep occupied rows packed)."""
        n = int(self.lengths[src])
        for kc, vc in zip(self.k, self.v, strict=True):
            kc[dst, :, :n] = kc[src, :, :n]
            vc[dst, :, :n] = vc[src, :, :n]
        self.lengths[dst] = n


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, n_kv_head: int, causal: bool = True, dropout: float = 0.0):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, dim // n_head
        self.causal, self.dropout = causal, dropout
        self.wq = nn.Linear(dim, n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_head * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(n_head * self.head_dim, dim, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0, rows: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        # -1 instead of n_head: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if cache is None:
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            y = self._attend(q, k, v, None, self.causal)
        else:
            y = self._attend_cached(q, k, v, rope, cache, layer, rows)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.wo(y)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        groups = q.shape[1] // k.shape[1]
        if groups > 1:  # GQA: share each KV head across its group of query heads
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                              is_causal=causal and mask is None)

    def _attend_cached(self, q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor] | None,
                       cache: KVCache, layer: int, rows: Tensor | None) -> Tensor:
        """Append this chunk's k/v at each row's own offset, then attend over the filled prefix."""
        B, _, T, _ = q.shape
        contiguous = rows is None
        rows = torch.arange(B, device=q.device) if rows is None else rows
        start = cache.lengths[rows]  # (B,)
        pos = start[:, None] + torch.arange(T, device=q.device)  # (B, T) absolute positions
        if rope is not None:
            cos, sin = rope[0][pos][:, None], rope[1][pos][:, None]  # (B, 1, T, D/2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.write(layer, rows, pos, k, v)
        if torch.compiler.is_compiling():
            # Compiled, every row is read whole (masked): the filled length is data, and
            # slicing by it would make each new length a new graph. The generated kernel
            # reads the cache once, so the masked tail costs only its memory traffic.
            end = cache.max_len
        else:
            end = int((start + T).max())
            if T > 1 and end == T:
                # Every row starts at 0 (a fresh prompt): the chunk is all there is to attend
                # to, so plain causal attention over it, without reading the cache back.
                # Right padding is exact: a real query never sees the padding after it.
                return self._attend(q, k, v, None, causal=True)
            if T == 1 and contiguous and q.device.type == "cpu" and 3 * end > cache.max_len:
                # Decode on CPU reads whole rows (masked) once the cache is a third full: they
                # are contiguous, while PyTorch's bf16 batched matmul copies a prefix view
                # before using it, which costs more than reading the unused tail (measured).
                end = cache.max_len
        # Rows 0..B-1 (the serving engine keeps them packed so) are read as a view, no gather.
        keys, vals = cache.read(layer, B if contiguous else rows, end)
        keys, vals = keys.to(q.dtype), vals.to(q.dtype)
        # Query at absolute position p sees keys 0..p of its own row.
        key_pos = torch.arange(end, device=q.device)
        mask = key_pos[None, None, :] <= pos[:, :, None]  # (B, T, end)
        if T == 1:
            return _decode_attention(q, keys, vals, mask[:, None])
        return self._attend(q, keys, vals, mask[:, None], causal=False)


def _decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of one new query per row over its cached keys.

    q (B, H, 1, D), k/v (B, K, L, D), mask (B, 1, 1, L).
    For a single query PyTorch's CPU SDPA kernels are slow (their blocking is built for
    long queries; in bf16 measured ~7x slower than two plain matmuls), so decode does
    the two matmuls itself, with the softmax in fp32.
    """
    B, H, _, D = q.shape
    K = k.shape[1]
    qg = q.reshape(B, K, H // K, D)  # query heads grouped under their KV head: no repeat of k/v
    if torch.compiler.is_compiling():
        return _decode_attention_fused(qg, k, v, mask).reshape(B, H, 1, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * D ** -0.5  # (B, K, H/K, L)
    scores = scores.masked_fill(~mask, float("-inf"))
    y = torch.matmul(scores.softmax(-1).to(v.dtype), v)  # (B, K, H/K, D)
    return y.reshape(B, H, 1, D)


def _decode_attention_fused(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """`_decode_attention` for the compiler: q (B, K, G, D) grouped, k/v (B, K, L, D).

    Written as broadcast multiplies and sums rather than matmuls: inductor fuses each
    into one loop over the cache (fp32 accumulation), about twice as fast as PyTorch's
    batched bf16 matrix-vector kernels on a cache that does not fit in the CPU's cache
    (measured). Eager, the same expressions would materialize (B, K, G, L, D) products.
    """
    D = q.shape[-1]
    scores = (q.float()[:, :, :, None] * k.float()[:, :, None]).sum(-1) * D ** -0.5  # (B, K, G, L)
    scores = scores.masked_fill(~mask, float("-inf"))
    p = scores.softmax(-1)
    y = (p[..., None] * v.float()[:, :, None]).sum(-2)  # (B, K, G, D)
    return y.to(v.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Top-k routed mixture of SwiGLU experts (Grok-1 style: 8 experts, 2 active).

    Tokens are grouped by expert so each expert runs one dense matmul over its tokens.
    An auxiliary load-balancing loss (Switch Transformer form) is kept in `aux_loss`.
    """

    def __init__(self, dim: int, hidden: int, n_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(dim, hidden) for _ in range(n_experts))
        self.aux_loss: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, C)
        probs = self.router(x).float().softmax(-1)  # (N, E)
        weight, expert = probs.topk(self.top_k, dim=-1)  # (N, k)
        weight = (weight / weight.sum(-1, keepdim=True)).type_as(x)
        out = torch.zeros_like(x)
        for e, mlp in enumerate(self.experts):
            token, slot = (expert == e).nonzero(as_tuple=True)
            if token.numel():
                out.index_add_(0, token, mlp(x[token]) * weight[token, slot, None])
        n_e = probs.shape[-1]
        load = torch.zeros(n_e, device=x.device).index_add_(
            0, expert.flatten(), torch.ones(expert.numel(), device=x.device)) / expert.numel()
        self.aux_loss = n_e * (load * probs.mean(0)).sum()
        return out.view(shape)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, n_head: int, n_kv_head: int, d_ff: int, causal: bool = True,
                 norm_eps: float = 1e-5, dropout: float = 0.0, n_experts: int = 1, top_k: int = 1):
        super().__init__()
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.attn = Attention(dim, n_head, n_kv_head, causal=causal, dropout=dropout)
        self.mlp_norm = RMSNorm(dim, norm_eps)
        self.mlp = MoE(dim, d_ff, n_experts, top_k) if n_experts > 1 else SwiGLU(dim, d_ff)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0, rows: Tensor | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), rope, cache, layer, rows))
        return x + self.drop(self.mlp(self.mlp_norm(x)))
