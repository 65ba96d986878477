"""Shrink-and-continue for real: 3 DDP replicas under `exaflop train --elastic`, one killed with
SIGKILL mid-run; the other two re-form their group without it (no torchrun restart, no
checkpoint load), re-split the same global batch and finish with the single-process losses."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from tests.dist.conftest import STEPS, Run, _env, assert_same_losses, assert_same_samples

pytestmark = pytest.mark.dist
TIMEOUT = 8
GB12 = ["train.global_batch=12", "parallel.mode=ddp", f"parallel.timeout_s={TIMEOUT}"]


def test_a_killed_replica_is_dropped_and_training_goes_on(launcher):
    reference = launcher.run("elastic_reference", 1, GB12)
    cmd = [sys.executable, "-m", "exaflop", "train", "lm-tiny", "--nproc", "3", "--elastic", "--quiet",
           "--record-samples"]
    for s in launcher.overrides("elastic", GB12):
        cmd += ["--set", s]
    p = subprocess.run(cmd, env=_env("sigkill@rank1:step4"), capture_output=True, text=True, timeout=240)
    run = Run(launcher.root / "elastic", p.returncode, p.stdout + p.stderr)
    assert p.returncode == 0, run.log[-3000:]
    rec = run.records("reconfigure")
    assert len(rec) == 1 and rec[0]["left"] == [1] and rec[0]["members"] == [0, 2] and rec[0]["step"] == 4
    # Detected from the closed connection, or at worst when a survivor's collective times out.
    assert 0 < rec[0]["stall_s"] < TIMEOUT + 3
    assert len(run.records("run")) == 1  # one start: nothing restarted, no checkpoint loaded
    samples = run.samples()
    assert not run.restarts
    # Steps 0-3 on 3 replicas, 4-9 on 2: together exactly the uninterrupted run's samples,
    # nothing lost or repeated, and the same losses.
    assert [len(samples[s]) for s in range(STEPS)] == [3] * 4 + [2] * 6
    assert_same_samples(run, reference, range(STEPS))
    consumed = Counter(i for s in range(STEPS) for ids in samples[s] for i in ids)
    assert max(consumed.values()) == 1
    assert_same_losses(run, reference)
