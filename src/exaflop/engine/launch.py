"""`exaflop train --nproc N`: run the same training under torchrun on this machine."""

from __future__ import annotations

import subprocess
import sys


def torchrun_command(config: str, overrides: list[str], nproc: int, max_restarts: int, resume: bool,
                     quiet: bool) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", "-m", "exaflop.train", config]
    for o in overrides:
        cmd += ["--set", o]
    if resume:
        cmd.append("--resume")
    if quiet:
        cmd.append("--quiet")
    return cmd


def launch(config: str, overrides: list[str], nproc: int, max_restarts: int, resume: bool,
           quiet: bool) -> int:
    """Run torchrun, passing its output through; when a rank reports a user error, that
    one-line message is the result, not torchrun's ChildFailedError traceback after it."""
    cmd = torchrun_command(config, overrides, nproc, max_restarts, resume, quiet)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1)
    seen_errors: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("exaflop: error"):
            if line.split(": ", 2)[-1] not in {e.split(": ", 2)[-1] for e in seen_errors}:
                sys.stderr.write(line)  # the same mistake on every rank is said once
            seen_errors.append(line)
        elif not seen_errors and "OMP_NUM_THREADS" not in line and not line.startswith("*****"):
            sys.stderr.write(line)
    rc = proc.wait()
    return 2 if rc and seen_errors else rc
