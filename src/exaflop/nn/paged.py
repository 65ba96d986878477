"""A paged KV cache: keys and values in pools of fixed-size blocks, a block table per row.

The dense cache (nn/decode.py) gives each row `max_len` positions of its own. Here every
layer's keys and values live in one pool of `BLOCK`-position blocks; row i's positions
[16j, 16j+16) are in block `table[i, j]`. Blocks are allocated as rows grow and are
refcounted, so rows can share them: a prompt prefix that is already in the pool (the
serving prefix cache, serve/prefix.py) is attached to a new row by writing block ids into
its table, not by copying keys. Only full blocks are ever shared, and a row writes only at
or after its own length, so a shared block is never written: no copy-on-write is needed.
Moving a row (the server keeps rows packed) moves a table row, not its keys.

Layouts, chosen by measurement (docs/benchmarks.md): fp32 keys (block, head, dim, position)
— a block's 16 scores are one vector — and values (block, head, position, dim); bf16 keys
(block, head, dim/2, position, 2) and values (block, head, position/2, dim, 2), pairs side by
side, the operand layout of AVX512-BF16's dot product. Decode attention reads them in place
with a C++ kernel (csrc/paged_attention.cpp, built by nn/kernels.py for the CPU's capability
on first use); if it cannot be built (no compiler), or on a GPU, blocks are gathered into a
contiguous copy first (2-7x slower attention on CPU, docs/benchmarks.md). A multi-token chunk over a cached
prefix (a prefill after a prefix-cache hit) gathers too: it is compute-bound, and runs once.

Block 0 is scratch: table entries a row has not allocated point at it, so the padding
positions of a right-padded prefill land there harmlessly and are never read.
"""

from __future__ import annotations

import torch
from torch import Tensor

from exaflop.nn.decode import KVCache, _rope_qk
from exaflop.nn.kernels import cpu_kernels
from exaflop.nn.layers import attend

BLOCK = 16  # positions per block: small enough that a shared prefix is rarely cut short

_kernel: bool | None = None  # whether the kernel is loaded; None: not asked yet (tests set False)


def paged_kernel() -> bool:
    """Whether the paged decode-attention kernel is loaded (nn/kernels.py builds it on first
    call, with exaflop's other CPU kernels, as `torch.ops.exaflop.paged_decode`)."""
    global _kernel
    if _kernel is None:
        _kernel = cpu_kernels()
    return _kernel


def _fake(q: Tensor, keys: Tensor, values: Tensor, table: Tensor, lens: Tensor) -> Tensor:
    return torch.empty_like(q)


@torch.library.custom_op("exaflop::paged_decode_gathered", mutates_args=())
def _paged_decode_gathered(q: Tensor, keys: Tensor, values: Tensor, table: Tensor, lens: Tensor) -> Tensor:
    return _gathered_decode(q, keys, values, table, lens, q.shape[-1] ** -0.5)


_paged_decode_gathered.register_fake(_fake)


def paged_decode(q: Tensor, keys: Tensor, values: Tensor, table: Tensor, lens: Tensor) -> Tensor:
    """Attention of one query per row, q (B, H, D), over its first lens[b] cached positions, in
    the pools of a PagedKVCache (either layout), through table (B, NB) of block ids. (B, H, D).
    One opaque operator either way, so a compiled decode step calls it as one kernel."""
    if q.device.type == "cpu" and _kernel_ready():
        return torch.ops.exaflop.paged_decode(q, keys, values, table, lens)
    return _paged_decode_gathered(q, keys, values, table, lens)


def _kernel_ready() -> bool:
    """paged_kernel(), resolved before a compiled step traces its caller (Runner.prepare builds
    the kernels): the lock in paged_kernel() is not something to trace through."""
    return bool(_kernel) if torch.compiler.is_dynamo_compiling() else paged_kernel()


def _fused_ready() -> bool:
    """Whether the fp32 decode step takes `paged_decode_rope` (csrc/paged_attention.cpp); tests
    turn it off to compare with the unfused ops."""
    return _kernel_ready()


def gather(keys: Tensor, values: Tensor, table: Tensor, nb: int) -> tuple[Tensor, Tensor]:
    """Contiguous keys and values (B, K, nb*BLOCK, D) of the first `nb` blocks of each table row."""
    ids = table[:, :nb]
    k, v = keys[ids], values[ids]
    if k.dim() == 6:  # pair layout: (B, nb, K, D/2, BLK, 2) and (B, nb, K, BLK/2, D, 2)
        B, _, K, P, blk, _ = k.shape
        k = k.permute(0, 2, 1, 4, 3, 5).reshape(B, K, nb * blk, 2 * P)
        v = v.permute(0, 2, 1, 3, 5, 4).reshape(B, K, nb * blk, 2 * P)
        return k, v
    B, _, K, D, blk = k.shape  # (B, nb, K, D, BLK) and (B, nb, K, BLK, D)
    k = k.permute(0, 2, 1, 4, 3).reshape(B, K, nb * blk, D)
    v = v.permute(0, 2, 1, 3, 4).reshape(B, K, nb * blk, D)
    return k, v


def _gathered_decode(q: Tensor, keys: Tensor, values: Tensor, table: Tensor, lens: Tensor,
                     scale: float) -> Tensor:
    B, H, D = q.shape
    blk = keys.shape[-2] if keys.dim() == 5 else keys.shape[-1]
    nb = max(1, -(-int(lens.max()) // blk))
    k, v = gather(keys, values, table, nb)
    K = k.shape[1]
    mask = torch.arange(nb * blk, device=q.device)[None, :] < lens[:, None]  # (B, L)
    qg = q.reshape(B, K, H // K, D).float()
    scores = torch.matmul(qg, k.float().transpose(-1, -2)) * scale  # (B, K, G, L)
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    y = torch.matmul(scores.softmax(-1), v.float())
    return y.reshape(B, H, D).to(q.dtype)


class PagedKVCache:
    """Block pools per layer, a block table per row, refcounted blocks.

    The interface the model uses is the dense cache's (`lengths`, `step`, `advance`); the
    caller that owns the rows (the server's runner) also calls `reserve` before a forward, so
    every position it writes has a block, and `release` when a row's sequence ends.
    """

    def __init__(self, n_layer: int, slots: int, n_kv_head: int, max_len: int, head_dim: int,
                 extra_blocks: int = 0, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, block: int = BLOCK, lazy: bool = False,
                 compute_dtype: torch.dtype | None = None):
        self.block, self.max_len = block, max_len
        self.max_blocks = -(-max_len // block)
        # Every row at full length, plus block 0 (scratch): rows never wait for blocks. The extra
        # blocks hold what a prefix cache keeps after its rows end (serve/prefix.py).
        n_blocks = 1 + slots * self.max_blocks + extra_blocks
        self.n_blocks = n_blocks
        # A bf16 model's bf16 cache: the pair layout (keys (N, K, D/2, BLOCK, 2), values (N, K,
        # BLOCK/2, D, 2)), which the kernel multiplies with AVX512-BF16 dot products where the CPU
        # has them. Otherwise keys (N, K, D, BLOCK) and values (N, K, BLOCK, D), in fp32 or — an
        # fp32 model's bf16 cache (`compute_dtype` fp32) — bf16 widened to fp32 as it is read.
        compute_dtype = dtype if compute_dtype is None else compute_dtype
        self.pairs = (dtype == torch.bfloat16 and compute_dtype == torch.bfloat16 and block % 2 == 0
                      and head_dim % 2 == 0)
        if self.pairs:
            kshape = (n_blocks, n_kv_head, head_dim // 2, block, 2)
            vshape = (n_blocks, n_kv_head, block // 2, head_dim, 2)
        else:
            kshape, vshape = (n_blocks, n_kv_head, head_dim, block), (n_blocks, n_kv_head, block, head_dim)
        # lazy: pools left unwritten (torch.empty), so the OS backs only the pages a forward
        # touches; for a stand-in with the real cache's every size, which compiling a decode
        # step beside a serving engine uses (serve/runner.py). Its keys are garbage until written.
        pool = torch.empty if lazy else torch.zeros
        self.keys = [pool(kshape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.values = [pool(vshape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.table = torch.zeros(slots, self.max_blocks, dtype=torch.long, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.owned: list[list[int]] = [[] for _ in range(slots)]  # row -> its blocks, in order
        self.refs = [0] * n_blocks
        self.free = list(range(n_blocks - 1, 0, -1))  # a stack: pop() hands out low ids first
        self.kept = 0  # blocks no row references that `retain` keeps (a prefix cache's idle blocks)
        self.evict = None  # () -> a block id freed from a cache of unused blocks, or None
        self.retain = None  # (block id) -> whether an unreferenced block stays cached (not freed)

    slots = KVCache.slots

    def usage(self) -> dict[str, int]:
        """Blocks by state: referenced by rows, kept idle for prefix caching, free (scratch excluded)."""
        free = len(self.free)
        return {"used": self.n_blocks - 1 - free - self.kept, "cached": self.kept, "free": free}

    @staticmethod
    def block_bytes(n_layer: int, n_kv_head: int, head_dim: int, dtype: torch.dtype, block: int = BLOCK) -> int:
        """Bytes of one block across every layer's keys and values."""
        return 2 * n_layer * n_kv_head * block * head_dim * dtype.itemsize

    # -- blocks ---------------------------------------------------------------
    def _take(self) -> int:
        if not self.free and self.evict is not None:
            b = self.evict()
            if b is not None:
                self.kept -= 1
                return b
        if not self.free:
            raise RuntimeError("paged KV cache: out of blocks")  # sized so this cannot happen
        return self.free.pop()

    def attach(self, row: int, blocks: list[int], tail: tuple[int, int] | None = None) -> None:
        """Start row `row` with shared `blocks` (full blocks of its prefix), refcounted; then, with
        `tail` = (block, n), the first n positions of that block, copied into a block of the row's
        own (a row writes past its length, so only full blocks are shared)."""
        assert not self.owned[row], "attach to a fresh row"
        for b in blocks:
            if self.refs[b] == 0:
                self.kept -= 1  # an idle kept block is in use again
            self.refs[b] += 1
        if blocks:
            self.table[row, :len(blocks)] = torch.tensor(blocks, device=self.table.device)
        self.owned[row] = list(blocks)
        self.lengths[row] = len(blocks) * self.block
        if tail is not None:
            src, n = tail
            self.refs[src] += 1  # not the block a full pool evicts to make room for the copy
            b = self._take()
            self.refs[src] -= 1
            for pool in (*self.keys, *self.values):
                pool[b].copy_(pool[src])  # the whole block: the row reads only its first n positions
            self.refs[b] = 1
            self.table[row, len(blocks)] = b
            self.owned[row].append(b)
            self.lengths[row] += n

    def reserve(self, rows: list[int], upto: list[int]) -> None:
        """Allocate blocks so row rows[i] holds positions [0, upto[i])."""
        for row, n in zip(rows, upto, strict=True):
            own = self.owned[row]
            need = -(-min(n, self.max_len) // self.block)
            while len(own) < need:
                b = self._take()
                self.refs[b] = 1
                self.table[row, len(own)] = b
                own.append(b)

    def release(self, row: int) -> None:
        """Row `row`'s sequence ended: drop its references (blocks a cache retains stay put)."""
        for b in self.owned[row]:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if self.retain is not None and self.retain(b):
                    self.kept += 1
                else:
                    self.free.append(b)
        self.owned[row] = []
        self.table[row] = 0
        self.lengths[row] = 0

    def reset(self, rows: Tensor) -> None:
        for row in rows.tolist():
            self.release(row)

    def move_row(self, src: int, dst: int) -> None:
        """Row src becomes row dst (dst released first): its table moves, not its keys."""
        self.release(dst)
        self.owned[dst], self.owned[src] = self.owned[src], []
        self.table[dst] = self.table[src]
        self.lengths[dst] = self.lengths[src]
        self.table[src] = 0
        self.lengths[src] = 0

    # -- what the model calls -------------------------------------------------
    advance = KVCache.advance  # lengths only: the same bookkeeping as the dense cache

    def step(self, rows: Tensor | None, T: int, rope: tuple[Tensor, Tensor] | None,
             key_pos: Tensor | None = None) -> PagedStep:
        return PagedStep(self, rows, T, rope)


class PagedStep:
    """One forward's indexing, shared by every layer: where each new position goes (block and
    offset), the rotary angles, and what attention reads."""

    def __init__(self, cache: PagedKVCache, rows: Tensor | None, T: int, rope: tuple[Tensor, Tensor] | None):
        self.cache, self.rows, self.T, self._rope = cache, rows, T, rope
        self._ready = False

    def _prepare(self, B: int) -> None:
        cache, T = self.cache, self.T
        device = cache.lengths.device
        if self.rows is None:
            start, table = cache.lengths[:B], cache.table[:B]
        else:
            start, table = cache.lengths[self.rows], cache.table[self.rows]
        self.table = table  # (B, max_blocks)
        self.pos = start[:, None] + torch.arange(T, device=device)  # (B, T)
        # Padding past max_len (a right-padded prefill) goes to the scratch block 0.
        bi = (self.pos // cache.block).clamp(max=cache.max_blocks - 1)
        self.blk = torch.where(self.pos < cache.max_len, table.gather(1, bi), 0)
        self.off = self.pos % cache.block
        self.lens = start + T
        if self._rope is not None:
            pos = self.pos.clamp(max=self._rope[0].shape[0] - 1)
            cos, sin = self._rope[0][pos][:, None], self._rope[1][pos][:, None]  # (B, 1, T, D/2)
            self.cos2, self.sin2 = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
        self.fresh = False
        if T > 1 and not torch.compiler.is_dynamo_compiling():
            end = int(self.lens.max())
            self.fresh = end == T  # every row starts at 0: causal attention over the chunk
            if not self.fresh:
                self.nb = -(-end // cache.block)
                key_pos = torch.arange(self.nb * cache.block, device=device)
                self.mask = (key_pos[None, None, :] <= self.pos[:, :, None])[:, None]  # (B, 1, T, L)
        self._ready = True

    def view(self, layer: int) -> PagedView:
        return PagedView(self, layer)


class PagedView:
    """One attention layer's access to a PagedKVCache."""

    def __init__(self, step: PagedStep, layer: int):
        self.step, self.layer = step, layer

    def attend(self, q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        st, cache = self.step, self.step.cache
        B, H, T, D = q.shape
        if not st._ready:
            st._prepare(B)
        kt, vp = cache.keys[self.layer], cache.values[self.layer]
        if (T == 1 and rope is not None and not cache.pairs and q.dtype == torch.float32 and q.device.type == "cpu"
                and _fused_ready()):
            # The fp32 decode step: RoPE, the cache write and attention in one kernel.
            y = torch.ops.exaflop.paged_decode_rope(q, k, v, st.cos2, st.sin2, kt, vp, st.table, st.lens,
                                                    st.blk, st.off)
            return y.reshape(B, H, 1, D)
        if rope is not None:
            q, k = _rope_qk(q, k, st.cos2, st.sin2)
        # Advanced indices separated by slices put (B, T) first: the values are (B, T, K, D).
        kw, vw = k.transpose(1, 2).to(kt.dtype), v.transpose(1, 2).to(vp.dtype)
        if cache.pairs:
            kt[st.blk, :, :, st.off] = kw.unflatten(-1, (D // 2, 2))
            vp[st.blk, :, st.off // 2, :, st.off % 2] = vw
        else:
            kt[st.blk, :, :, st.off] = kw
            vp[st.blk, :, st.off] = vw
        if st.fresh:
            return attend(q, k, v, None, causal=True)
        if T == 1:
            qd = kt.dtype if cache.pairs else torch.float32  # the kernel's two layouts (csrc/paged_attention.cpp)
            y = paged_decode(q.reshape(B, H, D).to(qd), kt, vp, st.table, st.lens)
            return y.reshape(B, H, 1, D).to(q.dtype)
        keys, vals = gather(kt, vp, st.table, st.nb)
        return attend(q, keys.to(q.dtype), vals.to(q.dtype), st.mask, causal=False)
