"""`_atomic_write` (checkpoint meta.json and `latest`) killed for real at each of its steps.

A separate process writes a new value over an old one and dies (os._exit, no cleanup,
as a SIGKILL or power loss would leave it) half-way through the write, before the fsync
and before the rename. Each time the file must still hold the old value, whole.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

OLD = "step_000000002\n"
NEW = "step_000000004\n" + "x" * 10_000  # long enough that half of it is clearly torn


def _write(path: Path, fault: str | None) -> subprocess.CompletedProcess:
    code = ("import sys; from pathlib import Path; from exaflop.engine.checkpoint import _atomic_write; "
            "_atomic_write(Path(sys.argv[1]), sys.argv[2])")
    env = {k: v for k, v in os.environ.items() if k != "EXAFLOP_FAULT"}
    if fault:
        env["EXAFLOP_FAULT"] = fault
    return subprocess.run([sys.executable, "-c", code, str(path), NEW], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("fault", ["atomic_write:torn", "atomic_write:before_fsync", "atomic_write:before_replace"])
def test_a_crash_at_any_step_leaves_the_old_file_whole(tmp_path, fault):
    path = tmp_path / "latest"
    path.write_text(OLD)
    r = _write(path, fault)
    assert r.returncode == 17, r.stderr  # the process really died at that point
    assert path.read_text() == OLD


def test_a_completed_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "latest"
    path.write_text(OLD)
    inode = path.stat().st_ino
    r = _write(path, None)
    assert r.returncode == 0, r.stderr
    assert path.read_text() == NEW
    assert path.stat().st_ino != inode  # a new file renamed over the old one, not rewritten in place
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]
