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
    return subprocess.call(torchrun_command(config, overrides, nproc, max_restarts, resume, quiet))
