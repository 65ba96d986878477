"""Incremental decoding: the KV cache, the cached attention path and its CPU / compiler kernels.

The model's reference attention is nn/layers.py; here is what decoding adds to it, with the
measurements behind each special case: a preallocated cache that rows of different lengths
share (continuous batching), a one-query attention kernel (PyTorch's CPU SDPA is built for
long queries), and the shapes `torch.compile` wants (whole rows, masked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from exaflop.nn.layers import apply_rope, attend


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
        """What attention layer `layer` reads and writes: rows `rows` (default 0..B-1)."""
        return CacheView(self, layer, rows)

    def read_block(self, row: int, start: int, n: int) -> tuple[list[Tensor], list[Tensor]]:
        """Copies of row `row`'s keys and values at positions [start, start+n), per layer (K, n, D)."""
        return ([kc[row, :, start:start + n].clone() for kc in self.k],
                [vc[row, :, start:start + n].clone() for vc in self.v])

    def write_block(self, row: int, start: int, k: list[Tensor], v: list[Tensor]) -> None:
        """Put per-layer keys/values (K, n, D) into row `row` from position `start` (lengths unchanged)."""
        for kc, vc, kb, vb in zip(self.k, self.v, k, v, strict=True):
            n = kb.shape[1]
            kc[row, :, start:start + n] = kb
            vc[row, :, start:start + n] = vb

    def move_row(self, src: int, dst: int) -> None:
        """Copy row src's filled prefix into row dst (used to keep occupied rows packed)."""
        n = int(self.lengths[src])
        for kc, vc in zip(self.k, self.v, strict=True):
            kc[dst, :, :n] = kc[src, :, :n]
            vc[dst, :, :n] = vc[src, :, :n]
        self.lengths[dst] = n


@dataclass
class CacheView:
    """One attention layer's access to a KVCache: the decode state a block is handed."""

    cache: KVCache
    layer: int
    rows: Tensor | None = None  # cache rows of the batch's rows; None: rows 0..B-1 (packed)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        """Append this chunk's k/v at each row's own offset, then attend over the filled prefix."""
        cache, layer, rows = self.cache, self.layer, self.rows
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
                return attend(q, k, v, None, causal=True)
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
        return attend(q, keys, vals, mask[:, None], causal=False)


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
