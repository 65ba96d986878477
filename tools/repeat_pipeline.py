"""Repeat a pipeline-parallel training run N times under torchrun (gloo) and compare every
step's loss with the single-process run: the reliability check behind offering a schedule.

    python tools/repeat_pipeline.py --schedule interleaved --runs 10 [--nproc 2] [--timeout 30]

Each run has a collective timeout (`parallel.timeout_s`) and a wall-clock limit, so a hang
shows up as a failed run, not a stuck check. Prints one line per run and a summary.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

BASE = ["model.n_layer=4", "model.d_model=64", "model.n_head=4", "model.n_kv_head=2", "model.vocab_size=320",
        "model.seq_len=32", "train.steps=10", "train.global_batch=8", "train.micro_batch=2", "train.log_every=1",
        "run.dtype=fp32", "run.threads=1", "run.tensorboard=false", "eval.batches=2"]


def losses(run: Path) -> dict[int, float]:
    recs = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schedule", default="interleaved", choices=["gpipe", "1f1b", "interleaved"])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=30.0, help="parallel.timeout_s of each run")
    args = ap.parse_args()
    from exaflop.lm.shards import build_text_dataset

    root = Path(tempfile.mkdtemp(prefix="pp_repeat_"))
    src = root / "corpus"
    src.mkdir()
    for f in sorted((Path(sysconfig.get_paths()["stdlib"]) / "json").glob("*.py")):
        shutil.copy(f, src / f.name)
    build_text_dataset(str(src), root / "data", vocab_size=300, quiet=True)
    sets = [*BASE, f"data.path={root / 'data'}", f"run.out_dir={root / 'runs'}"]

    def train(name: str, nproc: int, extra: list[str]) -> tuple[int, float]:
        cmd = [sys.executable, "-m", "exaflop", "train", "lm-tiny", "--quiet", "--nproc", str(nproc)]
        for s in [*sets, f"run.name={name}", *extra]:
            cmd += ["--set", s]
        t0 = time.time()
        try:
            rc = subprocess.run(cmd, capture_output=True, timeout=10 * args.timeout + 60).returncode
        except subprocess.TimeoutExpired:
            rc = -1
        return rc, time.time() - t0

    train("reference", 1, [])
    want = losses(root / "runs" / "reference")
    ok = 0
    for i in range(args.runs):
        rc, secs = train(f"r{i}", args.nproc, [f"parallel.pp={args.nproc}", f"parallel.pp_schedule={args.schedule}",
                                               f"parallel.timeout_s={args.timeout}"])
        got = losses(root / "runs" / f"r{i}") if rc == 0 else {}
        diff = max((abs(got[s] - want[s]) for s in want), default=float("inf")) if len(got) == len(want) else float("inf")
        good = rc == 0 and diff < 1e-3
        ok += good
        print(f"run {i}: exit {rc}, {secs:.1f}s, max |loss - reference| {diff:.2e} {'ok' if good else 'FAILED'}")
    print(f"{args.schedule}: {ok}/{args.runs} runs matched the single-process losses (tolerance 1e-3)")
    shutil.rmtree(root, ignore_errors=True)
    return 0 if ok == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
