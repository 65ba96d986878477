"""What losing a replica costs: shrink-and-continue (`--elastic`) vs torchrun's restart from the
last checkpoint, on the same run.

Three runs of lm-tiny on 3 DDP replicas (1 thread each; the machine has fewer cores, so
absolute times are slow — the differences are the point), the same global batch, checkpoints
every `--ckpt-every` steps:
  uninterrupted       — the baseline wall time;
  elastic             — replica 1 SIGKILLed before step K; the other two re-form and go on;
  torchrun restart    — the same kill under `--max-restarts 1`: the whole group restarts and
                        resumes from the newest checkpoint, redoing the steps since;
  elastic + rejoin    — `--elastic --max-restarts 1`: the survivors go on, and a replacement
                        joins at the first step boundary after it is ready, with rank 0's
                        state by broadcast.
Reported: wall time of each and the extra over the baseline, and the elastic runs' own
`stall_s` (from their reconfigure records). Usage:
    python bench/elastic.py [--steps 30] [--kill-at 17] [--ckpt-every 10] [--replicas 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def run(name: str, extra: list[str], fault: str | None, data: Path, out: Path, a) -> tuple[float, list[dict]]:
    sets = [f"data.path={data}", f"run.out_dir={out}", f"run.name={name}", f"train.steps={a.steps}",
            "train.global_batch=12", "train.micro_batch=2", "train.log_every=1", "run.threads=1",
            "run.tensorboard=false", f"checkpoint.every={a.ckpt_every}", "eval.batches=1", "parallel.mode=ddp",
            "parallel.timeout_s=10", "model.vocab_size=1024", "run.dtype=fp32"]
    sets += ["model.seq_len=32"] if a.tiny else []
    cmd = [sys.executable, "-m", "exaflop", "train", "lm-tiny", "--nproc", str(a.replicas), "--quiet", *extra]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fault:
        env["EXAFLOP_FAULT"] = fault
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"{name} failed:\n{done.stderr[-2000:]}")
    return wall, [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--kill-at", type=int, default=17, help="0-based step before which replica 1 dies")
    ap.add_argument("--ckpt-every", type=int, default=10)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="a seconds-long rehearsal (smoke test); numbers mean nothing")
    a = ap.parse_args()
    if a.tiny:
        a.steps, a.kill_at, a.ckpt_every, a.replicas = 5, 3, 2, 2  # 2 -> 1: also the lone-survivor path
    from exaflop.engine.precision import cpu_capability
    from exaflop.lm.shards import build_text_dataset

    fault = f"sigkill@rank1:step{a.kill_at}"
    with tempfile.TemporaryDirectory() as tmp:
        data, runs = Path(tmp) / "data", Path(tmp) / "runs"
        build_text_dataset("stdlib", data, vocab_size=1024, max_bytes=300_000 if a.tiny else 2_000_000, quiet=True)
        base, _ = run("uninterrupted", [], None, data, runs, a)
        el, recs = run("elastic", ["--elastic"], fault, data, runs, a)
        tr, _ = run("restart", ["--max-restarts", "1"], fault, data, runs, a)
        # The rehearsal skips the rejoin run: its 5 steps end before a replacement could start.
        rj, rj_recs = run("rejoin", ["--elastic", "--max-restarts", "1"], fault, data, runs, a) if not a.tiny \
            else (float("nan"), [])
    stall = next(r["stall_s"] for r in recs if r["kind"] == "reconfigure")
    grow = [r for r in rj_recs if r["kind"] == "reconfigure" and r.get("joined")]
    redone = a.kill_at - (a.kill_at // a.ckpt_every) * a.ckpt_every
    print(f"lm-tiny, {a.replicas} DDP replicas x 1 thread, {a.steps} steps, checkpoint every {a.ckpt_every}, "
          f"replica 1 killed before step {a.kill_at}; CPU: {cpu_capability()}")
    print(f"  uninterrupted   : {base:6.1f} s")
    print(f"  elastic (shrink): {el:6.1f} s  (+{el - base:.1f} s; group re-formed in {stall:.2f} s, "
          f"then {a.replicas - 1} for the rest)")
    print(f"  torchrun restart: {tr:6.1f} s  (+{tr - base:.1f} s; all processes restarted, {redone} steps redone "
          f"from the checkpoint)")
    if a.tiny:
        pass
    elif grow:
        g = grow[0]
        print(f"  elastic + rejoin: {rj:6.1f} s  (+{rj - base:.1f} s; replacement {g['joined']} joined after step "
              f"{g['step']}, group paused {g['stall_s']:.2f} s for {g['state_bytes'] / 1e6:.1f} MB of optimizer state)")
    else:
        print(f"  elastic + rejoin: {rj:6.1f} s  (+{rj - base:.1f} s; the run ended before the replacement was ready)")
    # On fewer cores than replicas the shrunk group can even finish sooner: print both, not a ratio.
    print(f"extra time lost, restart / shrink: {tr - base:+.1f} s / {el - base:+.1f} s")


if __name__ == "__main__":
    main()
