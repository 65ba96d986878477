"""MoE under every layout the trainer has, for real (torchrun, gloo): the stacked experts
give the single-process losses and consume the same samples under DDP, FSDP2, tensor
parallel and expert parallel (alone and composed with FSDP2 and TP, on 2 and 4 processes).
The routing bias moves every step (rate 0.01) from loads summed over ranks, so a rank
balancing from its own counts would route differently and the losses would part."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist.conftest import STEPS, _env, assert_same_losses, assert_same_samples

pytestmark = pytest.mark.dist
MOE = ["model.n_experts=4", "model.top_k=2", "model.d_ff=64", "model.moe_bias_rate=0.01",
       "model.moe_aux_coef=0.01"]


@pytest.fixture(scope="module")
def moe_reference(launcher):
    return launcher.run("moe_reference", 1, MOE)


@pytest.fixture(scope="module")
def moe_ep(launcher):
    """Expert parallel on 2 processes (E=4: two experts each), FSDP2 for the rest."""
    return launcher.run("moe_ep", 2, [*MOE, "parallel.ep=2"])


@pytest.mark.parametrize("name,nproc,extra", [
    ("moe_ep_ddp", 2, ["parallel.ep=2", "parallel.mode=ddp"]),
    ("moe_fsdp_ep", 4, ["parallel.ep=2"]),  # edp=2 replicas of each half of the experts
    ("moe_tp_ep", 4, ["parallel.ep=2", "parallel.tp=2"]),
    ("moe_ddp", 2, ["parallel.mode=ddp"]),
    # FSDP2 without expert parallel: test_expert_parallel_checkpoint_resumes_on_other_layouts
    # TP with sequence parallelism: moe_tp_ep (the same expert split, plus EP)
    ("moe_tp_nosp", 2, ["parallel.tp=2", "parallel.sequence_parallel=false"]),
])
def test_moe_layout_matches_single_process(launcher, moe_reference, name, nproc, extra):
    run = launcher.run(name, nproc, MOE + extra)
    if name == "moe_ep_ddp":  # DDP splits nothing else: rank 0 holds all but half the experts
        experts = 2 * 3 * 4 * 64 * 64  # layers × (w1, w3, w2) × E × d_model × d_ff
        full = moe_reference.records("run")[0]["params_local"]
        assert full - run.records("run")[0]["params_local"] == experts // 2
    assert_same_losses(run, moe_reference)
    assert_same_samples(run, moe_reference, range(STEPS))
    got, want = run.records("train")[-1], moe_reference.records("train")[-1]
    assert got["aux_loss"] == pytest.approx(want["aux_loss"], abs=1e-4)
    # Loads summed over ranks: the same balance statistics as one process.
    assert got["moe_load_max_over_mean"] == pytest.approx(want["moe_load_max_over_mean"], rel=1e-6)


def test_expert_parallel_matches_single_process(moe_reference, moe_ep):
    assert_same_losses(moe_ep, moe_reference)
    assert_same_samples(moe_ep, moe_reference, range(STEPS))


@pytest.mark.parametrize("name,nproc,extra", [
    ("moe_ep_to_1", 1, []),                            # all experts on one process
    ("moe_ep_to_fsdp", 2, ["parallel.mode=fsdp"]),    # FSDP2 without expert parallel
    ("moe_ep_to_ep4", 4, ["parallel.ep=4"]),          # another expert-parallel degree
])
def test_expert_parallel_checkpoint_resumes_on_other_layouts(launcher, moe_reference, moe_ep, name, nproc, extra):
    launcher.fork(moe_ep, name, [5])
    run = launcher.run(name, nproc, MOE + extra, resume=True)
    assert sorted(run.losses()) == list(range(6, STEPS + 1))
    assert_same_samples(run, moe_reference, range(5, STEPS))
    assert_same_losses(run, moe_reference, range(6, STEPS + 1))


@pytest.mark.parametrize("case", ["one_rank", "idle"])
def test_experts_without_tokens_get_the_reference_gradients(tmp_path, case):
    """Expert 2 chosen by nobody, expert 3 by one rank only ("idle": rank 1 computes on no rows
    at all): the step completes well inside the timeout and every gradient (experts gathered,
    router, inputs) equals the single-process one; the unchosen expert's is zero, not missing."""
    script = Path(__file__).with_name("ep_drill.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(script), case, str(tmp_path / "r")]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[:4000]  # the head: the rank's own error
    for rank in (0, 1):
        res = json.loads((tmp_path / f"r.{rank}").read_text())
        assert res["local_rows"] == [2, 2, 2]  # E=4 over 2 ranks: two experts' weights each
        assert res["load"][2] == 0 and (res["load"][3] == 0) == (case == "idle" or rank == 1)
        for key in ("x_grad", "router_grad", "w1_grad", "w3_grad", "w2_grad",
                    "w1_grad_idle_zero", "w3_grad_idle_zero", "w2_grad_idle_zero"):
            assert res[key], f"rank {rank}: {key}"
