"""Decode attention over exaflop's dense per-slot KV cache vs a paged one (a block pool + block table).

Why this exists: the API issue asks for a paged, refcounted KV cache (vLLM's PagedAttention), so
that running sequences share prompt blocks in memory. On CPU PyTorch has no attention kernel that
reads keys through a block table; without writing one, a paged cache has to gather each row's
blocks into a contiguous tensor every layer of every step before attention. This measures that
cost against what exaflop does (attention reads a view of each row's dense cache; shared prefixes
are copied in once per request, serve/prefix.py), at lm-124m's attention shape (12 layers,
12 heads of 64), 1 / 8 / 32 rows, in the precision serving picks on this CPU:
  dense  — `_decode_attention` (nn/decode.py) on a view of a (slots, K, max_len, D) cache;
  paged  — blocks of 16 positions in a (blocks, 16, K, D) pool, each row's blocks scattered
           (as a pool is after some churn), gathered with `index_select` (the fastest gather
           measured; advanced indexing `pool[table]` is ~2x slower), then the same attention;
  paged, compiled (--compile) — the gather and the attention written for inductor, which can
           fuse the indirect reads into its attention loop (no copy).
Prints microseconds per decode step (all 12 layers, keys and values) and paged / dense.
    python bench/kv_layout.py [--context 160,1000] [--rows 1,8,32] [--compile] [--tiny]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from exaflop.engine.precision import cpu_capability, resolve  # noqa: E402
from exaflop.nn.decode import _decode_attention, _decode_attention_fused  # noqa: E402

BLOCK = 16


def timeit(fn, reps: int) -> float:
    """Median seconds per call over `reps` calls (after a warm-up)."""
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def case(rows: int, ctx: int, layers: int, heads: int, dim: int, dtype: torch.dtype, reps: int,
         compile_: bool) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    nb = -(-ctx // BLOCK)
    L = nb * BLOCK
    q = torch.randn(rows, heads, 1, dim, generator=g).to(dtype)
    mask = (torch.arange(L) < ctx)[None, None, None, :].expand(rows, 1, 1, L)
    dense_k = [torch.randn(rows, heads, L, dim, generator=g).to(dtype) for _ in range(layers)]
    dense_v = [torch.randn(rows, heads, L, dim, generator=g).to(dtype) for _ in range(layers)]
    pool_blocks = rows * nb * 2  # half the pool free: rows' blocks end up scattered
    pool_k = [torch.randn(pool_blocks, BLOCK, heads, dim, generator=g).to(dtype) for _ in range(layers)]
    pool_v = [torch.randn(pool_blocks, BLOCK, heads, dim, generator=g).to(dtype) for _ in range(layers)]
    table = torch.randperm(pool_blocks, generator=g)[:rows * nb]  # (rows * nb,) flattened block table

    def gather(pool: torch.Tensor) -> torch.Tensor:
        return pool.index_select(0, table).view(rows, L, heads, dim).transpose(1, 2)

    def dense() -> None:
        for k, v in zip(dense_k, dense_v, strict=True):
            _decode_attention(q, k, v, mask)

    def paged() -> None:
        for pk, pv in zip(pool_k, pool_v, strict=True):
            _decode_attention(q, gather(pk), gather(pv), mask)

    out = {"dense": timeit(dense, reps), "paged": timeit(paged, reps)}
    if compile_:
        def paged_fused(q, pk, pv, table, mask):  # noqa: ANN001, ANN202
            k = pk[table].view(rows, L, heads, dim).transpose(1, 2)
            v = pv[table].view(rows, L, heads, dim).transpose(1, 2)
            return _decode_attention_fused(q.reshape(rows, heads, 1, dim), k, v, mask)

        def dense_fused(q, k, v, mask):  # noqa: ANN001, ANN202
            return _decode_attention_fused(q.reshape(rows, heads, 1, dim), k, v, mask)

        cp, cd = torch.compile(paged_fused), torch.compile(dense_fused)
        out["dense compiled"] = timeit(lambda: [cd(q, k, v, mask) for k, v in zip(dense_k, dense_v, strict=True)],
                                       reps)
        out["paged compiled"] = timeit(lambda: [cp(q, pk, pv, table, mask)
                                                for pk, pv in zip(pool_k, pool_v, strict=True)], reps)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,8,32", help="decode rows (concurrent sequences)")
    ap.add_argument("--context", default="160,1000", help="cached positions per row")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--compile", action="store_true", help="also the inductor-compiled dense and paged reads")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long rehearsal (smoke test); numbers mean nothing")
    args = ap.parse_args()
    layers, heads, dim = 12, 12, 64
    if args.tiny:
        args.rows, args.context, args.reps, layers, heads, dim = "1,2", "40", 3, 2, 2, 16
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = resolve(args.dtype, "cpu", flag="--dtype").torch_dtype
    print(f"CPU: {cpu_capability()}, torch threads {torch.get_num_threads()}, {dtype}; {layers} layers x {heads} "
          f"heads x {dim}, blocks of {BLOCK}; microseconds per decode step (all layers)")
    cols = ["dense", "paged"] + (["dense compiled", "paged compiled"] if args.compile else [])
    print(f"{'rows':>5} {'context':>8} " + " ".join(f"{c:>15}" for c in cols) + f" {'paged/dense':>12}"
          + (f" {'compiled p/d':>13}" if args.compile else ""))
    worst = 0.0
    with torch.inference_mode():
        for ctx in (int(c) for c in args.context.split(",")):
            for rows in (int(r) for r in args.rows.split(",")):
                r = case(rows, ctx, layers, heads, dim, dtype, args.reps, args.compile)
                ratio = r["paged"] / r["dense"]
                worst = max(worst, ratio)
                line = f"{rows:>5} {ctx:>8} " + " ".join(f"{r[c] * 1e6:>15.0f}" for c in cols) + f" {ratio:>11.2f}x"
                if args.compile:
                    line += f" {r['paged compiled'] / r['dense compiled']:>12.2f}x"
                print(line, flush=True)
    print(f"paged / dense attention time, worst case: {worst:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
