"""Per-rank memory of the 124m preset under DDP vs FSDP2 on 2 processes (CPU, gloo).

For each mode, launches `torchrun --nproc-per-node=2` on this file; every rank builds
the lm-124m model, wraps it with the engine's `parallelize`, runs a few optimizer steps
on random tokens and reports
  * state bytes: parameters + gradients + AdamW moments this rank holds (exact, summed
    over the local tensors: FSDP2 holds 1/2 of each, DDP all of it);
  * peak RSS: the process's maximum resident memory (includes activations, buffers,
    the Python/torch runtime).
Prints both per mode and the FSDP2/DDP ratios. The sequence is shortened (--seq) so a
CPU step takes seconds; parameter, gradient and optimizer memory do not depend on it.
Usage:
    python bench/dist_memory.py [--seq 128] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")


def worker(mode: str, seq: int, steps: int, out: str, preset: str) -> None:
    import torch

    from exaflop.config import load_config
    from exaflop.engine import runtime as rtm
    from exaflop.engine.optim import build_optimizer
    from exaflop.engine.parallel import clip_grad_norm, parallelize
    from exaflop.engine.task import build_task
    from exaflop.engine.telemetry import peak_mem_mb
    from exaflop.lm.model import LM

    cfg = load_config(preset, [f"parallel.mode={mode}", "run.dtype=fp32", "run.threads=1",
                                  f"model.seq_len={seq}", "run.device=cpu"])
    rt = rtm.setup(cfg)
    model = parallelize(LM(cfg.model), build_task(cfg), cfg, rt)
    opt = build_optimizer(model, cfg.optim, rt.device)
    gen = torch.Generator().manual_seed(rt.rank)
    for _ in range(steps):
        x = torch.randint(0, cfg.model.vocab_size, (1, seq + 1), generator=gen)
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        clip_grad_norm(list(model.parameters()), 1.0)
        opt.step()
        # Keep the gradients for the count below (zero_grad would free them).
    local = [(p.to_local() if hasattr(p, "to_local") else p) for p in model.parameters()]
    grads = [(p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad) for p in model.parameters()]
    moments = [t for st in opt.state.values() for k, t in st.items() if k in ("exp_avg", "exp_avg_sq")]
    moments = [t.to_local() if hasattr(t, "to_local") else t for t in moments]

    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    # Tied embedding/LM head is one parameter: count storages once.
    params = {t.untyped_storage().data_ptr(): t for t in local}
    rec = {"rank": rt.rank, "mode": mode, "params_mb": nbytes(params.values()) / 2**20,
           "grads_mb": nbytes(grads) / 2**20, "optim_mb": nbytes(moments) / 2**20,
           "peak_rss_mb": peak_mem_mb()}
    rec["state_mb"] = rec["params_mb"] + rec["grads_mb"] + rec["optim_mb"]
    with open(f"{out}.rank{rt.rank}", "w") as f:
        json.dump(rec, f)
    torch.distributed.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="lm-124m")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long rehearsal (smoke test); numbers mean nothing")
    a = ap.parse_args()
    if a.tiny:
        a.preset, a.seq, a.steps = "lm-tiny", 32, 1
    if a.worker:
        return worker(a.worker, a.seq, a.steps, a.out, a.preset)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("ddp", "fsdp"):
            out = os.path.join(tmp, mode)
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node=2", __file__, "--worker", mode, "--out", out,
                            "--seq", str(a.seq), "--steps", str(a.steps), "--preset", a.preset], env=env, check=True)
            results[mode] = [json.load(open(f"{out}.rank{r}")) for r in range(2)]
    print(f"{a.preset}, 2 processes, seq {a.seq}, {a.steps} steps (MB per rank)")
    print(f"{'mode':6} {'rank':>4} {'params':>8} {'grads':>8} {'AdamW':>8} {'state':>8} {'peak RSS':>9}")
    for mode, recs in results.items():
        for r in recs:
            print(f"{mode:6} {r['rank']:>4} {r['params_mb']:8.0f} {r['grads_mb']:8.0f} {r['optim_mb']:8.0f} "
                  f"{r['state_mb']:8.0f} {r['peak_rss_mb']:9.0f}")
    state = {m: max(r["state_mb"] for r in recs) for m, recs in results.items()}
    rss = {m: max(r["peak_rss_mb"] for r in recs) for m, recs in results.items()}
    print(f"FSDP2/DDP per-rank state memory: {state['fsdp'] / state['ddp']:.2f}x; "
          f"peak RSS: {rss['fsdp'] / rss['ddp']:.2f}x")


if __name__ == "__main__":
    main()
