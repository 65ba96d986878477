"""Decoding one sequence in bf16: exaflop's one-row kernel against oneDNN's, the products alone
and the whole decode step.

At one row a linear layer is a pass over its weights. `nn/packed.py` keeps bf16 matrices
packed for oneDNN (what batches use) and, where the CPU has AVX512-BF16, a row-major copy for
exaflop's own kernel (`nn/csrc/linear_row.cpp`), which one-row products use. This times, at
lm-124m's shape (12 layers, width 768, SwiGLU 2048, vocab 4096, bf16 weights — as the
serving benchmark's model):
  products  the step's 49 matrices (fused q/k/v, out, fused gate/up, down per layer, and the
            head; 182 MB, more than the CPU's caches hold apart from the largest L3s), one
            row each, through either kernel;
  step      the whole decode step as the server runs it (packed weights, paged cache, the
            block reservation per step), eager and (--compile) compiled, one model per
            kernel.
The two alternate in rounds (medians over rounds, and the median of each round's own ratio),
so a noisy VM's slow minutes fall on both. Below 1: the one-row kernel is faster.
`--int8`: the same for `--quantize int8` weights, exaflop's one-row int8 kernel against
`aten._weight_int8pack_mm` (what int8 uses from two rows on, and used at one row before).
    python bench/linear_row.py [--compile] [--int8] [--rounds 12] [--tiny]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from exaflop.config import load_config  # noqa: E402
from exaflop.engine.precision import cpu_capability  # noqa: E402
from exaflop.lm.model import LM  # noqa: E402
from exaflop.nn.packed import (  # noqa: E402
    PackedLinear,
    int8_row_kernel,
    lower_packed_linear,
    pack_for_inference,
    row_kernel,
)
from exaflop.nn.paged import PagedKVCache, paged_kernel  # noqa: E402


# One compiled step per model, as each server has one (dynamo keeps graphs per code object).
def onednn_logits(*args):  # noqa: ANN002, ANN201
    return LM.logits_at(*args)


def row_logits(*args):  # noqa: ANN002, ANN201
    return LM.logits_at(*args)


def rounds(fns: dict[str, Callable[[], None]], n_rounds: int, calls: int) -> dict[str, list[float]]:
    """Seconds per call of each fn in each of n_rounds alternating rounds of `calls` calls."""
    for fn in fns.values():
        for _ in range(2):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(n_rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[k].append((time.perf_counter() - t0) / calls)
    return times


def report(name: str, t: dict[str, list[float]], unit: float = 1e3) -> float:
    base = next(k for k in t if k != "one-row")
    a, b = statistics.median(t[base]), statistics.median(t["one-row"])
    paired = statistics.median(y / x for x, y in zip(t[base], t["one-row"], strict=True))
    print(f"{name:>18} {a * unit:>10.2f} {b * unit:>10.2f} {b / a:>8.2f}x {paired:>8.2f}x", flush=True)
    return paired


def decode_step(m: LM, step, cfg, ctx: int, rows: int = 1, dtype: torch.dtype = torch.bfloat16) -> Callable[[], None]:
    """One decode step of `rows` rows holding `ctx` positions each (kept there: each call decodes at
    the same length), with the block reservation the runner makes every step."""
    cache = PagedKVCache(cfg.n_layer, max(rows, 2), cfg.n_kv_head, ctx + 16, cfg.head_dim, dtype=dtype)
    cache.reserve(list(range(rows)), [ctx + 1] * rows)
    x = torch.full((rows, 1), 7)

    def one() -> None:
        cache.lengths[:rows] = ctx
        lengths = cache.lengths.tolist()
        cache.reserve(list(range(rows)), [lengths[i] + 1 for i in range(rows)])
        m.decode(x, cache, None, step=step)

    return one


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=160, help="cached positions of the decoded row")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=12, help="alternating rounds per case")
    ap.add_argument("--calls", type=int, default=20, help="calls per round")
    ap.add_argument("--compile", action="store_true", help="also the torch.compile'd step (serve --compile)")
    ap.add_argument("--int8", action="store_true", help="int8 weights: the one-row int8 kernel vs _weight_int8pack_mm")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long rehearsal (smoke test); numbers mean nothing")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = ["model.vocab_size=4096", "model.d_ff=2048", "model.tie_embeddings=false"]
    if args.tiny:
        args.rounds, args.calls, args.context = 2, 2, 40
        overrides += ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.seq_len=128"]
    print(f"CPU: {cpu_capability()}, torch threads {torch.get_num_threads()}")
    if not (int8_row_kernel() if args.int8 else row_kernel()):
        # Not an error: on this CPU (or this capped process) serving uses oneDNN alone.
        print("the one-row kernel does not run here (bf16 needs AVX512-BF16, int8 AVX-512 BW, and PyTorch "
              "dispatching to AVX-512): nothing to compare; one-row / baseline: n/a")
        return 0
    cfg = load_config("lm-124m", overrides).model
    torch.manual_seed(0)
    base = LM(cfg).to(torch.bfloat16).eval()
    if args.int8:
        baseline = "int8pack_mm"
        models = {baseline: pack_for_inference(copy.deepcopy(base), quantize="int8"),
                  "one-row": pack_for_inference(base, quantize="int8")}
        for lin in models[baseline].modules():
            if isinstance(lin, PackedLinear):
                lin.int8_row = False  # one row through _weight_int8pack_mm, as before the kernel
    else:
        baseline = "oneDNN"
        models = {baseline: pack_for_inference(copy.deepcopy(base), single_row=False),
                  "one-row": pack_for_inference(base, single_row=True)}
    paged_kernel()
    mats = {k: [m for m in models[k].modules() if isinstance(m, PackedLinear)] for k in models}
    # Each product's input width (the baseline model's matrices mirror the one-row model's).
    widths = [(lin.qweight if args.int8 else lin.row).shape[1] for lin in mats["one-row"]]
    nbytes = sum((lin.qweight.numel() if args.int8 else lin.row.numel() * 2) for lin in mats["one-row"])
    print(f"lm-124m shape ({cfg.n_layer} layers, width {cfg.d_model}, vocab {cfg.vocab_size}), "
          f"{'int8 weights, bf16 activations' if args.int8 else 'bf16'}; "
          f"{len(mats['one-row'])} matrices, {nbytes / 1e6:.0f} MB; context {args.context}")
    print(f"{'':>18} {baseline + ' ms':>16} {'one-row ms':>10} {'ratio':>9} {'paired':>9}")
    ratios = []
    with torch.inference_mode():
        xs = {d: torch.randn(1, 1, d).to(torch.bfloat16) for d in {cfg.d_model, cfg.d_ff}}
        fns = {k: (lambda ms=ms: [lin(xs[w]) for lin, w in zip(ms, widths, strict=True)]) for k, ms in mats.items()}
        t = rounds(fns, args.rounds, args.calls)
        ratios.append(report("products", t))
        print(f"{'':>18} one-row kernel reads {nbytes / statistics.median(t['one-row']) / 1e9:.1f} GB/s, "
              f"{baseline} {nbytes / statistics.median(t[baseline]) / 1e9:.1f} GB/s")
        steps = {"eager": {baseline: None, "one-row": None}}
        if args.compile:
            opts = {"cpp_wrapper": True} if lower_packed_linear() else None  # as serve/runner.py compiles it
            steps["compiled"] = {baseline: torch.compile(onednn_logits, dynamic=True, options=opts),
                                 "one-row": torch.compile(row_logits, dynamic=True, options=opts)}
        for mode, compiled in steps.items():
            fns = {k: decode_step(models[k], compiled[k], cfg, args.context) for k in models}
            ratios.append(report(f"step, {mode}", rounds(fns, args.rounds, args.calls)))
    print(f"one-row / {baseline}: products {ratios[0]:.2f}x, whole step {', '.join(f'{r:.2f}x' for r in ratios[1:])} "
          "(paired medians; below 1: the one-row kernel is faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
