"""Real faults on demand, for the fault-tolerance tests and for drills on a cluster.

    EXAFLOP_FAULT=sigkill@rank1:step6   rank 1 SIGKILLs itself before optimizer step 6
    EXAFLOP_FAULT=sigterm@rank0:step3   rank 0 receives SIGTERM (a preemption notice)
    EXAFLOP_FAULT=hang@rank1:step3      rank 1 stops answering collectives
    EXAFLOP_FAULT=before_rename         (engine.checkpoint) die between shard write and rename

Faults fire only in torchrun's first attempt, so a restarted job does not crash
again at the same place; the signals are delivered to the process for real.
"""

from __future__ import annotations

import os
import re
import signal
import time

_SPEC = re.compile(r"^(sigkill|sigterm|hang)@rank(\d+):step(\d+)$")


def _parse() -> tuple[str, int, int] | None:
    m = _SPEC.match(os.environ.get("EXAFLOP_FAULT", ""))
    if m is None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return None
    return m.group(1), int(m.group(2)), int(m.group(3))


def maybe_inject(step: int, rank: int) -> None:
    """Called once per optimizer step (0-based `step`), before its forward passes."""
    spec = _parse()
    if spec is None or spec[1] != rank or spec[2] != step:
        return
    kind = spec[0]
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    else:
        # Die on torchrun's SIGTERM when it tears the group down, as a process stuck in a
        # kernel would (the trainer's handler would otherwise turn it into a checkpoint request).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        while True:  # a stuck kernel or a dead NIC looks like this from the other ranks
            time.sleep(3600)
