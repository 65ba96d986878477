"""MoE under every layout the trainer has, for real (torchrun, gloo): the stacked experts
give the single-process losses and consume the same samples under DDP, FSDP2 and tensor
parallel. The routing bias moves every step (rate 0.01) from loads summed over ranks, so
a rank balancing from its own counts would route differently and the losses would part."""

from __future__ import annotations

import pytest

from tests.dist.conftest import STEPS, assert_same_losses, assert_same_samples

pytestmark = pytest.mark.dist
MOE = ["model.n_experts=4", "model.top_k=2", "model.d_ff=64", "model.moe_bias_rate=0.01",
       "model.moe_aux_coef=0.01"]


@pytest.fixture(scope="module")
def moe_reference(launcher):
    return launcher.run("moe_reference", 1, MOE)


@pytest.mark.parametrize("name,nproc,extra", [
    ("moe_ddp", 2, ["parallel.mode=ddp"]),
    ("moe_fsdp", 2, ["parallel.mode=fsdp"]),
    ("moe_tp", 2, ["parallel.tp=2"]),
    ("moe_tp_nosp", 2, ["parallel.tp=2", "parallel.sequence_parallel=false"]),
])
def test_moe_layout_matches_single_process(launcher, moe_reference, name, nproc, extra):
    run = launcher.run(name, nproc, MOE + extra)
    assert_same_losses(run, moe_reference)
    assert_same_samples(run, moe_reference, range(STEPS))
    got, want = run.records("train")[-1], moe_reference.records("train")[-1]
    assert got["aux_loss"] == pytest.approx(want["aux_loss"], abs=1e-4)
    # Loads summed over ranks: the same balance statistics as one process.
    assert got["moe_load_max_over_mean"] == pytest.approx(want["moe_load_max_over_mean"], rel=1e-6)
