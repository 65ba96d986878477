"""Precision on this CPU: fp32 vs bf16 matmul rates, and lm-small training with auto / fp32 / bf16.

Measures in one run, on this machine:
  1. the matmul GFLOP/s of fp32 and bf16 over a sweep of shapes (the trainer's MFU sweep
     plus lm-small's own matmuls), and what `run.dtype = auto`'s quick probe decides;
  2. exaflop's trainer on the lm-small shape (seq 256, micro-batch 8, vocab 8192) with
     run.dtype = auto, fp32 and bf16.
Target: auto within 5% of the faster of fp32 and bf16. Where bf16 is emulated (AVX2-only
CPUs: ~100x slower matmuls) the bf16 run is cut to --slow-steps steps so it finishes.

    python bench/precision.py [--steps 30] [--slow-steps 4] [--threads 0]
Reproduce an AVX2-only CPU on an AVX-512 one: ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

SHAPES = ((256, 256, 256), (1024, 1024, 1024), (2048, 384, 1024), (2048, 1024, 384), (2048, 384, 8192))
# --tiny: a seconds-long rehearsal of the whole script (the smoke test); its numbers mean nothing.
TINY_SHAPES = ((64, 64, 64), (128, 128, 128))
TINY_SETS = ["model.n_layer=1", "model.d_model=64", "model.n_head=2", "model.n_kv_head=2", "model.d_ff=128",
             "model.seq_len=32", "train.global_batch=2", "train.micro_batch=2"]


def matmul_gflops(dtype: torch.dtype, shape: tuple[int, int, int], seconds: float = 0.3) -> float:
    m, k, n = shape
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    iters, t0 = 0, time.perf_counter()
    while iters == 0 or time.perf_counter() - t0 < seconds:  # at least one timed call
        a @ b
        iters += 1
    return 2 * m * k * n * iters / (time.perf_counter() - t0) / 1e9


def train_tokens_per_s(dtype: str, steps: int, tmp: Path, tiny: bool = False) -> tuple[float, str, float]:
    """(median tokens/s after the first window, resolved dtype, MFU) of the real trainer."""
    from exaflop.config import load_config
    from exaflop.engine.telemetry import read_metrics
    from exaflop.engine.trainer import train
    from exaflop.lm.shards import build_text_dataset

    data = tmp / "data"
    if not (data / "manifest.json").exists():
        build_text_dataset("stdlib", data, vocab_size=512 if tiny else 8192,
                           max_bytes=300_000 if tiny else 3_000_000, quiet=True)
    cfg = load_config("lm-small", [f"data.path={data}", f"run.out_dir={tmp}", f"run.name=bench-{dtype}",
                                   f"run.dtype={dtype}", "train.global_batch=8", "train.micro_batch=8",
                                   "train.global_batch_tokens=0", f"train.steps={steps}",
                                   f"train.log_every={max(1, steps // 6)}", "eval.every=0", "eval.batches=1",
                                   "checkpoint.every=0", "run.tensorboard=false"]
                      + (TINY_SETS + ["model.vocab_size=512"] if tiny else []))
    train(cfg, quiet=True)
    recs = [r for r in read_metrics(cfg.run_dir) if r["kind"] == "train"]
    rates = [r["tokens_per_s"] for r in recs[1:]] or [recs[-1]["tokens_per_s"]]
    return statistics.median(rates), recs[-1]["dtype"], recs[-1]["mfu"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--slow-steps", type=int, default=4, help="steps for a dtype measured >5x slower")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="a seconds-long rehearsal (smoke test); numbers mean nothing")
    args = ap.parse_args()
    if args.tiny:
        args.steps, args.slow_steps = 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    from exaflop.engine.precision import cpu_capability, matmul_rates, resolve

    cpu = cpu_capability()
    print(f"CPU: {cpu}; torch {torch.__version__}")
    print(f"{'matmul (M,K,N)':>22} {'fp32 GFLOP/s':>13} {'bf16 GFLOP/s':>13} {'bf16/fp32':>10}")
    best = {"fp32": 0.0, "bf16": 0.0}
    for shape in TINY_SHAPES if args.tiny else SHAPES:
        r32 = matmul_gflops(torch.float32, shape)
        # an emulated bf16 matmul of a few GFLOP takes seconds: one timed call is enough there
        emulated = best["bf16"] and best["bf16"] * 5 < best["fp32"]
        r16 = matmul_gflops(torch.bfloat16, shape, seconds=0.0 if emulated else 0.3)  # 0.0: one call
        best["fp32"], best["bf16"] = max(best["fp32"], r32), max(best["bf16"], r16)
        print(f"{str(shape):>22} {r32:13.1f} {r16:13.1f} {r16 / r32:9.2f}x")
    print(f"{'best':>22} {best['fp32']:13.1f} {best['bf16']:13.1f} {best['bf16'] / best['fp32']:9.2f}x")
    probe = matmul_rates("cpu")
    auto = resolve("auto", "cpu", probe)
    print(f"auto's probe: {auto.describe()}  [{cpu}]")

    slow = "bf16" if best["bf16"] * 5 < best["fp32"] else ("fp32" if best["fp32"] * 5 < best["bf16"] else "")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("fp32", "bf16", "auto"):
            steps = args.slow_steps if dtype == slow else args.steps
            out[dtype] = train_tokens_per_s(dtype, steps, Path(tmp), args.tiny)
            tps, resolved, mfu = out[dtype]
            print(f"{'tiny' if args.tiny else 'lm-small'} run.dtype={dtype:<5} ({resolved}, {steps} steps) {tps:9.0f} tokens/s  "
                  f"MFU {100 * mfu:5.1f}%  [{cpu}]")
    faster = max(out["fp32"][0], out["bf16"][0])
    print(f"auto / faster of fp32 and bf16: {out['auto'][0] / faster:.3f}  (target >= 0.95)  [{cpu}]")


if __name__ == "__main__":
    main()
