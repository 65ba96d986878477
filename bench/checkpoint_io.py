"""Checkpoint save/load time for the 124m preset: the engine's DCP checkpoints vs torch.save.

One process, one run, the same state both ways: the lm-124m model and its AdamW
moments after one step (~1.4 GB). Each measurement is repeated (--repeat) and the
median is reported:
  * torch.save / torch.load of {"model", "optim"} state dicts to one file;
  * sync save: `Checkpointer.save` (DCP shards + meta.json + atomic rename + `latest`);
  * async save: the time `Checkpointer.save` blocks the training loop; the time until
    the state is copied to the staging buffers (a background thread, overlapped with the
    next step's forward/backward; the trainer waits for it before optimizer.step); and
    the time until it is on disk;
  * load: `Checkpointer.load` into a fresh model and optimizer.
Targets (issue 3): sync save <= 1.5x torch.save; async blocking <= 20% of sync save.
Usage:
    python bench/checkpoint_io.py [--dir /tmp] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def build(cfg):
    import torch

    from exaflop.engine.optim import build_optimizer
    from exaflop.lm.model import LM

    model = LM(cfg.model)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # materialise the AdamW moments
    opt.zero_grad(set_to_none=True)
    return model, opt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", default="lm-124m", help="the model whose state is saved")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long rehearsal (smoke test); numbers mean nothing")
    a = ap.parse_args()
    if a.tiny:
        a.preset, a.repeat = "lm-tiny", 1
    import torch

    from exaflop.config import load_config
    from exaflop.engine.checkpoint import Checkpointer
    from exaflop.engine.runtime import rng_state

    torch.set_num_threads(a.threads)
    cfg = load_config(a.preset, ["run.device=cpu"])
    model, opt = build(cfg)
    root = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=a.dir))
    meta = {"step": 1}
    t: dict[str, list[float]] = {k: [] for k in ("torch_save", "torch_load", "sync_save", "async_block",
                                                 "async_staged", "async_total", "load")}
    # One checkpointer of each kind for the whole run, as in training: the async one reuses its
    # staging buffers from the second save on. Iteration 0 is a warm-up and is not counted.
    ck = Checkpointer(root / "sync", keep=1)
    ak = Checkpointer(root / "async", keep=1, async_save=True)
    try:
        for i in range(a.repeat + 1):
            f = root / "plain.pt"
            t0 = time.perf_counter()
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, f)
            t["torch_save"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            torch.load(f, weights_only=True)
            t["torch_load"].append(time.perf_counter() - t0)
            size_gb = f.stat().st_size / 1e9
            f.unlink()

            t0 = time.perf_counter()
            ck.save(model, opt, {**meta, "step": i + 1}, rng_state())
            t["sync_save"].append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            t["async_block"].append(ak.save(model, opt, {**meta, "step": i + 1}, rng_state()))
            ak.wait_staged()  # the trainer does this before the next optimizer.step()
            t["async_staged"].append(time.perf_counter() - t0)
            ak.wait()
            t["async_total"].append(time.perf_counter() - t0)

            fresh, fresh_opt = build(cfg)
            t0 = time.perf_counter()
            ck.load(fresh, fresh_opt)
            t["load"].append(time.perf_counter() - t0)
            assert torch.equal(fresh.tok_emb.weight, model.tok_emb.weight)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    m = {k: statistics.median(v[1:]) for k, v in t.items()}
    print(f"{a.preset} model + AdamW state, {size_gb:.2f} GB, median of {a.repeat}, dir {a.dir}")
    for k, v in m.items():
        print(f"  {k:12} {v:7.2f} s   (each: {', '.join(f'{x:.2f}' for x in t[k][1:])})")
    print(f"sync save / torch.save: {m['sync_save'] / m['torch_save']:.2f}x (target <= 1.5x)")
    print(f"async blocking / sync save: {m['async_block'] / m['sync_save']:.0%} (target <= 20%)")
    print(f"load / torch.load: {m['load'] / m['torch_load']:.2f}x")


if __name__ == "__main__":
    main()
