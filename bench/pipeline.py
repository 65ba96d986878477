"""Pipeline parallel vs data parallel on 2 processes, and the measured pipeline bubble.

The lm-124m shape (12 layers, d 768, vocab 50304; sequence 256 here to keep a CPU step
short), the same global batch three ways, one intra-op thread per process:
  1 process            — the time a step's work takes on one core (t1);
  DP=2 (DDP)           — each process the whole model, half the batch;
  PP=2 (1F1B, m micro) — each process about half the layers, the whole batch in m micro-batches;
  PP=2 interleaved     — the layers in 4 stages, 2 per process (stages r and r + 2).
Reported: the trainer's own tokens/s (metrics.jsonl, median after the first interval) and
per-rank peak memory (max RSS on CPU). The idle share of a pipeline step is measured as
1 - (t1 / 2) / t_pp — everything that keeps the two stages from splitting the work
perfectly: the fill/drain bubble, stage imbalance and the stage-to-stage sends — and set
beside two predictions: the schedule's bubble (p - 1) / (v·m + p - 1) for equal stages (v = 1,
or 2 interleaved), and the form exaflop's planner uses (plan/cost.py: m micro-batches on the
busiest rank plus p - 1 fill/drain slots of one stage, t_rank · (m + (p - 1) / v)), here with
the split's own FLOP shares: the busiest rank's share L (the sum of its stages) and the
largest single stage's c, idle = 1 - (m / p) / (m·L + (p - 1)·c); for 1F1B L = c.
Usage:
    python bench/pipeline.py [--steps 4] [--micro-batches 4] [--dtype fp32|bf16]
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


def run(name: str, nproc: int, extra: list[str], data: Path, out: Path, a) -> tuple[float, list[float]]:
    sets = [f"data.path={data}", f"run.out_dir={out}", f"run.name={name}", f"train.steps={a.steps}",
            f"train.global_batch={a.micro_batches * a.micro_batch}", f"train.micro_batch={a.micro_batch}",
            "train.log_every=1", "run.threads=1", "run.tensorboard=false", "checkpoint.every=0",
            "eval.batches=2", f"model.seq_len={a.seq}", f"run.dtype={a.dtype}", *extra]
    if a.tiny:
        sets += ["model.n_layer=4", "model.d_model=64", "model.n_head=4", "model.vocab_size=1024"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "exaflop.train", "lm-124m", "--quiet"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "exaflop.train", "lm-124m", "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"{name} failed:\n{done.stderr[-2000:]}")
    recs = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"][1:]  # the first step: warm-up
    mem = train[-1].get("peak_mem_mb_per_rank", [train[-1]["peak_mem_mb"]])
    return statistics.median(r["tokens_per_s"] for r in train), mem


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--micro-batches", type=int, default=4, help="per step (PP's m; DP gets m/2 per rank)")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--tiny", action="store_true", help="a seconds-long rehearsal (smoke test); numbers mean nothing")
    a = ap.parse_args()
    if a.tiny:
        a.steps, a.seq = 3, 32
    from exaflop.config import load_config
    from exaflop.engine.pipeline import bubble_fraction
    from exaflop.engine.precision import cpu_capability
    from exaflop.lm.parallel_plan import stage_split
    from exaflop.lm.shards import build_text_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        build_text_dataset("stdlib", data, vocab_size=1024, max_bytes=300_000 if a.tiny else 2_000_000, quiet=True)
        runs = Path(tmp) / "runs"
        one, mem1 = run("one", 1, [], data, runs, a)
        dp, mem_dp = run("dp2", 2, ["parallel.mode=ddp"], data, runs, a)
        pp, mem_pp = run("pp2", 2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"], data, runs, a)
        ppi, mem_ppi = run("pp2i", 2, ["parallel.pp=2", "parallel.pp_schedule=interleaved"], data, runs, a)
    m = a.micro_batches
    shape = "tiny" if a.tiny else "lm-124m shape"
    print(f"{shape}, seq {a.seq}, {a.dtype}, global batch {m} x {a.micro_batch}, 1 thread per process; "
          f"CPU: {cpu_capability()}")
    print(f"  1 process : {one:9,.0f} tokens/s   peak RSS {mem1[0]:,.0f} MB")
    print(f"  DP=2 (DDP): {dp:9,.0f} tokens/s   peak RSS per rank {', '.join(f'{x:,.0f}' for x in mem_dp)} MB")
    print(f"  PP=2 1F1B : {pp:9,.0f} tokens/s   peak RSS per rank {', '.join(f'{x:,.0f}' for x in mem_pp)} MB")
    print(f"  PP=2 int. : {ppi:9,.0f} tokens/s   peak RSS per rank {', '.join(f'{x:,.0f}' for x in mem_ppi)} MB")
    sizes = ["model.n_layer=4", "model.d_model=64", "model.n_head=4", "model.vocab_size=1024"] if a.tiny else []
    mcfg = load_config("lm-124m", [f"model.seq_len={a.seq}", *sizes]).model
    for name, rate, v in (("1F1B", pp, 1), ("interleaved", ppi, 2)):
        idle = 1 - rate / (2 * one)  # 1 - (t1 / 2) / t_pp, with t = tokens / (tokens/s)
        stages, shares = stage_split(mcfg, 2 * v, ranks=2)
        per_rank = [sum(shares[r + k * 2] for k in range(v)) for r in range(2)]
        planner = 1 - (m / 2) / (m * max(per_rank) + max(shares))
        print(f"{name}: stage split {[len(r) for r in stages]} layers, FLOP shares "
              f"{', '.join(f'{x:.3f}' for x in shares)}")
        print(f"  idle share: measured {idle:.1%} vs planner form (busiest rank) {planner:.1%}, "
              f"equal-stage bubble (p-1)/(v·m+p-1) {bubble_fraction(2, m, v):.1%}")
    print(f"PP=2 / DP=2 tokens/s: 1F1B {pp / dp:.2f}x, interleaved {ppi / dp:.2f}x")


if __name__ == "__main__":
    main()
