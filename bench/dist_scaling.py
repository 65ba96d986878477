"""Data-parallel scaling on this machine: tokens/s with 1 vs 2 processes of 1 thread each.

Weak scaling, as data parallelism is used: every process trains the same micro-batch
per step (the global batch grows with the process count), one intra-op thread each,
so 2 processes use 2 cores where 1 uses one. The trainer's own `tokens_per_s` (from
metrics.jsonl, after the first logged interval) is compared; efficiency is
tokens/s(2) / (2 × tokens/s(1)). The model is the lm-tiny preset's (4 layers, d 128,
seq 256) on a corpus built here from the standard library.
Usage:
    python bench/dist_scaling.py [--steps 40] [--mode ddp|fsdp] [--micro-batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def run(nproc: int, data: Path, out: Path, steps: int, mode: str, micro: int, tiny: bool = False) -> float:
    name = f"scale{nproc}"
    sets = [f"data.path={data}", f"run.out_dir={out}", f"run.name={name}", f"train.steps={steps}",
            f"train.global_batch={micro * nproc}", f"train.micro_batch={micro}", f"train.log_every={2 if tiny else 10}",
            "run.threads=1", "run.tensorboard=false", "checkpoint.every=0", "eval.batches=1",
            f"parallel.mode={mode}", "model.vocab_size=1024"] + (["model.seq_len=32"] if tiny else [])
    if nproc == 1:
        cmd = [sys.executable, "-m", "exaflop.train", "lm-tiny", "--quiet"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "exaflop.train", "lm-tiny", "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"{nproc}-process run failed:\n{done.stderr[-2000:]}")
    recs = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in recs if r["kind"] == "train"][1:]  # first interval: warm-up
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--mode", default="ddp", choices=["ddp", "fsdp"])
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--tiny", action="store_true", help="a seconds-long rehearsal (smoke test); numbers mean nothing")
    a = ap.parse_args()
    if a.tiny:
        a.steps, a.micro_batch = 4, 1
    from exaflop.lm.shards import build_text_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        build_text_dataset("stdlib", data, vocab_size=1024, max_bytes=300_000 if a.tiny else 3_000_000, quiet=True)
        one = run(1, data, Path(tmp) / "runs", a.steps, a.mode, a.micro_batch, a.tiny)
        two = run(2, data, Path(tmp) / "runs", a.steps, a.mode, a.micro_batch, a.tiny)
    print(f"lm-tiny (vocab 1024), micro-batch {a.micro_batch} x 256 tokens per process, "
          f"{a.mode}, 1 thread per process")
    print(f"  1 process : {one:9,.0f} tokens/s")
    print(f"  2 processes: {two:9,.0f} tokens/s")
    print(f"scaling efficiency: {two / (2 * one):.0%} (speed-up {two / one:.2f}x on 2 cores)")


if __name__ == "__main__":
    main()
