"""Incremental decoding: the KV cache, the cached attention path and its CPU / compiler kernels.

The model's reference attention is nn/layers.py; here is what decoding adds to it, with the
measurements behind each special case: a preallocated cache that rows of different lengths
share (continuous batching), a one-query attention kernel (PyTorch's CPU SDPA is built for
long queries), and the shapes `torch.compile` wants (whole rows, masked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from exaflop.nn.layers import attend


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

    def view(self, layer: int, rows: Tensor | None = None) -> CacheView:
        """What attention layer `layer` reads and writes: rows `rows` (default 0..B-1). A forward
        over every layer should share one `step` instead (its indices are computed once)."""
        return CacheView(self, layer, rows)

    def step(self, rows: Tensor | None, T: int, rope: tuple[Tensor, Tensor] | None,
             key_pos: Tensor | None = None) -> DecodeStep:
        """The positions, rotary angles and mask a chunk of T tokens per row shares across layers.
        `key_pos`: arange(end) for the positions attention reads, when the caller knows them (a
        compiled step takes the read length from its size: one graph for every length)."""
        return DecodeStep(self, rows, T, rope, key_pos)


class DecodeStep:
    """One forward's cache indexing, computed once and shared by every layer: each row's start
    and absolute positions, its rotary angles, how far attention reads and the mask. Per layer
    that was a dozen small tensor ops, which at decode's tiny shapes cost more than the math."""

    def __init__(self, cache: KVCache, rows: Tensor | None, T: int, rope: tuple[Tensor, Tensor] | None,
                 key_pos: Tensor | None = None):
        self.cache, self.key_pos = cache, key_pos
        device = cache.lengths.device
        self.contiguous = rows is None  # rows 0..B-1: the serving engine keeps them packed so
        self.rows, self.T, self.device = rows, T, device
        self._rope = rope
        self._ready = False  # filled by the first layer, which knows the batch size

    def _prepare(self, B: int) -> None:
        cache, T, device = self.cache, self.T, self.device
        rows = torch.arange(B, device=device) if self.rows is None else self.rows
        self.B, self.index_rows = B, rows[:, None]
        start = cache.lengths[:B] if self.rows is None else cache.lengths[rows]  # (B,)
        self.pos = start[:, None] + torch.arange(T, device=device)  # (B, T) absolute positions
        if self._rope is not None:
            # Whole-width tables (each angle twice) so q and k rotate together in a few ops.
            cos, sin = self._rope[0][self.pos][:, None], self._rope[1][self.pos][:, None]  # (B, 1, T, D/2)
            self.cos2, self.sin2 = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
        if self.key_pos is not None:
            # Given (a compiled step): its length is a dynamic size, so one graph serves every length.
            self.end, self.fresh = self.key_pos.shape[0], False
        elif torch.compiler.is_dynamo_compiling():
            # Compiled without it, every row is read whole (masked): the filled length is data,
            # and slicing by it would make each new length a new graph.
            self.end, self.fresh = cache.max_len, False
        else:
            self.end = int((start + T).max())
            # Every row starts at 0 (a fresh prompt): the chunk is all there is to attend to,
            # so plain causal attention over it, without reading the cache back. Right padding
            # is exact: a real query never sees the padding after it.
            self.fresh = T > 1 and self.end == T
        # Query at absolute position p sees keys 0..p of its own row.
        if not self.fresh:
            key_pos = self.key_pos if self.key_pos is not None else torch.arange(self.end, device=device)
            self.mask = (key_pos[None, None, :] <= self.pos[:, :, None])[:, None]  # (B, 1, T, end)
        self._ready = True

    def view(self, layer: int) -> CacheView:
        return CacheView(self.cache, layer, self.rows, self)


@dataclass
class CacheView:
    """One attention layer's access to a KVCache: the decode state a block is handed."""

    cache: KVCache
    layer: int
    rows: Tensor | None = None  # cache rows of the batch's rows; None: rows 0..B-1 (packed)
    step: DecodeStep | None = None  # shared with the other layers of this forward

    def attend(self, q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        """Append this chunk's k/v at each row's own offset, then attend over the filled prefix."""
        cache, layer = self.cache, self.layer
        B, _, T, _ = q.shape
        st = self.step or DecodeStep(cache, self.rows, T, rope)
        if not st._ready:
            st._prepare(B)
        if rope is not None:
            q, k = _rope_qk(q, k, st.cos2, st.sin2)
        cache.write(layer, st.index_rows[:, 0], st.pos, k, v)
        if st.fresh:
            return attend(q, k, v, None, causal=True)
        # Rows 0..B-1 are read as a view, no gather.
        keys, vals = cache.read(layer, B if st.contiguous else st.index_rows[:, 0], st.end)
        if keys.dtype != q.dtype:
            keys, vals = keys.to(q.dtype), vals.to(q.dtype)
        if T == 1:
            return _decode_attention(q, keys, vals, st.mask)
        return attend(q, keys, vals, st.mask, causal=False)


def _rope_qk(q: Tensor, k: Tensor, cos2: Tensor, sin2: Tensor) -> tuple[Tensor, Tensor]:
    """`apply_rope` (nn/layers.py) on q (B, H, T, D) and k (B, K, T, D) at once, bit for bit: with
    rotate-half, x1*cos + (-x2)*sin is x1*cos - x2*sin exactly. One set of ops for both heads
    instead of two: at decode's shapes each op costs more than its arithmetic."""
    H = q.shape[1]
    x = torch.cat((q, k), 1).float()
    d2 = x.shape[-1] // 2
    rot = torch.cat((-x[..., d2:], x[..., :d2]), -1)
    out = (x * cos2 + rot * sin2).to(q.dtype)
    return out[:, :H], out[:, H:]


def _decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of one new query per row over its cached keys.

    q (B, H, 1, D), k/v (B, K, L, D) (views of the cache), mask (B, 1, 1, L).
    bf16 on CPU: PyTorch's SDPA (grouped heads without repeating k/v), 3-5x faster than two
    batched bf16 matmuls on these shapes (`lm-124m`, 2 threads, AMX CPU: 26 vs 142 us at one
    row, 0.82 vs 2.8 ms at 32). fp32: the two matmuls with the softmax in fp32, as fast or
    faster than SDPA there at 8-32 rows (measured on AMX and AVX2-only paths).
    """
    B, H, _, D = q.shape
    K = k.shape[1]
    if torch.compiler.is_dynamo_compiling():
        return _decode_attention_fused(q.reshape(B, K, H // K, D), k, v, mask).reshape(B, H, 1, D)
    if q.dtype == torch.bfloat16:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=K < H)
    qg = q.reshape(B, K, H // K, D)  # query heads grouped under their KV head: no repeat of k/v
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
