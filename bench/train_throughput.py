"""Training throughput: exaflop vs a plain PyTorch loop over HF transformers' Llama, same shape.

Measures in one run, on this machine:
  1. the bf16 matmul peak (GFLOP/s) — the MFU denominator;
  2. exaflop's trainer on the `lm-small` shape (seq 256, micro-batch 8, vocab 8192, bf16 autocast);
  3. a plain loop (AdamW, bf16 autocast) over `LlamaForCausalLM` of the same shape.
Prints tokens/s, MFU and the ratio. Usage:
    python bench/train_throughput.py [--steps 30] [--threads 2]
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


def matmul_peak(n: int = 2048, seconds: float = 3.0) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def exaflop_tokens_per_s(steps: int, tmp: Path) -> float:
    from exaflop.config import load_config
    from exaflop.engine.telemetry import read_metrics
    from exaflop.engine.trainer import train
    from exaflop.lm.shards import build_text_dataset

    data = tmp / "data"
    build_text_dataset("stdlib", data, vocab_size=8192, max_bytes=3_000_000, quiet=True)
    cfg = load_config("lm-small", [f"data.path={data}", f"run.out_dir={tmp}", "run.name=bench",
                                   "train.global_batch=8", "train.micro_batch=8", "train.global_batch_tokens=0",
                                   f"train.steps={steps}", "train.log_every=5", "eval.every=0", "eval.batches=1",
                                   "checkpoint.every=0", "run.tensorboard=false"])
    train(cfg, quiet=True)
    rates = [r["tokens_per_s"] for r in read_metrics(cfg.run_dir) if r["kind"] == "train"][1:]
    return statistics.median(rates)


def hf_tokens_per_s(steps: int) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    from exaflop.config import load_config

    m = load_config("lm-small").model
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
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from exaflop.config import load_config
    from exaflop.lm.model import flops_per_token

    small = load_config("lm-small", ["model.vocab_size=8192"]).model
    fpt = flops_per_token(small)
    peak = matmul_peak()
    with tempfile.TemporaryDirectory() as tmp:
        ours = exaflop_tokens_per_s(args.steps, Path(tmp))
    theirs = hf_tokens_per_s(args.steps)
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"bf16 matmul peak           {peak / 1e9:8.1f} GFLOP/s")
    print(f"exaflop lm-small           {ours:8.0f} tokens/s   MFU {100 * ours * fpt / peak:5.1f}%")
    print(f"transformers Llama loop    {theirs:8.0f} tokens/s   MFU {100 * theirs * fpt / peak:5.1f}%")
    print(f"ratio exaflop / transformers: {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
