"""Expert parallel vs replicated experts on 2 processes: step time and expert memory per rank.

The same 2-process training of the lm-moe-tiny preset (8 experts, top-2), once with every
expert on both ranks (parallel.ep=1) and once with the experts split (parallel.ep=2: four
per rank, tokens exchanged by all-to-all), under the same wrapper (DDP by default, so only
the experts differ: FSDP would shard them in both). One intra-op thread per process.
Reported: the trainer's own tokens/s (metrics.jsonl, median after the first interval) and
the parameter elements rank 0 holds (its `params_local`), from which the expert share
follows. Usage:
    python bench/moe_ep.py [--steps 30] [--mode ddp|fsdp] [--micro-batch 8] [--experts 8]
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


def run(ep: int, data: Path, out: Path, a) -> tuple[float, int]:
    name = f"ep{ep}"
    sets = [f"data.path={data}", f"run.out_dir={out}", f"run.name={name}", f"train.steps={a.steps}",
            f"train.global_batch={2 * a.micro_batch}", f"train.micro_batch={a.micro_batch}",
            f"train.log_every={2 if a.tiny else 5}", "run.threads=1", "run.tensorboard=false",
            "checkpoint.every=0", "eval.batches=1", f"parallel.mode={a.mode}", f"parallel.ep={ep}",
            f"model.n_experts={a.experts}", "model.vocab_size=1024", f"run.dtype={a.dtype}"]
    sets += ["model.seq_len=32"] if a.tiny else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "exaflop.train", "lm-moe-tiny", "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"parallel.ep={ep} run failed:\n{done.stderr[-2000:]}")
    recs = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in recs if r["kind"] == "train"][1:]  # first interval: warm-up
    params = next(r["params_local"] for r in recs if r["kind"] == "run")
    return statistics.median(rates), params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--mode", default="ddp", choices=["ddp", "fsdp"])
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--tiny", action="store_true", help="a seconds-long rehearsal (smoke test); numbers mean nothing")
    a = ap.parse_args()
    if a.tiny:
        a.steps, a.micro_batch = 4, 1
    from exaflop.config import load_config
    from exaflop.engine.precision import cpu_capability
    from exaflop.lm.shards import build_text_dataset

    m = load_config("lm-moe-tiny", [f"model.n_experts={a.experts}"]).model
    experts = m.n_layer * 3 * m.n_experts * m.d_model * m.d_ff
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        build_text_dataset("stdlib", data, vocab_size=1024, max_bytes=300_000 if a.tiny else 3_000_000, quiet=True)
        one, p1 = run(1, data, Path(tmp) / "runs", a)
        two, p2 = run(2, data, Path(tmp) / "runs", a)
    seq = 32 if a.tiny else m.seq_len
    print(f"lm-moe-tiny ({m.n_experts} experts, top-{m.top_k}, d {m.d_model}, expert d_ff {m.d_ff}, vocab 1024), "
          f"{a.dtype}, micro-batch {a.micro_batch} x {seq} tokens per process, {a.mode}, 2 processes x 1 thread; "
          f"CPU: {cpu_capability()}")
    print(f"  ep=1 (experts replicated): {one:9,.0f} tokens/s   rank 0 holds {p1:,} parameters")
    print(f"  ep=2 (experts split)     : {two:9,.0f} tokens/s   rank 0 holds {p2:,} parameters")
    if a.mode == "ddp":  # DDP splits nothing but the experts: the difference is theirs
        print(f"expert weights per rank: {experts:,} -> {experts - (p1 - p2):,} ({(experts - (p1 - p2)) / experts:.2f}x)")
    print(f"step-time ratio ep=2 / ep=1: {one / two:.2f}x (tokens/s ep=2 vs ep=1: {two / one:.2f}x)")


if __name__ == "__main__":
    main()
