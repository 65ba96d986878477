"""Where a training step's time goes: torch.profiler over exaflop's lm-small step on this CPU.

    python tools/profile_train_step.py                 # compiled, bf16 where `auto` picks it
    python tools/profile_train_step.py --eager --steps 5
    python tools/profile_train_step.py --kernels       # compiled: each inductor kernel by name

The step is the trainer's (engine/step.py's clipping and fused AdamW, the model compiled with
the C++ wrapper as engine/trainer.py does, freed host buffers kept), on random tokens of
lm-small's batch (8 x 256). Prints the median step time and the profiler's table by self time;
docs/benchmarks.md reads these tables. Not a benchmark (bench/train_throughput.py is).
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

BATCH = 8  # bench/train_throughput.py's


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eager", action="store_true", help="profile the eager step (default: compiled)")
    ap.add_argument("--steps", type=int, default=5, help="profiled steps (after warm-up and 15 timed ones)")
    ap.add_argument("--kernels", action="store_true", help="name each compiled kernel in the table")
    ap.add_argument("--rows", type=int, default=40, help="table rows")
    args = ap.parse_args()
    if args.kernels:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True

    from exaflop.config import load_config
    from exaflop.engine.host_memory import keep_freed_memory
    from exaflop.engine.optim import build_optimizer
    from exaflop.engine.precision import resolve
    from exaflop.engine.step import clip
    from exaflop.lm.model import LM

    keep_freed_memory()
    torch.manual_seed(0)
    cfg = load_config("lm-small", [])
    precision = resolve("auto", "cpu", flag="--dtype")
    model = LM(cfg.model)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    step_model = model if args.eager else torch.compile(model, options={"cpp_wrapper": True})
    rt = SimpleNamespace(distributed=False)
    B, T = BATCH, cfg.model.seq_len
    x, y = torch.randint(0, cfg.model.vocab_size, (2, B, T))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.name == "bf16"):
            _, loss = step_model(x, y)
        loss.backward()
        clip(model, cfg.optim.grad_clip, rt, opt)
        opt.step()
        opt.__dict__.pop("grad_scale", None)
        opt.zero_grad(set_to_none=True)

    for _ in range(4):  # warm-up (and compilation)
        step()
    times = []
    for _ in range(15):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    print(f"lm-small {'eager' if args.eager else 'compiled'} {precision.name}: median step {ms:.1f} ms "
          f"({B * T / ms * 1e3:,.0f} tokens/s), min {min(times) * 1e3:.1f} ms")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    print(f"per {args.steps} steps:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
