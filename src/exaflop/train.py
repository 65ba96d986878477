"""`torchrun -m exaflop.train CONFIG [--set k=v] [--resume]`: the cluster entry point."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from exaflop.errors import UserError


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    p = argparse.ArgumentParser(prog="exaflop.train")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--resume", action="store_true")
    p.add_argument("--auto-resume", action="store_true",
                   help="resume when the run has a complete checkpoint, else start fresh (for "
                        "requeued Slurm jobs and restarted pods: one command for both cases)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--record-samples", action="store_true",
                   help="write runs/<name>/samples_rank<r>.jsonl: the global sample ids of every step")
    args = p.parse_args(argv)
    from exaflop.config import load_config
    from exaflop.engine.checkpoint import read_latest
    from exaflop.engine.runtime import CollectiveTimeout
    from exaflop.engine.trainer import train_main

    if args.record_samples:
        os.environ["EXAFLOP_RECORD_SAMPLES"] = "1"
    try:
        cfg = load_config(args.config, args.overrides)
        resume = args.resume
        # After torchrun restarts a failed group, continue from the newest complete checkpoint.
        if args.auto_resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            resume = read_latest(cfg.run_dir / "checkpoints")[0] is not None
        result = train_main(cfg, resume=resume, quiet=args.quiet)
    except UserError as e:
        print(f"exaflop: error (rank {os.environ.get('RANK', '0')}): {e}", file=sys.stderr)
        return 2
    except CollectiveTimeout as e:
        print(f"exaflop: error: {e}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", "0")) == 0:
        state = "stopped early (checkpoint saved)" if result.get("stopped_early") else "done"
        print(f"{state} at step {result['step']} -> {result['run_dir']}", file=sys.stderr)
    return 0


def _exit_worker(code: int) -> None:
    """End a torchrun worker without interpreter teardown, once everything is written.

    Why: after a successful distributed run (process group destroyed, checkpoints waited for,
    logs closed), a rank has aborted in PyTorch's C++ teardown at exit ("terminate called
    without an active exception", SIGABRT; seen once in CI on a tensor-parallel run under load,
    not reproducible on demand), and torchrun then reports the whole run failed. Nothing is
    left to finalize, so the worker leaves with `os._exit` after flushing what Python buffers.
    """
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_worker(code)
    sys.exit(code)
