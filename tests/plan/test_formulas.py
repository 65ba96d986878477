"""FLOP, parameter and memory formulas against values worked out by hand for a tiny model."""

from __future__ import annotations

import pytest

from exaflop.plan.catalog import ModelSpec, Network, load_catalog
from exaflop.plan.cost import SOFTWARE, Job, Plan, memory, step_cost
from exaflop.plan.shapes import activation_bytes, forward_flops, total_params

# 2 layers, h=64, 4 heads, GeLU MLP 4h, vocab 100, 16 tokens: small enough to do on paper.
TINY = ModelSpec(name="tiny", layers=2, hidden=64, heads=4, ffn=256, vocab=100, seq_len=16)
NET = Network("flat", scaleup_domain=8, scaleup_gbps_per_dir=300, scaleout_gbit_per_accel=200)


def tiny_job(**kw) -> Job:
    accel = load_catalog().accelerator("a100-80gb")
    return Job(TINY, accel, NET, kw.pop("global_batch", 8), 16, SOFTWARE[kw.pop("software", "megatron-2021")])


def test_forward_flops_by_hand():
    # per layer 24*s*h^2 + 4*s^2*h = 24*16*64^2 + 4*16^2*64 = 1,572,864 + 65,536
    # logits 2*s*h*V = 2*16*64*100 = 204,800
    assert forward_flops(TINY, 16) == 2 * (1_572_864 + 65_536) + 204_800


def test_params_by_hand():
    # attention 4h^2 + two norms 2h = 16,512; MLP 2*h*4h = 32,768; untied embeddings 2*V*h = 12,800
    total, active = total_params(TINY)
    assert total == active == 2 * (16_512 + 32_768) + 12_800


def test_activation_bytes_match_korthikanti():
    sbh = 16 * 64
    full, core = activation_bytes(TINY, 1, 16, tp=1, cp=1, sp=False, moe=False, keep_scores=True)
    assert full == sbh * (34 + 5 * 4 * 16 / 64)  # sbh(34 + 5as/h)
    assert core == 5 * 4 * 16 * 16  # 5 a s^2 b
    tp2, _ = activation_bytes(TINY, 1, 16, tp=2, cp=1, sp=False, moe=False, keep_scores=True)
    assert tp2 == sbh * (10 + 24 / 2 + 5 * 4 * 16 / (64 * 2))  # sbh(10 + 24/t + 5as/(ht))
    sp2, _ = activation_bytes(TINY, 1, 16, tp=2, cp=1, sp=True, moe=False, keep_scores=False)
    assert sp2 == sbh * 34 / 2  # sequence parallel + flash: sbh * 34 / t


def test_weight_grad_optimizer_bytes():
    job = tiny_job()
    mem = memory(job, Plan(tp=1, pp=1, dp=1, recompute="none", zero_stage=0), micro_batches=1)
    params = 2 * (16_512 + 32_768) + 12_800
    assert mem["weights"] == 2 * params and mem["grads"] == 2 * params and mem["optimizer"] == 12 * params


def test_fsdp_memory_falls_with_dp():
    job = tiny_job(global_batch=64)
    totals = [sum(memory(job, Plan(dp=dp, zero_stage=3, recompute="full"), 1).values()) for dp in (1, 2, 8, 32)]
    assert totals == sorted(totals, reverse=True) and totals[-1] < totals[0] / 4


def test_step_breakdown_sums_to_step_time():
    cost = step_cost(tiny_job(global_batch=8), Plan(tp=2, pp=2, dp=2, micro_batch=1))
    assert abs(sum(cost.breakdown.values()) - cost.step_s) < 1e-12
    assert 0 < cost.mfu < 1


# 4 layers, h=512: per layer 4h^2 + 2h + 2*h*4h = 3,146,752 params; embeddings 2*1000*512.
MID = ModelSpec(name="mid", layers=4, hidden=512, heads=8, ffn=2048, vocab=1000, seq_len=512)
MID_PARAMS = 4 * 3_146_752 + 1_024_000  # 13,611,008
# No scale-up domain: the dp=2 group talks over the 200 Gbit/s scale-out network.
SLOW = Network("slow", scaleup_domain=1, scaleup_gbps_per_dir=300, scaleout_gbit_per_accel=200)


def _mid_job() -> Job:
    return Job(MID, load_catalog().accelerator("a100-80gb"), SLOW, 8, 512, SOFTWARE["modern"])


def _ring_all_reduce(nbytes: float, job: Job) -> float:
    """dp=2 ring all-reduce over scale-out, by hand: 2 * log2(2) latencies + 2 (n-1)/n of the bytes."""
    out_bps = 200 / 8 * 1e9 * job.eff.net_eff
    return 2 * 1 * job.network.latency_us * 1e-6 + 2 * (2 - 1) / 2 * nbytes / out_bps


def test_dp_overlap_hides_gradients_behind_the_last_micro_batch_only():
    # The software profile users get ("modern"): gradients reduce while the last of the 4
    # micro-batches runs its backward (2/3 of its compute), not behind all four.
    job = _mid_job()
    cost = step_cost(job, Plan(dp=2, micro_batch=1, zero_stage=1, recompute="none"))
    assert cost.micro_batches == 4
    t_dp = _ring_all_reduce(2 * MID_PARAMS, job)  # bf16 gradients, unsharded (ZeRO-1)
    backward_of_one = cost.breakdown["compute"] / 4 * 2 / 3
    assert t_dp > backward_of_one  # so the exposed part is not clipped to zero
    assert cost.breakdown["dp_comm"] == pytest.approx(t_dp - backward_of_one, rel=1e-9)


def test_zero3_gathers_the_full_weights_twice_per_step():
    job = _mid_job()
    cost = step_cost(job, Plan(dp=2, micro_batch=1, zero_stage=3, recompute="none"))
    # bf16, gathered whole for forward and again for backward, once per step: the gathered
    # layers stay resident across the 4 micro-batches (not re-fetched for each).
    weights = 2 * MID_PARAMS
    t_dp = _ring_all_reduce(2 * MID_PARAMS, job) + 2 * _ring_all_reduce(weights, job) / 2
    window = cost.breakdown["compute"] * 2 / 3  # prefetch hides behind every micro-batch
    assert cost.breakdown["dp_comm"] == pytest.approx(max(0.0, t_dp - window), rel=1e-9)
    assert cost.breakdown["dp_comm"] > 0
    # Memory: weights, grads and optimizer sharded over dp=2, plus two gathered layers.
    mem = memory(job, Plan(dp=2, micro_batch=1, zero_stage=3, recompute="none"), 4)
    assert mem["weights"] == pytest.approx(2 * MID_PARAMS / 2 + 2 * 3_146_752 * 2)
    assert mem["grads"] == pytest.approx(2 * MID_PARAMS / 2) and mem["optimizer"] == pytest.approx(12 * MID_PARAMS / 2)
