"""Cost of one optimizer step for (model, cluster, parallel plan): time, memory, communication.

Step time is the pipeline's critical path, one micro-batch at a time through the
slowest stage (1F1B; interleaving divides the fill/drain bubble by vp), plus the part
of the data-parallel gradient reduction that does not hide behind the backward pass,
plus the optimizer update (memory-bound). Every per-layer piece is computed once per
shape and cached, which is what lets the search visit tens of thousands of plans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

from exaflop.plan.catalog import Accelerator, ModelSpec, Network
from exaflop.plan.efficiency import CALIBRATED, Efficiency
from exaflop.plan.network import Fabric
from exaflop.plan.shapes import (
    BYTES,
    activation_bytes,
    attention_matmuls,
    embedding_params,
    forward_flops,
    layer_params,
    logits_matmul,
    mlp_matmuls,
)

RECOMPUTE = ("none", "selective", "full")
WEIGHT_BYTES, GRAD_BYTES, OPTIM_BYTES = 2, 2, 12  # bf16 weights/grads; fp32 master, m, v
OPTIM_TRAFFIC = 36  # bytes moved per parameter by the Adam update (read+write master, m, v, grad, copy)
USABLE_MEMORY = 0.9  # the rest: CUDA context, NCCL buffers, allocator fragmentation


@dataclass(frozen=True)
class Software:
    """Kernel and overlap choices of the training stack; the published rows ran 2021-22 Megatron."""

    name: str
    flash_attention: bool  # no s x s scores in memory; scores recomputed inside backward
    dp_overlap: bool  # gradient reduce-scatter overlaps the last micro-batch's backward


SOFTWARE = {
    "modern": Software("modern", flash_attention=True, dp_overlap=True),
    "megatron-2021": Software("megatron-2021", flash_attention=False, dp_overlap=False),
}


@dataclass(frozen=True)
class Plan:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1  # expert parallel: experts sharded over ep of the dp ranks
    vp: int = 1  # interleaved pipeline chunks per stage
    micro_batch: int = 1
    recompute: str = "selective"
    sequence_parallel: bool = True
    zero_stage: int = 1
    precision: str = "bf16"

    @property
    def n(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    def label(self) -> str:
        return (f"tp{self.tp} pp{self.pp} dp{self.dp} cp{self.cp} ep{self.ep} vp{self.vp} "
                f"mb{self.micro_batch} {self.recompute} zero{self.zero_stage}")


@dataclass(frozen=True)
class Job:
    model: ModelSpec
    accel: Accelerator
    network: Network
    global_batch: int  # sequences per optimizer step
    seq_len: int
    software: Software = SOFTWARE["modern"]
    eff: Efficiency = CALIBRATED


@dataclass
class StepCost:
    plan: Plan
    step_s: float
    micro_batches: int
    global_batch: int
    breakdown: dict[str, float]  # seconds per step by cause; sums to step_s
    memory: dict[str, float]  # bytes on the most loaded accelerator by cause
    model_flops: float  # per step, whole cluster, without recompute
    mfu: float
    fits: bool = True
    comm_bytes: dict[str, float] = field(default_factory=dict)

    @property
    def memory_gb(self) -> float:
        return sum(self.memory.values()) / 1e9


def matmul_time(job: Job, mms: list, precision: str) -> float:
    peak = job.accel.peak_flops(precision)
    return sum(x.flops / (peak * job.eff.gemm(x.m, x.n, x.k)) for x in mms)


def mem_time(job: Job, nbytes: float) -> float:
    bw = (job.accel.mem_tbps or 1.0) * 1e12 * job.eff.mem_eff
    return nbytes / bw


@lru_cache(maxsize=65536)
def layer_time(job: Job, tp: int, cp: int, ep: int, dp: int, mb: int, recompute: str, sp: bool,
               precision: str, moe: bool) -> dict[str, float]:
    """Seconds for one layer, one micro-batch, forward + backward (+ recompute), by cause."""
    m, sw = job.model, job.software
    fabric = Fabric(job.network, job.eff.net_eff)
    attn = attention_matmuls(m, mb, job.seq_len, tp, cp)
    core = [x for x in attn if x.name in ("scores", "context")]
    t_fwd = matmul_time(job, attn + mlp_matmuls(m, mb, job.seq_len, tp, cp, ep, moe), precision)
    t_core = matmul_time(job, core, precision)
    act, act_core = activation_bytes(m, mb, job.seq_len, tp, cp, sp, moe, not sw.flash_attention)
    # Memory-bound kernels write what they save and read it back: ~2 passes forward, 3 backward.
    e_fwd, e_core = mem_time(job, 2 * act), mem_time(job, 2 * act_core)
    tokens = mb * job.seq_len // cp
    out = {"compute": 3 * t_fwd, "elementwise": 2.5 * e_fwd}
    if sw.flash_attention:  # flash recomputes the scores inside its backward kernel
        out["compute"] += 0.5 * t_core
    # Tensor parallel: two all-reduces (or reduce-scatter + all-gather with SP) per direction.
    tp_one = 2 * fabric.all_reduce(tokens * m.hidden * BYTES, tp, 1)
    cp_one = 0.0
    if cp > 1:  # ring attention passes K and V around the ring, overlapped with the core
        kv = tokens * 2 * m.kv_heads * m.head_dim // max(tp, 1) * BYTES
        cp_one = max(0.0, (cp - 1) * fabric.p2p(kv, tp) - t_core)
    ep_one = 0.0
    if moe and ep > 1:  # dispatch and combine all-to-alls over the expert-parallel ranks
        ep_one = 2 * fabric.all_to_all(tokens * m.top_k * m.hidden * BYTES, ep, tp * cp)
    out["tp_comm"], out["cp_comm"], out["ep_comm"] = 2 * tp_one, 3 * cp_one, 2 * ep_one
    if recompute == "full":
        out["recompute"] = t_fwd + e_fwd + tp_one + cp_one + ep_one
    elif recompute == "selective" and not sw.flash_attention:
        out["recompute"] = t_core + e_core
    else:
        out["recompute"] = 0.0
    return out


def stage_layers(model: ModelSpec, pp: int) -> int:
    """Layers on the most loaded stage (stages may be uneven, e.g. 126 layers on 16 stages)."""
    return math.ceil(model.layers / pp)


def memory(job: Job, plan: Plan, micro_batches: int, with_gathered: bool = False) -> dict[str, float]:
    """Bytes on the most loaded accelerator by cause; `with_gathered` adds (not as memory)
    the bytes ZeRO-3 all-gathers per pass, for the communication model."""
    m, sw = job.model, job.software
    layers = stage_layers(m, plan.pp)
    moe_share = m.moe_layers / m.layers
    dense, expert = layer_params(m, False)
    if m.moe:
        d_moe, e_moe = layer_params(m, True)
        dense = dense * (1 - moe_share) + d_moe * moe_share
        expert = e_moe * moe_share
    # Embedding and head live on the first and last stage; with pp == 1 on the same one.
    embed = embedding_params(m) / (1 if plan.pp == 1 else 2)
    dense_params = (layers * dense + embed) / plan.tp
    expert_params = layers * expert / (plan.tp * plan.ep)
    dp_dense, dp_expert = plan.dp * plan.cp, max(plan.dp * plan.cp // plan.ep, 1)

    def sharded(nbytes: float, stage: int) -> float:
        d = dense_params * nbytes / (dp_dense if plan.zero_stage >= stage else 1)
        return d + expert_params * nbytes / (dp_expert if plan.zero_stage >= stage else 1)

    out = {"weights": sharded(WEIGHT_BYTES, 3), "grads": sharded(GRAD_BYTES, 2),
           "optimizer": sharded(OPTIM_BYTES, 1)}
    # What ZeRO-3's all-gathers reassemble each pass: this stage's weights, unsharded over dp.
    out_gathered = (dense_params + expert_params) * WEIGHT_BYTES
    keep_scores = not sw.flash_attention
    act, core = activation_bytes(m, plan.micro_batch, job.seq_len, plan.tp, plan.cp,
                                 plan.sequence_parallel, m.moe, keep_scores)
    if plan.recompute == "full":
        saved = BYTES * plan.micro_batch * job.seq_len // plan.cp * m.hidden
        saved /= plan.tp if plan.sequence_parallel else 1
        working = act  # one layer's activations exist while it is recomputed
    else:
        saved, working = (act - core if plan.recompute == "selective" else act), 0.0
    # 1F1B: the first stage holds up to pp micro-batches in flight; interleaving adds more.
    in_flight = min(plan.pp, micro_batches)
    if plan.vp > 1:
        in_flight *= 1 + (plan.pp - 1) / (plan.pp * plan.vp)
    logits = 2 * 4 * plan.micro_batch * job.seq_len // plan.cp * m.vocab / plan.tp  # fp32 + grad
    out["activations"] = layers * saved * in_flight + working + logits
    if plan.zero_stage >= 3:  # a gathered layer (and its prefetched neighbour)
        out["weights"] += 2 * (dense + expert / plan.ep) / plan.tp * WEIGHT_BYTES
    if with_gathered:
        out["gathered"] = out_gathered
    return out


def step_cost(job: Job, plan: Plan, micro_batches: int | None = None) -> StepCost:
    """Time, memory and communication of one optimizer step of `plan`."""
    m, sw = job.model, job.software
    fabric = Fabric(job.network, job.eff.net_eff)
    if micro_batches is None:
        micro_batches = max(job.global_batch // (plan.dp * plan.micro_batch), 1)
    global_batch = micro_batches * plan.dp * plan.micro_batch
    layers = stage_layers(m, plan.pp)
    args = (plan.tp, plan.cp, plan.ep, plan.dp, plan.micro_batch, plan.recompute,
            plan.sequence_parallel, plan.precision)
    per_mb: dict[str, float] = {}
    n_moe = round(layers * m.moe_layers / m.layers)
    for moe, count in ((False, layers - n_moe), (True, n_moe)):
        if count:
            for k, v in layer_time(job, *args, moe).items():
                per_mb[k] = per_mb.get(k, 0.0) + v * count
    # The last stage also runs the LM head and the loss.
    head = logits_matmul(m, plan.micro_batch, job.seq_len, plan.tp, plan.cp)
    per_mb["compute"] += 3 * matmul_time(job, [head], plan.precision)
    per_mb["elementwise"] += mem_time(job, 3 * 4 * head.m * head.n)  # fp32 softmax-xent passes
    t_stage = sum(per_mb.values())

    bd = {k: v * micro_batches for k, v in per_mb.items()}
    bd["pp_bubble"] = (plan.pp - 1) / plan.vp * t_stage
    stride_pp = plan.tp * plan.cp * plan.dp
    p2p_bytes = plan.micro_batch * job.seq_len // plan.cp * m.hidden * BYTES / plan.tp
    bd["pp_p2p"] = 2 * plan.vp * micro_batches * fabric.p2p(p2p_bytes, stride_pp) if plan.pp > 1 else 0.0

    mem = memory(job, plan, micro_batches, with_gathered=True)
    gathered = mem.pop("gathered")
    grad_bytes = mem["grads"] * (plan.dp * plan.cp if plan.zero_stage >= 2 else 1)
    t_dp = fabric.all_reduce(grad_bytes, plan.dp * plan.cp, plan.tp)
    if plan.zero_stage >= 3:  # gather weights for forward and again for backward, per micro-batch
        # The full weights, not the sharded memory times dp: that would also count the
        # gather buffer once per rank (tests/plan/test_formulas.py works it by hand).
        t_dp += 2 * micro_batches * fabric.reduce_scatter(gathered, plan.dp * plan.cp, plan.tp)
    # Gradients reduce during the last micro-batch's backward (2/3 of its compute); ZeRO-3's
    # gathers prefetch behind every micro-batch's forward and backward.
    window = per_mb["compute"] * 2 / 3 * (micro_batches if plan.zero_stage >= 3 else 1)
    bd["dp_comm"] = max(0.0, t_dp - window) if sw.dp_overlap else t_dp
    optim_params = mem["optimizer"] / OPTIM_BYTES
    bd["optimizer"] = mem_time(job, optim_params * OPTIM_TRAFFIC)

    step = sum(bd.values())
    model_flops = 3 * forward_flops(m, job.seq_len) * global_batch
    mfu = model_flops / (step * plan.n * job.accel.peak_flops(plan.precision))
    fits = sum(mem.values()) <= job.accel.mem_gb * 1e9 * USABLE_MEMORY
    # Payload each accelerator hands to collectives per step (before algorithm overheads).
    act = plan.micro_batch * job.seq_len // plan.cp * m.hidden * BYTES
    tp_msgs = 4 + (2 if plan.recompute == "full" else 0)
    comm = {"tp": tp_msgs * act * layers * micro_batches if plan.tp > 1 else 0.0,
            "ep": 4 * act * m.top_k * n_moe * micro_batches if plan.ep > 1 else 0.0,
            "pp": 2 * plan.vp * p2p_bytes * micro_batches if plan.pp > 1 else 0.0,
            "dp": grad_bytes if plan.dp * plan.cp > 1 else 0.0}
    return StepCost(plan, step, micro_batches, global_batch, bd, mem, model_flops, mfu, fits, comm)
