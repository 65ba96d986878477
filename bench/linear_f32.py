"""Decoding in fp32 on AVX2: exaflop's decode kernel against MKL's sgemm, the products alone and
the whole decode step, at the rows a decode step has (one per running sequence).

fp32 is what `--dtype auto` serves on CPUs without fast bf16. Where PyTorch dispatches to AVX2,
`nn/packed.py` sends a decode step's rows through `nn/csrc/linear_f32.cpp` instead of
`F.linear` (MKL). This times, at lm-124m's shape (12 layers, width 768, SwiGLU 2048, vocab
4096 — as the serving benchmark's model):
  products  the step's 49 matrices (fused q/k/v, out, fused gate/up, down per layer, and the
            head; 352 MB of fp32), R rows each, through either;
  step      the whole decode step as the server runs it (paged cache, the block reservation
            per step), eager and (--compile) compiled, one model per kernel;
  operator  what `serve --compile auto` decodes with there: the whole step as one operator
            (lm/fused_step.py, nn/csrc/decode_f32.cpp) against MKL's step (compiled with --compile,
            else eager);
  schemes   the operator streaming its weights as in 2 MB pages against as in 4 KB pages (the
            same numbers; nn/csrc/linear_f32.h wide_scheme), where the weights got huge pages.
Large tensors get transparent huge pages as `serve` gives them (engine/host_memory.py).
The two alternate in rounds (medians over rounds, and the median of each round's own ratio).
Below 1: exaflop's kernel is faster. On an AVX-512 machine, hold it to AVX2 as an AVX2-only CPU:
    MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 \\
        python bench/linear_f32.py [--rows 1,8,32] [--compile] [--tiny]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from linear_row import decode_step, rounds  # noqa: E402

from exaflop.config import load_config  # noqa: E402
from exaflop.engine.host_memory import huge_page_share, huge_pages_for_large_tensors  # noqa: E402
from exaflop.engine.precision import cpu_capability  # noqa: E402
from exaflop.lm.fused_step import fused_step  # noqa: E402
from exaflop.lm.model import LM  # noqa: E402
from exaflop.nn.packed import PackedLinear, f32_rows_kernel, pack_for_inference  # noqa: E402
from exaflop.nn.paged import paged_kernel  # noqa: E402


def mkl_logits(*args):  # noqa: ANN002, ANN201 — one compiled step per model, as each server has one
    return LM.logits_at(*args)


def kernel_logits(*args):  # noqa: ANN002, ANN201
    return LM.logits_at(*args)


def _scheme(huge: bool):  # noqa: ANN202 — the operator step, its products streamed as for `huge` pages
    step = functools.partial(fused_step, huge_pages=huge)
    step.needs_key_pos = False
    return step


def report(name: str, t: dict[str, list[float]]) -> float:
    a, b = statistics.median(t["MKL"]), statistics.median(t["exaflop"])
    paired = statistics.median(y / x for x, y in zip(t["MKL"], t["exaflop"], strict=True))
    print(f"{name:>22} {a * 1e3:>9.2f} {b * 1e3:>11.2f} {b / a:>8.2f}x {paired:>8.2f}x", flush=True)
    return paired


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,8,32", help="comma-separated rows (running sequences) per step")
    ap.add_argument("--context", type=int, default=160, help="cached positions of each row")
    ap.add_argument("--rounds", type=int, default=8, help="alternating rounds per case")
    ap.add_argument("--calls", type=int, default=10, help="calls per round")
    ap.add_argument("--compile", action="store_true", help="also the torch.compile'd step (what serve runs)")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long rehearsal (smoke test); numbers mean nothing")
    args = ap.parse_args()
    overrides = ["model.vocab_size=4096", "model.d_ff=2048", "model.tie_embeddings=false"]
    if args.tiny:
        args.rounds, args.calls, args.context, args.rows = 2, 2, 40, "1,3"
        overrides += ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.seq_len=128"]
    huge = huge_pages_for_large_tensors()  # before the first large tensor, as serve does
    print(f"CPU: {cpu_capability()}, torch threads {torch.get_num_threads()}; huge pages for large tensors: {huge}")
    if not f32_rows_kernel():
        # Not an error: here (AVX-512 dispatch, or no compiler) fp32 decoding uses MKL alone.
        print("the fp32 decode kernel does not run here (it needs PyTorch dispatching to AVX2: cap an AVX-512 "
              "machine with ATEN_CPU_CAPABILITY=avx2): nothing to compare; exaflop / MKL: n/a")
        return 0
    cfg = load_config("lm-124m", overrides).model
    torch.manual_seed(0)
    base = LM(cfg).eval()
    models = {"MKL": pack_for_inference(copy.deepcopy(base)), "exaflop": pack_for_inference(base)}
    for lin in models["MKL"].modules():
        if isinstance(lin, PackedLinear):
            lin.f32_rows = False  # F.linear, as before the kernel
    paged_kernel()
    mats = {k: [m for m in models[k].modules() if isinstance(m, PackedLinear)] for k in models}
    nbytes = sum(lin.weight.numel() * 4 for lin in mats["exaflop"])
    in_huge = huge_page_share(lin.weight for lin in mats["exaflop"])
    print(f"lm-124m shape ({cfg.n_layer} layers, width {cfg.d_model}, vocab {cfg.vocab_size}), fp32; "
          f"{len(mats['exaflop'])} matrices, {nbytes / 1e6:.0f} MB ({in_huge:.0%} in huge pages); "
          f"context {args.context}")
    print(f"{'':>22} {'MKL ms':>9} {'exaflop ms':>11} {'ratio':>9} {'paired':>9}")
    steps = {"eager": {"MKL": None, "exaflop": None}}
    if args.compile:
        steps["compiled"] = {"MKL": torch.compile(mkl_logits, dynamic=True),
                             "exaflop": torch.compile(kernel_logits, dynamic=True)}
    summary = []
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            xs = {lin.weight.shape[1]: torch.randn(rows, 1, lin.weight.shape[1]) for lin in mats["exaflop"]}
            fns = {k: (lambda ms=ms, xs=xs: [lin(xs[lin.weight.shape[1]]) for lin in ms]) for k, ms in mats.items()}
            t = rounds(fns, args.rounds, args.calls)
            ratios = [report(f"{rows} rows: products", t)]
            print(f"{'':>22} exaflop {nbytes / statistics.median(t['exaflop']) / 1e9:.1f} GB/s, "
                  f"{2 * rows * nbytes / 4 / statistics.median(t['exaflop']) / 1e9:.0f} GFLOP/s; MKL "
                  f"{nbytes / statistics.median(t['MKL']) / 1e9:.1f} GB/s, "
                  f"{2 * rows * nbytes / 4 / statistics.median(t['MKL']) / 1e9:.0f} GFLOP/s")
            for mode, compiled in steps.items():
                fns = {k: decode_step(models[k], compiled[k], cfg, args.context, rows, torch.float32) for k in models}
                ratios.append(report(f"{rows} rows: step, {mode}", rounds(fns, args.rounds, args.calls)))
            fns = {"MKL": decode_step(models["MKL"], steps["compiled" if args.compile else "eager"]["MKL"], cfg,
                                      args.context, rows, torch.float32),
                   "exaflop": decode_step(models["exaflop"], fused_step, cfg, args.context, rows, torch.float32)}
            ratios.append(report(f"{rows} rows: operator", rounds(fns, args.rounds, args.calls)))
            line = (f"{rows} rows: products {ratios[0]:.2f}x, step {', '.join(f'{r:.2f}x' for r in ratios[1:-1])}, "
                    f"operator {ratios[-1]:.2f}x")
            if in_huge >= 0.5:  # "MKL" column: the 4 KB-page scheme, "exaflop": the 2 MB-page one
                fns = {"MKL": decode_step(models["exaflop"], _scheme(False), cfg, args.context, rows, torch.float32),
                       "exaflop": decode_step(models["exaflop"], _scheme(True), cfg, args.context, rows, torch.float32)}
                schemes = report(f"{rows} rows: 2MB/4KB scheme", rounds(fns, args.rounds, args.calls))
                line += f" (its 2 MB-page scheme / its 4 KB-page one {schemes:.2f}x)"
            summary.append(line)
    print(f"exaflop / MKL (paired medians; below 1: exaflop's kernel is faster): {'; '.join(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
