"""Training throughput: exaflop vs a plain PyTorch loop over HF transformers' Llama, same shape.

Measures in one run, on this machine:
  1. the bf16 matmul peak (GFLOP/s) — the MFU denominator;
  2. exaflop's trainer on the `lm-small` shape (seq 256, micro-batch 8, vocab 8192, bf16 autocast);
  3. a plain loop (AdamW, bf16 autocast) over `LlamaForCausalLM` of the same shape.
Prints tokens/s, MFU and the ratio. Usage:
    python bench/train_throughput.py [--steps 40] [--threads 2] [--no-compile]
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


# Square sizes plus the lm-small matmuls (tokens x width x hidden); the best rate is the peak.
PEAK_SHAPES = ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096), (2048, 384, 1024),
               (2048, 1024, 384), (2048, 384, 1152), (2048, 384, 8192), (2048, 8192, 384))


# --tiny: a seconds-long rehearsal of the whole script (the smoke test); its numbers mean nothing.
TINY_SETS = ["model.n_layer=1", "model.d_model=64", "model.n_head=2", "model.n_kv_head=2", "model.d_ff=128",
             "model.seq_len=32", "train.log_every=1"]


def matmul_peak(seconds: float = 1.0, shapes: tuple = PEAK_SHAPES) -> tuple[float, dict]:
    """The machine's bf16 matmul peak: the best of a sweep of shapes (GFLOP/s per shape too)."""
    rates = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=torch.bfloat16)
        b = torch.randn(k, n, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        iters, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            iters += 1
        rates[(m, k, n)] = 2 * m * k * n * iters / (time.perf_counter() - t0)
    return max(rates.values()), rates


def exaflop_tokens_per_s(steps: int, tmp: Path, compile: bool = False, sets: tuple = ()) -> float:
    from exaflop.config import load_config
    from exaflop.engine.telemetry import read_metrics
    from exaflop.engine.trainer import train
    from exaflop.lm.shards import build_text_dataset

    data = tmp / "data"
    if not (data / "manifest.json").exists():
        build_text_dataset("stdlib", data, vocab_size=8192, max_bytes=3_000_000, quiet=True)
    cfg = load_config("lm-small", [f"data.path={data}", f"run.out_dir={tmp}", f"run.name=bench-{compile}",
                                   f"run.compile={str(compile).lower()}",
                                   "train.global_batch=8", "train.micro_batch=8", "train.global_batch_tokens=0",
                                   f"train.steps={steps}", "train.log_every=5", "eval.every=0", "eval.batches=1",
                                   "checkpoint.every=0", "run.tensorboard=false", *sets])
    train(cfg, quiet=True)
    # The first window holds warm-up (and, compiled, the compilation): skip it.
    rates = [r["tokens_per_s"] for r in read_metrics(cfg.run_dir) if r["kind"] == "train"][1:]
    return statistics.median(rates)


def hf_tokens_per_s(steps: int, sets: tuple = ()) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    from exaflop.config import load_config

    m = load_config("lm-small", list(sets)).model
    hf = LlamaConfig(vocab_size=8192, hidden_size=m.d_model, intermediate_size=m.d_ff,
                     num_hidden_layers=m.n_layer, num_attention_heads=m.n_head,
                     num_key_value_heads=m.n_kv_head, max_position_embeddings=m.seq_len,
                     tie_word_embeddings=True, rms_norm_eps=m.norm_eps, attn_implementation="sdpa")
    model = LlamaForCausalLM(hf)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.randint(0, 8192, (8, m.seq_len))
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 8 * m.seq_len / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="skip the torch.compile run (it costs ~30 s of compilation)")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long rehearsal (smoke test); numbers mean nothing")
    args = ap.parse_args()
    sets = tuple(TINY_SETS) if args.tiny else ()
    name = "tiny" if args.tiny else "lm-small"
    if args.tiny:
        args.steps, args.compile = 5, False
    if args.threads:
        torch.set_num_threads(args.threads)
    from exaflop.config import load_config
    from exaflop.lm.model import flops_per_token

    small = load_config("lm-small", ["model.vocab_size=8192", *sets]).model
    fpt = flops_per_token(small)
    peak, rates = matmul_peak(0.01, ((128, 128, 128),)) if args.tiny else matmul_peak()
    with tempfile.TemporaryDirectory() as tmp:
        ours = exaflop_tokens_per_s(args.steps, Path(tmp), sets=sets)
        ours_c = exaflop_tokens_per_s(args.steps, Path(tmp), compile=True) if args.compile else 0.0
    theirs = hf_tokens_per_s(args.steps, sets)
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}, {fpt / 1e6:.1f} MFLOP/token")
    print("bf16 matmul GFLOP/s by shape (M,K,N): "
          + ", ".join(f"{s}: {r / 1e9:.0f}" for s, r in rates.items()))
    print(f"bf16 matmul peak (best shape)     {peak / 1e9:8.1f} GFLOP/s")
    print(f"exaflop {name:8} (eager)          {ours:8.0f} tokens/s   MFU {100 * ours * fpt / peak:5.1f}%")
    if ours_c:
        print(f"exaflop {name:8} (torch.compile)  {ours_c:8.0f} tokens/s   MFU {100 * ours_c * fpt / peak:5.1f}%")
    print(f"transformers Llama loop (eager)   {theirs:8.0f} tokens/s   MFU {100 * theirs * fpt / peak:5.1f}%")
    print(f"ratio exaflop eager / transformers: {ours / theirs:.2f}x")
    if ours_c:
        print(f"ratio exaflop compiled / transformers: {ours_c / theirs:.2f}x")


if __name__ == "__main__":
    main()
