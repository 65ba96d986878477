"""A whole decode step through the dense KV cache vs the paged one the server uses.

The server's KV cache is paged (nn/paged.py: refcounted 16-position blocks, a block table per
row, decode attention read in place by a C++ kernel), so that sequences share prompt blocks
instead of copying them. The model can also decode through a dense cache (nn/decode.py: a
(slots, K, max_len, D) tensor per layer, attention over a view of each row), the layout
exaflop served from before. This times the step the server runs — packed weights, every layer,
the block reservation the runner does each step — through both, at lm-124m's shape, 1 / 8 / 32
rows, 160 and 1000 cached positions, eager and (--compile) compiled, in the precision serving
picks on this CPU. The paged rows' blocks are scattered through the pool, as after some churn.
Prints milliseconds per step and paged / dense (below 1: the paged cache is faster).
    python bench/kv_layout.py [--context 160,1000] [--rows 1,8,32] [--compile] [--dtype auto] [--tiny]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from exaflop.config import load_config  # noqa: E402
from exaflop.engine.precision import cpu_capability, resolve  # noqa: E402
from exaflop.lm.model import LM  # noqa: E402
from exaflop.nn.packed import lower_packed_linear, pack_for_inference  # noqa: E402
from exaflop.nn.paged import PagedKVCache, paged_kernel  # noqa: E402


def step_time(m: LM, cache, rows: int, ctx: int, step, reps: int) -> float:
    """Median seconds per decode step of `rows` rows holding `ctx` positions (kept there: each
    timed step decodes at the same length)."""
    paged = isinstance(cache, PagedKVCache)
    if paged:
        cache.reserve(list(range(rows)), [ctx + 1] * rows)
    x = torch.randint(0, m.cfg.vocab_size, (rows, 1))

    def one() -> None:
        cache.lengths[:rows] = ctx
        if paged:  # what Runner.decode does every step
            lengths = cache.lengths.tolist()
            cache.reserve(list(range(rows)), [lengths[i] + 1 for i in range(rows)])
        m.decode(x, cache, None, step=step)

    for _ in range(3):
        one()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        one()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,8,32", help="decode rows (concurrent sequences)")
    ap.add_argument("--context", default="160,1000", help="cached positions per row")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--compile", action="store_true", help="also the torch.compile'd step (serve --compile)")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long rehearsal (smoke test); numbers mean nothing")
    args = ap.parse_args()
    overrides = ["model.vocab_size=8192"]
    if args.tiny:
        args.rows, args.context, args.reps = "1,2", "40", 3
        overrides += ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.seq_len=128"]
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = resolve(args.dtype, "cpu", flag="--dtype").torch_dtype
    cfg = load_config("lm-124m", overrides).model
    torch.manual_seed(0)
    m = pack_for_inference(LM(cfg).to(dtype).eval())
    t0 = time.perf_counter()
    kernel = paged_kernel()
    print(f"CPU: {cpu_capability()}, torch threads {torch.get_num_threads()}, {dtype}; lm-124m shape "
          f"({cfg.n_layer} layers, {cfg.n_head} heads of {cfg.head_dim}); paged attention "
          + (f"kernel ready in {time.perf_counter() - t0:.1f} s" if kernel else "kernel unavailable: gathering"))
    ctxs = [int(c) for c in args.context.split(",")]
    rows_list = [int(r) for r in args.rows.split(",")]
    slots, max_len = max(rows_list), max(ctxs) + 8
    modes = [("eager", None)]
    if args.compile:
        # As the server compiles it (serve/runner.py): a C++ wrapper once packed linears lower to oneDNN.
        opts = {"cpp_wrapper": True} if lower_packed_linear() else None
        modes.append(("compiled", torch.compile(LM.logits_at, dynamic=True, options=opts)))
    print(f"{'step':>9} {'rows':>5} {'context':>8} {'dense ms':>9} {'paged ms':>9} {'paged/dense':>12}")
    ratios = []
    with torch.inference_mode():
        dense = m.new_cache(slots, max_len)
        paged = PagedKVCache(cfg.n_layer, slots, cfg.n_kv_head, max_len, cfg.head_dim, dtype=dtype)
        random.Random(0).shuffle(paged.free)  # blocks scattered through the pool
        for name, step in modes:
            for ctx in ctxs:
                for rows in rows_list:
                    for row in range(slots):
                        paged.release(row)
                    d = step_time(m, dense, rows, ctx, step, args.reps)
                    p = step_time(m, paged, rows, ctx, step, args.reps)
                    ratios.append(p / d)
                    print(f"{name:>9} {rows:>5} {ctx:>8} {d * 1e3:>9.2f} {p * 1e3:>9.2f} {p / d:>11.2f}x", flush=True)
    print(f"paged / dense step time: median {statistics.median(ratios):.2f}x, worst {max(ratios):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
