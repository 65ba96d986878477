"""Shrink-and-continue for real: 3 DDP replicas under `exaflop train --elastic`, one killed with
SIGKILL mid-run; the other two re-form their group without it (no torchrun restart, no
checkpoint load), re-split the same global batch and finish with the single-process losses."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from tests.dist.conftest import STEPS, Run, _env, assert_same_losses, assert_same_samples

pytestmark = pytest.mark.dist
TIMEOUT = 8
GB12 = ["train.global_batch=12", "parallel.mode=ddp", f"parallel.timeout_s={TIMEOUT}"]


@pytest.fixture(scope="module")
def reference(launcher):
    """One process, global batch 12: what the elastic runs must reproduce (checkpointing aside)."""
    return launcher.run("elastic_reference", 1, GB12)


def test_a_killed_replica_is_dropped_and_training_goes_on(launcher, reference):
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


def test_a_replacement_rejoins_with_state_from_a_live_peer(launcher, reference):
    """Replica 1 dies before step 4; `--max-restarts 1` starts a replacement (member 3). The two
    survivors go on, then admit it at the first step boundary after it registered (the
    `await_join` drill holds the boundary after step 6 until then, so it joins by step 6). It gets
    rank 0's optimizer state, step and RNG by broadcast and its weights by DDP's construction
    broadcast (no checkpoint exists before step 10), and the last steps run on 3 replicas again with
    the single-process losses and exactly the uninterrupted run's samples."""
    extra = [*GB12, "checkpoint.every=100"]
    cmd = [sys.executable, "-m", "exaflop", "train", "lm-tiny", "--nproc", "3", "--elastic", "--max-restarts", "1",
           "--quiet", "--record-samples"]
    for s in launcher.overrides("rejoin", extra):
        cmd += ["--set", s]
    p = subprocess.run(cmd, env=_env("sigkill@rank1:step4,await_join@step6"), capture_output=True, text=True,
                       timeout=300)
    run = Run(launcher.root / "rejoin", p.returncode, p.stdout + p.stderr)
    assert p.returncode == 0, run.log[-3000:]
    left, joined = run.records("reconfigure")
    assert left["left"] == [1] and left["members"] == [0, 2] and left["step"] == 4
    assert 0 < left["stall_s"] < TIMEOUT + 3
    assert joined["joined"] == [3] and joined["left"] == [] and joined["members"] == [0, 2, 3]
    # Admitted at the first boundary after it registered: after step 5 if its start-up beat
    # the survivors there, at the latest after step 6 (the drill).
    j = joined["step"]
    assert j in (5, 6) and joined["world"] == 3 and joined["state_from"] == 0
    # AdamW state of every parameter: exp_avg and exp_avg_sq (fp32) plus a step counter each.
    assert joined["state_bytes"] >= 2 * 4 * left_params(run)
    assert 0 < joined["stall_s"] < TIMEOUT
    assert len(run.records("run")) == 1 and not list((run.dir / "checkpoints").glob("step_00000000[1-9]"))
    samples = run.samples()
    assert [len(samples[s]) for s in range(STEPS)] == [3] * 4 + [2] * (j - 4) + [3] * (STEPS - j)
    assert_same_samples(run, reference, range(STEPS))
    consumed = Counter(i for s in range(STEPS) for ids in samples[s] for i in ids)
    assert max(consumed.values()) == 1
    # The replacement trained steps 6-9 itself (its own sample file, by member id).
    steps = {json.loads(x)["step"] for x in (run.dir / "samples_rank3.jsonl").read_text().splitlines()}
    assert sorted(steps) == list(range(j, STEPS))
    assert_same_losses(run, reference)


def left_params(run: Run) -> int:
    return run.records("run")[0]["params_local"]
