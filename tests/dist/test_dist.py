"""Multi-process training for real: torchrun, gloo, CPU (see conftest.py for the shared runs).

Loss tolerance: LOSS_TOL (1e-3 absolute per step, fp32). Observed differences are
below 1e-5: layouts only change the order in which partial sums are reduced.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.dist.conftest import STEPS, assert_same_losses, assert_same_samples

pytestmark = pytest.mark.dist
ALL = range(STEPS)


@pytest.mark.parametrize("name,nproc,extra", [
    ("ddp", 2, ["parallel.mode=ddp", "parallel.activation_checkpoint=full"]),
    ("tp", 2, ["parallel.tp=2", "parallel.activation_checkpoint=selective"]),
    ("fsdp_tp", 4, ["parallel.tp=2", "parallel.mode=fsdp"]),
    ("hsdp", 4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
])
def test_layout_matches_single_process(launcher, reference, name, nproc, extra):
    run = launcher.run(name, nproc, extra)
    assert_same_losses(run, reference)
    assert_same_samples(run, reference, ALL)
    train = run.records("train")[-1]
    assert train["world"] == nproc and len(train["peak_mem_mb_per_rank"]) == nproc
    assert train["tokens_per_s"] > 0 and train["mfu"] > 0


def test_fsdp2_matches_single_process(fsdp2, reference):
    assert_same_losses(fsdp2, reference)
    assert_same_samples(fsdp2, reference, ALL)
    ckpts = fsdp2.records("checkpoint")
    assert [c["step"] for c in ckpts] == [5] and ckpts[0]["blocked_s"] > 0
    shards = sorted(p.name for p in (fsdp2.dir / "checkpoints" / "step_000000005").glob("*.distcp"))
    assert len(shards) == 2, shards  # every rank wrote its own shard


@pytest.mark.parametrize("name,nproc,extra", [("resume_1proc", 1, []),
                                              ("resume_tp2", 2, ["parallel.tp=2"])])
def test_fsdp2_checkpoint_resumes_on_other_layouts(launcher, fsdp2, reference, name, nproc, extra):
    launcher.fork(fsdp2, name, [5])
    run = launcher.run(name, nproc, extra, resume=True)
    assert sorted(run.losses()) == list(range(6, STEPS + 1))
    # The next global samples are exactly those of the uninterrupted run, and training continues
    # to the same losses.
    assert_same_samples(run, reference, range(5, STEPS))
    assert_same_losses(run, reference, range(6, STEPS + 1))


def test_kill_9_one_rank_restarts_from_checkpoint(launcher, reference):
    run = launcher.run("killed", 2, ["parallel.mode=fsdp"], max_restarts=1, fault="sigkill@rank1:step7")
    samples = run.samples()
    assert run.restarts and set(run.restarts) == {5}, run.restarts  # resumed from the step-5 checkpoint
    consumed = Counter(i for s in ALL for rank_ids in samples[s] for i in rank_ids)
    assert max(consumed.values()) == 1, "a sample id was used twice by surviving optimizer steps"
    assert_same_samples(run, reference, ALL)
    assert_same_losses(run, reference, [STEPS])


def test_sigterm_saves_on_all_ranks_then_resume_skips_nan(launcher):
    # bf16 here: FSDP2's mixed-precision policy (bf16 compute, fp32 master weights and reduction).
    extra = ["parallel.mode=fsdp", "run.dtype=bf16"]
    run = launcher.run("preempted", 2, extra, fault="sigterm@rank1:step3")
    assert "stopped early" in run.log
    ckpt = run.dir / "checkpoints" / "step_000000004"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 4 and meta["world_size"] == 2
    assert len(list(ckpt.glob("*.distcp"))) == 2 and len(list(ckpt.glob("rng_rank*.pt"))) == 2

    # The resumed run saves asynchronously (step 5 overlaps training; step 10 at the end).
    run = launcher.run("preempted", 2, [*extra, "train.inject_nan_at_step=6", "checkpoint.async_save=true"],
                       resume=True)
    losses = run.losses()
    assert sorted(losses) == [1, 2, 3, 4, 5, 6, 8, 9, 10]  # step 7 (0-based 6) was skipped
    bad = run.records("bad_step")
    assert [b["step"] for b in bad] == [7] and bad[0]["skipped_steps"] == 1
    assert run.records("train")[-1]["skipped_steps"] == 1
    assert all(v == v for v in losses.values())  # the run went on with finite losses
    from exaflop.engine.checkpoint import read_latest

    latest, problems = read_latest(run.dir / "checkpoints")
    assert latest.name == "step_000000010" and not problems
    assert json.loads((latest / "meta.json").read_text())["skipped_steps"] == 1


def test_truncated_or_missing_shard_falls_back(launcher, fsdp2, reference):
    from exaflop.engine.checkpoint import read_latest, verify

    ckpts = launcher.fork(fsdp2, "damaged", [5, 10])
    newest = ckpts / "step_000000010"
    shard = sorted(newest.glob("*.distcp"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    assert "truncated" in verify(newest) and shard.name in verify(newest)
    found, problems = read_latest(ckpts)
    assert found == ckpts / "step_000000005" and "truncated" in problems[0]
    shard.unlink()
    assert f"shard {shard.name} is missing" in verify(newest)

    run = launcher.run("damaged", 1, resume=True)
    assert "skipped incomplete checkpoint" in run.log and shard.name in run.log
    assert sorted(run.losses()) == list(range(6, STEPS + 1))
    assert_same_losses(run, reference, range(6, STEPS + 1))

    # With no complete checkpoint left, resume is refused in one line naming the shard.
    only = launcher.fork(fsdp2, "damaged_all", [5]) / "step_000000005"
    sorted(only.glob("*.distcp"))[0].unlink()
    run = launcher.run("damaged_all", 1, resume=True, check=False)
    assert run.rc == 2 and "Traceback" not in run.log
    assert "no complete checkpoint" in run.log and "shard __0_0.distcp is missing" in run.log


def test_hung_rank_is_named(launcher):
    run = launcher.run("hung", 2, ["parallel.timeout_s=4"], fault="hang@rank1:step3", check=False)
    assert run.rc != 0
    line = next(x for x in run.log.splitlines() if x.startswith("exaflop: error"))
    assert "rank 0: a collective at step 3 timed out" in line and "not responding: rank 1" in line


def test_export_consolidates_sharded_checkpoint(fsdp2, tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from exaflop.engine.checkpoint import load_for_inference
    from exaflop.engine.export import export

    out = export(fsdp2.dir, tmp_path / "model.safetensors")
    _, _, model = load_for_inference(fsdp2.dir)
    tensors = load_file(out)
    model.load_state_dict(tensors, strict=True)
    assert all(torch.equal(tensors[k], v) for k, v in model.state_dict().items())
    meta = safe_open(out, "pt").metadata()
    assert meta["step"] == "10" and json.loads(meta["config"])["model"]["d_model"] == 64
