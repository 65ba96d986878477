"""The MoE, pipeline, recompute and communication terms of the cost model, worked by hand.

A paper accelerator with flat efficiencies (every matmul at 50% of a 100 TFLOP/s peak,
memory at 1 TB/s, links at line rate) so each number below is arithmetic on the model's
shape, written out in the comments. `tests/plan/test_formulas.py` does the dense model.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from exaflop.plan.catalog import Accelerator, ModelSpec, Network
from exaflop.plan.cost import SOFTWARE, Job, Plan, memory, step_cost
from exaflop.plan.efficiency import Efficiency

FLAT = Efficiency(gemm_peak=0.5, gemm_knee=0.0, mem_eff=0.5, net_eff=1.0)
MATMUL = 100e12 * 0.5  # flop/s any matmul reaches
HBM = 2e12 * 0.5  # bytes/s of memory-bound kernels
ACCEL = Accelerator("paper", bf16_tflops=100, mem_gb=80, scaleup_domain=8, mem_tbps=2.0)
# NVLink-like domain of 8 at 100 GB/s per direction; 400 Gbit/s (50 GB/s) NIC outside it.
NET = Network("paper", scaleup_domain=8, scaleup_gbps_per_dir=100, scaleout_gbit_per_accel=400, latency_us=5)
UP, OUT, LAT = 100e9, 50e9, 5e-6

# 4 layers (the first dense), h=64, 4 heads, GeLU; 4 experts of width 128, top-2, one shared.
MOE = ModelSpec(name="moe", layers=4, hidden=64, heads=4, ffn=256, vocab=100, seq_len=16,
                experts=4, top_k=2, expert_ffn=128, shared_experts=1, dense_layers=1)
# Parameters per layer: attention h(h + 2h) + h^2 + 2h (norms) = 16,512.
# Dense layer: + GeLU MLP 2*h*256 = 32,768 -> 49,280.
# MoE layer, dense part: attention + shared expert 2*h*128 = 16,384 + router h*4 = 256 -> 33,152;
# expert part: 4 experts * 16,384 = 65,536.
# Averaged over the 4 layers (1 dense, 3 MoE): dense 49,280/4 + 33,152*3/4 = 37,184;
# experts 65,536*3/4 = 49,152. Embeddings (untied) 2*100*64 = 12,800.
DENSE_PER_LAYER, EXPERT_PER_LAYER, EMBED = 37_184, 49_152, 12_800
TOTAL_PARAMS = 49_280 + 12_800 + 3 * (33_152 + 65_536)  # 358,144


def job(software: str = "modern", global_batch: int = 4, accel: Accelerator = ACCEL) -> Job:
    return Job(MOE, accel, NET, global_batch, 16, SOFTWARE[software], FLAT)


def test_moe_weights_split_into_dense_and_expert_shards():
    # dp=4, ep=2: dense parameters shard over 4 ranks, experts over the 2 ranks that hold
    # the same experts; ZeRO-1 shards only the optimizer.
    dense, expert = 4 * DENSE_PER_LAYER + EMBED, 4 * EXPERT_PER_LAYER / 2  # 161,536 and 98,304
    mem = memory(job(), Plan(dp=4, ep=2, zero_stage=1, recompute="none"), 1)
    assert mem["weights"] == pytest.approx(2 * (dense + expert), rel=1e-12)
    assert mem["grads"] == pytest.approx(2 * (dense + expert), rel=1e-12)
    assert mem["optimizer"] == pytest.approx(12 * (dense / 4 + expert / 2), rel=1e-12)  # 1,074,432
    # ZeRO-2 also shards gradients.
    mem2 = memory(job(), Plan(dp=4, ep=2, zero_stage=2, recompute="none"), 1)
    assert mem2["grads"] == pytest.approx(2 * (dense / 4 + expert / 2), rel=1e-12)
    assert mem2["weights"] == mem["weights"]
    # ZeRO-3 shards weights too, and holds two gathered layers: 2 * (37,184 + 49,152/2) * 2 bytes.
    mem3 = memory(job(), Plan(dp=4, ep=2, zero_stage=3, recompute="none"), 1, with_gathered=True)
    assert mem3["weights"] == pytest.approx(2 * (dense / 4 + expert / 2) + 2 * 61_760 * 2, rel=1e-12)
    assert mem3["gathered"] == pytest.approx(2 * (dense + expert), rel=1e-12)  # the stage's full weights


def test_tensor_parallel_splits_both_and_experts_never_shard_below_one_rank():
    dense, expert = (4 * DENSE_PER_LAYER + EMBED) / 2, 4 * EXPERT_PER_LAYER / (2 * 2)
    mem = memory(job(), Plan(tp=2, dp=4, ep=2, zero_stage=1, recompute="none"), 1)
    assert mem["weights"] == pytest.approx(2 * (dense + expert), rel=1e-12)  # 259,840
    assert mem["optimizer"] == pytest.approx(12 * (dense / 4 + expert / 2), rel=1e-12)  # 537,216
    # ep=4 over dp=2: each expert lives on one rank, so its optimizer state is not sharded.
    dense, expert = 4 * DENSE_PER_LAYER + EMBED, 4 * EXPERT_PER_LAYER / 4
    mem = memory(job(), Plan(dp=2, ep=4, zero_stage=1, recompute="none"), 1)
    assert mem["optimizer"] == pytest.approx(12 * (dense / 2 + expert / 1), rel=1e-12)  # 1,559,040


@pytest.mark.parametrize("pp", [2, 3])
def test_pipeline_stage_holds_its_layers_and_half_the_embeddings(pp):
    # ceil(4 / pp) = 2 layers on the busiest stage; embedding on the first stage, head on the last.
    mem = memory(job(), Plan(pp=pp, zero_stage=0, recompute="none"), 1)
    assert mem["weights"] == pytest.approx(2 * (2 * DENSE_PER_LAYER + EMBED / 2 + 2 * 4 * 16_384 * 3 / 4), rel=1e-12)
    whole = memory(job(), Plan(pp=1, zero_stage=0, recompute="none"), 1)
    assert whole["weights"] == pytest.approx(2 * TOTAL_PARAMS, rel=1e-12)


# Activations of one MoE layer (flash, sequence parallel, tp=1), Korthikanti's terms:
# 10 sbh replicated = 10,240; Q, K, V and the projection input 2 * sbh * 4 = 8,192;
# the expert MLP at width 128 * (top-2 + 1 shared) = 384, input and output: 2 * 16 * 384 * 2 = 24,576.
ACT, LOGITS = 43_008, 2 * 4 * 16 * 100  # logits fp32 + their gradient: 12,800


@pytest.mark.parametrize("software, recompute, expected", [
    ("modern", "none", 4 * ACT + LOGITS),
    # Flash stores no scores; selective drops what elementwise ops re-create: the two norm
    # outputs (2 * 2 * s * h = 4,096) and the expert MLP's activation output (2 * 16 * 384 =
    # 12,288).
    ("modern", "selective", 4 * (ACT - 16_384) + LOGITS),
    # Megatron-2021 keeps the 5 a s^2 b = 5,120-byte score matrices; selective drops them.
    ("megatron-2021", "none", 4 * (ACT + 5_120) + LOGITS),
    ("megatron-2021", "selective", 4 * ACT + LOGITS),
    # Full: each layer keeps its input (2 * s * h = 2,048) plus one layer's working set.
    ("modern", "full", 4 * 2_048 + ACT + LOGITS),
])
def test_activation_memory_by_recompute_mode(software, recompute, expected):
    mem = memory(job(software), Plan(recompute=recompute), 1)
    assert mem["activations"] == pytest.approx(expected, rel=1e-12)


def test_full_recompute_under_tensor_parallel():
    # tp=2 with sequence parallelism: saved inputs 2,048/2, working set 10,240/2 + 32,768/2,
    # logits over half the vocabulary.
    sp = memory(job(), Plan(tp=2, recompute="full", sequence_parallel=True), 1)
    assert sp["activations"] == pytest.approx(4 * 1_024 + 21_504 + LOGITS / 2, rel=1e-12)
    # Without it the replicated 10 sbh and the saved inputs stay whole on each rank.
    no_sp = memory(job(), Plan(tp=2, recompute="full", sequence_parallel=False), 1)
    assert no_sp["activations"] == pytest.approx(4 * 2_048 + 26_624 + LOGITS / 2, rel=1e-12)


@pytest.mark.parametrize("pp, vp, micro_batches, in_flight", [
    (2, 1, 1, 1),  # one micro-batch: nothing else in flight
    (2, 1, 8, 2),  # 1F1B: the first stage holds pp micro-batches
    (2, 2, 8, 2 * (1 + 1 / 4)),  # interleaving: * (1 + (pp-1)/(pp*vp))
    (4, 1, 3, 3),  # fewer micro-batches than stages: all of them
])
def test_micro_batches_in_flight_on_the_first_stage(pp, vp, micro_batches, in_flight):
    layers = -(-4 // pp)
    mem = memory(job(), Plan(pp=pp, vp=vp, recompute="full"), micro_batches)
    assert mem["activations"] == pytest.approx(layers * 2_048 * in_flight + ACT + LOGITS, rel=1e-12)


@pytest.mark.parametrize("global_batch, dp, mb, given, expected_mbs", [
    (10, 2, 2, None, 2),  # 10 // (2 * 2); the step trains 8 sequences
    (3, 2, 2, None, 1),  # never fewer than one micro-batch
    (4, 1, 1, 5, 5),  # an explicit count wins
])
def test_micro_batch_count(global_batch, dp, mb, given, expected_mbs):
    cost = step_cost(job(global_batch=global_batch), Plan(dp=dp, micro_batch=mb), given)
    assert cost.micro_batches == expected_mbs
    assert cost.global_batch == expected_mbs * dp * mb


# Forward FLOPs, s=16, h=64. Dense layer 24 s h^2 + 4 s^2 h = 1,638,400 (scores + context 65,536).
# MoE layer: attention 8 s h^2 + 4 s^2 h = 589,824; router 2*16*4*64 = 8,192; each expert sees
# 16 * 2 / 4 = 8 tokens: 4 experts * 2 matmuls * 2*8*128*64 = 1,048,576; shared expert
# 2 * 2*16*128*64 = 524,288 -> 2,170,880. LM head 2*16*100*64 = 204,800.
DENSE_FWD, MOE_FWD, CORE, HEAD = 1_638_400, 2_170_880, 65_536, 204_800
# Time is costed with the busiest expert 10% over the mean (MOE_IMBALANCE): the 1,048,576
# expert FLOPs count 1.1x, as if the MoE layer had 104,857.6 more.
MOE_T = MOE_FWD + 0.1 * 1_048_576
# Permuting tokens into expert order and back: 16 tokens x top-2 x h 64 x 2 bytes = 4,096
# bytes, read + written, there and back (x4), forward and twice backward (x3).
PERMUTE = 3 * 4 * 4_096 / HBM


def test_step_time_of_a_moe_model_on_one_accelerator():
    cost = step_cost(job(global_batch=4), Plan(recompute="none"))
    bd = cost.breakdown
    assert cost.micro_batches == 4
    # Forward + backward = 3x forward; flash recomputes the scores once more (half the core);
    # 1 dense layer + 3 MoE layers + the head.
    per_mb = (3 * (DENSE_FWD + 3 * MOE_T) + 4 * 0.5 * CORE + 3 * HEAD) / MATMUL
    assert bd["compute"] == pytest.approx(4 * per_mb, rel=1e-12)
    assert bd["moe_permute"] == pytest.approx(4 * 3 * PERMUTE, rel=1e-12)
    # Elementwise: 2.5 passes of 2x the saved activations per layer (dense layer 34 sbh =
    # 34,816) plus 3 fp32 passes over the logits.
    ew = (2.5 * 2 * (34_816 + 3 * ACT) + 3 * 4 * 16 * 100) / HBM
    assert bd["elementwise"] == pytest.approx(4 * ew, rel=1e-12)
    assert bd["pp_bubble"] == bd["pp_p2p"] == bd["dp_comm"] == bd["recompute"] == 0
    assert bd["optimizer"] == pytest.approx(TOTAL_PARAMS * 36 / HBM, rel=1e-12)
    assert cost.step_s == pytest.approx(sum(bd.values()), rel=1e-12)
    model_flops = 3 * (DENSE_FWD + 3 * MOE_FWD + HEAD) * 4
    assert cost.model_flops == model_flops
    assert cost.mfu == pytest.approx(model_flops / (cost.step_s * 100e12), rel=1e-12)


@pytest.mark.parametrize("vp", [1, 2])
@pytest.mark.parametrize("dp, bps", [(1, UP), (8, OUT)])  # stride 8 leaves the 8-wide domain
def test_pipeline_bubble_and_point_to_point(vp, dp, bps):
    cost = step_cost(job(global_batch=4 * dp), Plan(pp=2, vp=vp, dp=dp, recompute="none", zero_stage=1))
    bd = cost.breakdown
    assert cost.micro_batches == 4
    # Two layers per stage, round(2 * 3/4) = 2 of them MoE (the dense one is on stage 0).
    compute = (3 * 2 * MOE_T + 2 * 0.5 * CORE + 3 * HEAD) / MATMUL
    ew = (2.5 * 2 * 2 * ACT + 3 * 4 * 16 * 100) / HBM
    assert bd["compute"] == pytest.approx(4 * compute, rel=1e-12)
    # (p - 1) / (v m) of the m = 4 micro-batches' stage time.
    assert bd["pp_bubble"] == pytest.approx((2 - 1) / (vp * 4) * 4 * (compute + ew + 2 * PERMUTE), rel=1e-12)
    # Each micro-batch sends its activations (16 * 64 * 2 bytes) forward and its gradient back,
    # once per chunk.
    assert bd["pp_p2p"] == pytest.approx(2 * vp * 4 * (LAT + 2_048 / bps), rel=1e-12)
    assert cost.comm_bytes["pp"] == 2 * vp * 2_048 * 4


def test_gradients_reduce_whole_under_zero2():
    # dp=2 inside the domain: latency 2*log2(2)*5 us + 2*(1/2) of the bf16 gradients at 100 GB/s.
    cost = step_cost(job(global_batch=2), Plan(dp=2, zero_stage=2, recompute="none"))
    t_dp = 2 * LAT + 2 * TOTAL_PARAMS / UP
    window = (3 * (DENSE_FWD + 3 * MOE_T) + 4 * 0.5 * CORE + 3 * HEAD) / MATMUL * 2 / 3
    assert cost.breakdown["dp_comm"] == pytest.approx(t_dp - window, rel=1e-12)
    assert cost.comm_bytes == {"tp": 0.0, "ep": 0.0, "cp": 0.0, "pp": 0.0,
                               "dp": pytest.approx(2 * TOTAL_PARAMS, rel=1e-12)}
    # The optimizer updates this rank's half.
    assert cost.breakdown["optimizer"] == pytest.approx(TOTAL_PARAMS / 2 * 36 / HBM, rel=1e-12)


def test_collective_payloads_per_step():
    cost = step_cost(job(global_batch=8), Plan(tp=2, pp=2, dp=2, ep=2, recompute="full", zero_stage=1))
    act = 16 * 64 * 2  # one micro-batch's hidden states
    assert cost.micro_batches == 4
    # TP: 4 all-reduces per layer (2 forward, 2 backward) + 2 more to recompute; 2 layers.
    # EP: dispatch + combine, forward and backward, top-2 copies of this rank's tokens (half
    # the micro-batch: sequence parallelism splits them over tp), 2 MoE layers.
    # DP: ZeRO-1 reduces this rank's unsharded gradients: (2 * 37,184 + 6,400)/2 dense
    # + 2 * 49,152 / (tp 2 * ep 2) expert parameters, 2 bytes each.
    assert cost.comm_bytes == {
        "tp": 6 * act * 2 * 4,
        "ep": 4 * (act / 2) * 2 * 2 * 4,
        "cp": 0.0,
        "pp": 2 * (act / 2) * 4,
        "dp": pytest.approx(2 * (40_384 + 24_576), rel=1e-12),
    }
    alone = step_cost(job(global_batch=1), Plan())
    assert alone.comm_bytes == {"tp": 0.0, "ep": 0.0, "cp": 0.0, "pp": 0.0, "dp": 0.0}


def test_fits_compares_memory_with_the_usable_nine_tenths():
    need = sum(step_cost(job(), Plan()).memory.values())
    roomy = replace(ACCEL, mem_gb=need / 0.9 / 1e9 * 1.001)
    tight = replace(ACCEL, mem_gb=need / 0.9 / 1e9 * 0.999)
    assert step_cost(job(accel=roomy), Plan()).fits
    assert not step_cost(job(accel=tight), Plan()).fits


def test_context_parallel_and_two_sequence_micro_batches():
    # tp2 cp2 dp2 pp2, 2 sequences per micro-batch: each cp rank holds 8 of the 16 positions.
    plan = Plan(tp=2, cp=2, dp=2, pp=2, micro_batch=2, recompute="selective", zero_stage=2)
    cost = step_cost(job(global_batch=8), plan)
    assert cost.micro_batches == 2  # 8 // (dp 2 * 2)
    # Dense weights shard over dp*cp = 4 ranks, like the experts (ep=1): 2 layers + half the
    # embeddings over tp: 40,384 dense + 49,152 expert parameters per rank before ZeRO.
    assert cost.memory["grads"] == pytest.approx(2 * (40_384 + 49_152) / 4, rel=1e-12)
    # Activations: s = 8, sbh = 8 * 2 * 64; (10,240/2 + 32,768/2) per layer less what
    # selective re-creates (norm outputs 2 * 2 * sbh / 2 = 2,048; activation output
    # 2 * 8 * 2 * 384 / 2 = 6,144), 2 layers, 2 micro-batches in flight, logits 8 * 2 * 8 * 100 / 2.
    assert cost.memory["activations"] == pytest.approx(2 * (21_504 - 8_192) * 2 + 6_400, rel=1e-12)
    # Re-creating them reads the inputs and writes them again: 2 x 8,192 bytes per layer, 2
    # layers, 2 micro-batches.
    assert cost.breakdown["recompute"] == pytest.approx(2 * 2 * 2 * 8_192 / HBM, rel=1e-12)
    act = 2 * 8 * 64 * 2
    # CP: each rank receives the other's K and V per layer forward: 2 sequences x 8 positions
    # x (K, V) x 2 of the 4 heads (tp 2) x 16 x 2 bytes = 2,048; x3 with backward; 2 layers,
    # 2 micro-batches.
    assert cost.comm_bytes == {"tp": 4 * act * 2 * 2, "ep": 0.0, "cp": 3 * 2_048 * 2 * 2, "pp": 2 * (act / 2) * 2,
                               "dp": pytest.approx(2 * (40_384 + 49_152), rel=1e-12)}
    # Gradients all-reduce over the dp*cp = 4 ranks at stride tp = 2, all inside the domain.
    t_dp = 2 * 2 * LAT + 2 * 3 / 4 * 2 * (40_384 + 49_152) / UP
    window = cost.breakdown["compute"] / 2 * 2 / 3
    assert cost.breakdown["dp_comm"] == pytest.approx(t_dp - window, rel=1e-12)
    # Pipeline neighbours are tp*cp*dp = 8 ranks apart: outside the 8-wide domain.
    assert cost.breakdown["pp_p2p"] == pytest.approx(2 * 2 * (LAT + (act / 2) / OUT), rel=1e-12)


def test_fp8_runs_the_linear_layers_at_the_fp8_peak_and_counts_mfu_there():
    fp8 = replace(ACCEL, fp8_tflops=200)
    bf16 = step_cost(job(accel=fp8), Plan(recompute="none"))
    f8 = step_cost(job(accel=fp8), Plan(recompute="none", precision="fp8"))
    # Attention's own products (scores, context), the router and the LM head stay bf16;
    # every other matmul runs twice as fast: 4 micro-batches of 3x forward (+ flash's
    # recomputed scores, bf16).
    router = 2 * 16 * 4 * 64
    slow = 4 * (3 * (4 * CORE + 3 * router + HEAD) + 4 * 0.5 * CORE) / MATMUL
    assert f8.breakdown["compute"] == pytest.approx(slow + (bf16.breakdown["compute"] - slow) / 2, rel=1e-12)
    assert f8.breakdown["fp8_cast"] > 0 and bf16.breakdown["fp8_cast"] == 0
    assert f8.mfu == pytest.approx(f8.model_flops / (f8.step_s * 200e12), rel=1e-12)


def test_an_accelerator_without_a_memory_bandwidth_is_costed_at_1_tb_per_s():
    cost = step_cost(job(accel=replace(ACCEL, mem_tbps=0.0)), Plan(recompute="none"))
    assert cost.breakdown["optimizer"] == pytest.approx(TOTAL_PARAMS * 36 / (1e12 * 0.5), rel=1e-12)


def test_zero3_with_tensor_and_context_parallel_and_full_recompute():
    plan = Plan(tp=2, cp=2, dp=2, micro_batch=2, zero_stage=3, recompute="full")
    mem = memory(job(), plan, 2)
    assert "gathered" not in mem  # only the communication model asks for it
    # Per tp rank: 80,768 dense and 98,304 expert parameters, both sharded over dp*cp = 4,
    # plus two gathered layers: 2 * (37,184 + 49,152) / tp 2, bf16.
    assert mem["weights"] == pytest.approx(2 * (80_768 + 98_304) / 4 + 2 * 86_336 / 2 * 2, rel=1e-12)
    # Full recompute keeps each layer's input, 2 * (2 * 8 positions) * 64 bytes / tp, and one
    # layer's working set (21,504, as in the cp test), with the tp-sharded logits.
    assert mem["activations"] == pytest.approx(4 * 1_024 + 21_504 + 6_400, rel=1e-12)
    cost = step_cost(job(global_batch=8), plan)
    assert cost.micro_batches == 2
    # Gradients (all of them, 2 bytes) all-reduced over 4 ranks at stride 2, plus the
    # weights gathered over the same group once for forward and once for backward per step.
    full = 2 * (80_768 + 98_304)
    ring = 2 * 2 * LAT + 2 * 3 / 4 * full / UP
    t_dp = ring + 2 * ring / 2
    window = cost.breakdown["compute"] * 2 / 3  # prefetch hides behind every micro-batch
    assert cost.breakdown["dp_comm"] == pytest.approx(max(0.0, t_dp - window), rel=1e-12)
    assert cost.breakdown["dp_comm"] > 0
