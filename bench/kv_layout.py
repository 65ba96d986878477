"""A whole decode step through the dense KV cache vs the paged one the server uses.

The server's KV cache is paged (nn/paged.py: refcounted 16-position blocks, a block table per
row, decode attention read in place by a C++ kernel), so that sequences share prompt blocks
instead of copying them. The model can also decode through a dense cache (nn/decode.py: a
(slots, K, max_len, D) tensor per layer, attention over a view of each row), the layout
exaflop served from before. This times the step the server runs — packed weights, every layer,
the block reservation the runner does each step — through both, at lm-124m's shape, 1 / 8 / 32
rows, 160 and 1000 cached positions, eager and (--compile) compiled, in the precision serving
picks on this CPU. The paged rows' blocks are scattered through the pool, as after some churn.
Dense and paged alternate in rounds (medians over rounds), so a noisy VM's slow minutes hit
both. Prints milliseconds per step and paged / dense (below 1: the paged cache is faster).
`--attention`: layer 0's decode attention alone instead (the kernel against the dense path's
attention on the same keys), in microseconds.
    python bench/kv_layout.py [--context 160,1000] [--rows 1,8,32] [--compile | --attention] [--tiny]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from exaflop.config import load_config  # noqa: E402
from exaflop.engine.precision import cpu_capability, resolve  # noqa: E402
from exaflop.lm.model import LM  # noqa: E402
from exaflop.nn.decode import _decode_attention  # noqa: E402
from exaflop.nn.packed import lower_packed_linear, pack_for_inference  # noqa: E402
from exaflop.nn.paged import PagedKVCache, gather, paged_decode, paged_kernel  # noqa: E402


# One compiled step per cache type, as in a server (which only has the paged one): dynamo keeps
# compiled graphs per code object, and sharing one between the two cache types would charge
# each call the other's failed guard checks.
def dense_logits(*args):  # noqa: ANN002, ANN201
    return LM.logits_at(*args)


def paged_logits(*args):  # noqa: ANN002, ANN201
    return LM.logits_at(*args)


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per call of each fn, timed in alternating rounds of `steps` calls, so the
    VM's slow and fast minutes fall on every contestant alike."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times[k].append((time.perf_counter() - t0) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def decode_step(m: LM, cache, rows: int, ctx: int, step) -> Callable[[], None]:
    """One decode step of `rows` rows holding `ctx` positions (kept there: each call decodes at
    the same length)."""
    paged = isinstance(cache, PagedKVCache)
    if paged:
        for row in range(cache.slots):
            cache.release(row)
        cache.reserve(list(range(rows)), [ctx + 1] * rows)
    x = torch.randint(0, m.cfg.vocab_size, (rows, 1))

    def one() -> None:
        cache.lengths[:rows] = ctx
        if paged:  # what Runner.decode does every step
            lengths = cache.lengths.tolist()
            cache.reserve(list(range(rows)), [lengths[i] + 1 for i in range(rows)])
        m.decode(x, cache, None, step=step)

    return one


def attention_only(cache: PagedKVCache, cfg, rows: int, ctx: int, dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    """Layer 0's decode attention alone: the paged kernel on the pool, and the dense path's
    (`_decode_attention`) on the same keys laid out contiguously."""
    for row in range(cache.slots):
        cache.release(row)
    cache.reserve(list(range(rows)), [ctx] * rows)
    g = torch.Generator().manual_seed(0)
    keys, values = cache.keys[0], cache.values[0]
    keys.copy_(torch.randn(keys.shape, generator=g).to(dtype))
    values.copy_(torch.randn(values.shape, generator=g).to(dtype))
    table, lens = cache.table[:rows], torch.full((rows,), ctx)
    nb = -(-ctx // cache.block)
    k, v = gather(keys, values, table, nb)
    k, v = k[:, :, :ctx].contiguous(), v[:, :, :ctx].contiguous()
    q = torch.randn(rows, cfg.n_head, 1, cfg.head_dim, generator=g).to(dtype)
    mask = torch.ones(rows, 1, 1, ctx, dtype=torch.bool)
    q3 = q[:, :, 0].contiguous()
    return {"dense": lambda: _decode_attention(q, k, v, mask),
            "paged": lambda: paged_decode(q3, keys, values, table, lens)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,8,32", help="decode rows (concurrent sequences)")
    ap.add_argument("--context", default="160,1000", help="cached positions per row")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=10, help="alternating rounds per case")
    ap.add_argument("--steps", type=int, default=10, help="calls per round")
    ap.add_argument("--attention", action="store_true", help="time layer 0's decode attention alone instead")
    ap.add_argument("--compile", action="store_true", help="also the torch.compile'd step (serve --compile)")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long rehearsal (smoke test); numbers mean nothing")
    args = ap.parse_args()
    overrides = ["model.vocab_size=8192"]
    if args.tiny:
        args.rows, args.context, args.rounds, args.steps = "1,2", "40", 2, 2
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
    modes = [("attention" if args.attention else "eager", (None, None))]
    if args.compile and not args.attention:
        # As the server compiles it (serve/runner.py): a C++ wrapper once packed linears lower to oneDNN.
        opts = {"cpp_wrapper": True} if lower_packed_linear() else None
        modes.append(("compiled", tuple(torch.compile(f, dynamic=True, options=opts)
                                        for f in (dense_logits, paged_logits))))
    unit = "us" if args.attention else "ms"
    print(f"{'':>9} {'rows':>5} {'context':>8} {'dense ' + unit:>9} {'paged ' + unit:>9} {'paged/dense':>12}")
    ratios = []
    with torch.inference_mode():
        dense = m.new_cache(slots, max_len)
        paged = PagedKVCache(cfg.n_layer, slots, cfg.n_kv_head, max_len, cfg.head_dim, dtype=dtype)
        random.Random(0).shuffle(paged.free)  # blocks scattered through the pool
        for name, (dense_step, paged_step) in modes:
            for ctx in ctxs:
                for rows in rows_list:
                    if args.attention:
                        fns = attention_only(paged, cfg, rows, ctx, dtype)
                    else:
                        fns = {"dense": decode_step(m, dense, rows, ctx, dense_step),
                               "paged": decode_step(m, paged, rows, ctx, paged_step)}
                    t = interleaved(fns, args.rounds, args.steps)
                    d, p = (t[k] * (1e6 if args.attention else 1e3) for k in ("dense", "paged"))
                    ratios.append(p / d)
                    print(f"{name:>9} {rows:>5} {ctx:>8} {d:>9.2f} {p:>9.2f} {p / d:>11.2f}x", flush=True)
    print(f"paged / dense {'attention' if args.attention else 'step'} time: median {statistics.median(ratios):.2f}x, worst {max(ratios):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
