"""The promoted checkpoint of a driving run: what `exaflop serve RUN` serves.

Training writes checkpoints as it goes; a candidate is not necessarily better on the road.
`RUN/promoted.json` names the checkpoint that passed the gate (`exaflop drive promote`, or
the data engine's closed-loop gate), and a server watching RUN hot-reloads *that* — not
merely the newest checkpoint. Without the file, the newest complete checkpoint is served,
as before. The file is replaced atomically, so a server polling it sees the old pointer or
the new one, never half of either.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from exaflop.errors import UserError

PROMOTED = "promoted.json"


def promoted(run_dir: Path) -> Path | None:
    """The promoted checkpoint directory, or None when nothing was promoted."""
    f = Path(run_dir) / PROMOTED
    if not f.is_file():
        return None
    try:
        return Path(run_dir) / json.loads(f.read_text())["checkpoint"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None  # a hand-edited, broken pointer: fall back to the newest checkpoint


def promote(run_dir: Path, checkpoint: Path, **why) -> dict:
    """Point RUN/promoted.json at `checkpoint` (a step_* directory under RUN/checkpoints)."""
    from exaflop.engine.checkpoint import pin_checkpoint, verify

    run_dir, checkpoint = Path(run_dir), Path(checkpoint)
    if not checkpoint.is_absolute():
        checkpoint = run_dir / checkpoint if (run_dir / checkpoint).exists() else run_dir / "checkpoints" / checkpoint
    problem = verify(checkpoint) if checkpoint.is_dir() else f"{checkpoint}: no such checkpoint"
    if problem is not None:
        raise UserError(f"cannot promote: {problem}")
    try:
        rel = checkpoint.resolve().relative_to(run_dir.resolve())
    except ValueError:
        raise UserError(f"{checkpoint}: not a checkpoint of {run_dir}") from None
    # Pinned first: training that goes on in this run must never prune what is served.
    pin_checkpoint(checkpoint.parent, checkpoint.name)
    record = {"checkpoint": str(rel), "promoted_at": time.time(), **why}
    tmp = run_dir / f".{PROMOTED}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, run_dir / PROMOTED)
    return record
