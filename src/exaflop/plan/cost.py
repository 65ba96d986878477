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
    elementwise_bytes,
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
    """Kernel and overlap choices of the training stack a run used."""

    name: str
    flash_attention: bool  # no s x s scores in memory; masked tiles skipped; scores recomputed in backward
    dp_overlap: bool  # gradient reduce-scatter overlaps the last micro-batch's backward
    ep_overlap: bool = False  # expert all-to-alls hidden behind another micro-batch's compute
    bubble_scale: float = 1.0  # pipeline fill/drain relative to 1F1B's (p - 1) / (v m)
    ep_node_limit: int = 0  # > 0: a token crosses the network once per node, to at most this many nodes
    fp8_dispatch: bool = False  # fp8 runs send the dispatch all-to-all in fp8 (the combine stays bf16)


SOFTWARE = {
    "modern": Software("modern", flash_attention=True, dp_overlap=True),
    "megatron-2021": Software("megatron-2021", flash_attention=False, dp_overlap=False),
    # DeepSeek-V3 report, section 3.2: DualPipe overlaps forward and backward chunks of two
    # micro-batches, hiding the expert all-to-alls behind compute, and its bidirectional
    # schedule's (p/2 - 1) bubble is about half of 1F1B's (p - 1); its dispatch kernels send
    # each token once per node to at most 4 nodes (node-limited routing), forwarding inside
    # the node over NVLink, and dispatch in FP8.
    "deepseek-v3": Software("deepseek-v3", flash_attention=True, dp_overlap=True, ep_overlap=True,
                            bubble_scale=0.5, ep_node_limit=4, fp8_dispatch=True),
}
# FlashAttention (Dao et al., 2022) reached Megatron-LM and PyTorch's SDPA in 2023, the
# same year distributed optimizers overlapped their gradient reduce-scatter by default.
MODERN_FROM = 2023


def software_for(year: int, accel: Accelerator) -> Software:
    """The stack typical of a run's year (or its accelerator's first year when unknown)."""
    year = year or accel.year
    return SOFTWARE["modern" if not year or year >= MODERN_FROM else "megatron-2021"]


# Flash attention computes causal scores in 128-wide tiles and skips the tiles above the
# diagonal: (nb + 1) / (2 nb) of the s^2 products for nb tiles per row.
FLASH_TILE = 128
# Tokens on the most loaded expert relative to the mean under balanced routing: the
# capacity factor Switch Transformer (Fedus et al., 2021) trains with bounds it at 1.25;
# auxiliary-loss balancing keeps real runs below that. An assumption, documented as such.
MOE_IMBALANCE = 1.1


def causal_fraction(seq: int, flash: bool) -> float:
    """Share of the s x s attention products actually computed under a causal mask."""
    if not flash:
        return 1.0  # the 2021 kernels computed the full square and masked it
    tiles = max(seq // FLASH_TILE, 1)
    return (tiles + 1) / (2 * tiles)


def bubble_fraction(pp: int, micro_batches: int, vp: int) -> float:
    """1F1B pipeline fill/drain as a share of the ideal step: (p - 1) / (v m) (Narayanan et al. 2021)."""
    return (pp - 1) / (vp * max(micro_batches, 1))


def cp_ring_bytes(model: ModelSpec, mb: int, seq: int, tp: int, cp: int) -> float:
    """K and V bytes each context-parallel rank receives per layer forward: its ring
    neighbours' chunks, cp - 1 hops of seq/cp tokens (backward sends K, V and their grads: 2x)."""
    if cp <= 1:
        return 0.0
    kv_heads = -(-model.kv_heads // tp)  # GQA heads fewer than tp are replicated, not split
    return (cp - 1) * mb * (seq // cp) * 2 * kv_heads * model.head_dim * BYTES


def moe_a2a_bytes(model: ModelSpec, mb: int, seq: int, tp: int, cp: int, sp: bool) -> float:
    """Bytes one rank sends in one expert all-to-all (dispatch or combine) of one layer:
    its own tokens (a tp-th of the micro-batch under sequence parallelism) x top_k copies."""
    tokens = mb * seq // cp // (tp if sp else 1)
    return tokens * model.top_k * model.hidden * BYTES


def fp8_cast_bytes(mms: list) -> float:
    """Memory traffic of FP8 linear layers' casts, forward + backward: the input and weight
    cast to fp8 (read 2 B, write 1 B) and their transposed copies for the weight and data
    gradients (read and write 1 B), and the output gradient's cast (3 B)."""
    return sum(x.batch * (5 * (x.m * x.k + x.k * x.n) + 3 * x.m * x.n) for x in mms)


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
    # Under recompute "full": the share of a stage's layers recomputed (Megatron's
    # --recompute-method block --recompute-num-layers): just enough to fit, the rest keep
    # their activations.
    recompute_share: float = 1.0

    @property
    def n(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def recompute_label(self) -> str:
        if self.recompute == "full" and self.recompute_share < 1:
            return f"full-{self.recompute_share:.0%}"
        return self.recompute

    def label(self) -> str:
        return (f"tp{self.tp} pp{self.pp} dp{self.dp} cp{self.cp} ep{self.ep} vp{self.vp} "
                f"mb{self.micro_batch} {self.recompute_label} zero{self.zero_stage}")


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


CORE = ("scores", "context")  # attention's own products: bf16 even in fp8 runs
BF16_LINEAR = ("router", "logits")  # kept in bf16 by Transformer Engine / torchao float8 recipes


def matmul_time(job: Job, mms: list, precision: str) -> float:
    peak = job.accel.peak_flops(precision) * job.accel.gemm_factor(precision)
    total = 0.0
    for x in mms:
        t = x.flops / (peak * job.eff.gemm(x.m, x.n, x.k))
        total += t * (MOE_IMBALANCE if x.name.startswith("expert") else 1.0)
    return total


def precision_split(mms: list, precision: str) -> dict[str, list]:
    """Which matmuls run at which rate: fp8 recipes quantize the linear layers only."""
    if precision != "fp8":
        return {precision: list(mms)}
    low = [x for x in mms if x.name not in CORE and x.name not in BF16_LINEAR]
    return {"fp8": low, "bf16": [x for x in mms if x not in low]}


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
    linear = [x for x in attn if x.name not in CORE] + mlp_matmuls(m, mb, job.seq_len, tp, cp, ep, moe)
    core = [x for x in attn if x.name in CORE]
    split = precision_split(linear, precision)
    t_lin = sum(matmul_time(job, mms, p) for p, mms in split.items())
    t_core = matmul_time(job, core, "bf16") * causal_fraction(job.seq_len, sw.flash_attention)
    t_fwd = t_lin + t_core
    act, act_core = activation_bytes(m, mb, job.seq_len, tp, cp, sp, moe, not sw.flash_attention)
    # Memory-bound kernels write what they save and read it back: ~2 passes forward, 3 backward.
    e_fwd, e_core = mem_time(job, 2 * act), mem_time(job, 2 * act_core)
    tokens = mb * job.seq_len // cp
    out = {"compute": 3 * t_fwd, "elementwise": 2.5 * e_fwd}
    if sw.flash_attention:  # flash recomputes the scores inside its backward kernel
        out["compute"] += 0.5 * t_core
    out["fp8_cast"] = mem_time(job, fp8_cast_bytes(split["fp8"])) if "fp8" in split else 0.0
    # Tensor parallel: two all-reduces (or reduce-scatter + all-gather with SP) per direction.
    tp_one = 2 * fabric.all_reduce(tokens * m.hidden * BYTES, tp, 1)
    cp_one = 0.0
    if cp > 1:  # ring attention passes K and V around the ring, overlapped with the core
        hop = cp_ring_bytes(m, mb, job.seq_len, tp, cp) / (cp - 1)
        cp_one = max(0.0, (cp - 1) * fabric.p2p(hop, tp) - t_core)
    ep_one = out["moe_permute"] = 0.0
    if moe:
        a2a = moe_a2a_bytes(m, mb, job.seq_len, tp, cp, sp)
        # Permute tokens into expert order and back (read + write), forward and twice backward.
        out["moe_permute"] = 3 * mem_time(job, 4 * a2a)
        if ep > 1:  # dispatch and combine all-to-alls over the expert-parallel ranks
            if sw.ep_node_limit:
                scale = 0.5 if sw.fp8_dispatch and precision == "fp8" else 1.0
                ep_one = sum(fabric.node_limited_all_to_all(a2a * f, ep, tp * cp, m.top_k, sw.ep_node_limit)
                             for f in (scale, 1.0))
            else:
                ep_one = 2 * fabric.all_to_all(a2a, ep, tp * cp)
    out["tp_comm"], out["cp_comm"] = 2 * tp_one, 3 * cp_one
    # Forward and backward each dispatch and combine; DualPipe hides them behind the
    # other micro-batch's chunk.
    out["ep_comm"] = max(0.0, 2 * ep_one - out["compute"]) if sw.ep_overlap else 2 * ep_one
    if recompute == "full":
        out["recompute"] = t_fwd + e_fwd + tp_one + cp_one + ep_one
    elif recompute == "selective":
        out["recompute"] = selective_time(job, tp, cp, mb, sp, moe) if sw.flash_attention else t_core + e_core
    else:
        out["recompute"] = 0.0
    return out


def selective_time(job: Job, tp: int, cp: int, mb: int, sp: bool, moe: bool) -> float:
    """Selective recompute under flash attention: re-create the norm and activation outputs
    (read their inputs, write them again), memory-bound."""
    return mem_time(job, 2 * elementwise_bytes(job.model, mb, job.seq_len, tp, cp, sp, moe))


def stage_layers(model: ModelSpec, pp: int, vp: int = 1) -> int:
    """Layers on the most loaded stage: stages may be uneven (126 layers on 16 stages) and
    with interleaving each of a stage's vp chunks is rounded up on its own."""
    return vp * math.ceil(model.layers / (pp * vp))


def memory(job: Job, plan: Plan, micro_batches: int, with_gathered: bool = False) -> dict[str, float]:
    """Bytes on the most loaded accelerator by cause; `with_gathered` adds (not as memory)
    the bytes ZeRO-3 all-gathers per pass, for the communication model."""
    m, sw = job.model, job.software
    layers = stage_layers(m, plan.pp, plan.vp)
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
    # Selective: the 2021 kernels drop the attention core (the s^2 scores); with flash there
    # are none, and selective drops what elementwise ops can re-create.
    cheap = core if keep_scores else elementwise_bytes(m, plan.micro_batch, job.seq_len, plan.tp, plan.cp,
                                                       plan.sequence_parallel, m.moe)
    if plan.recompute == "full":
        saved = BYTES * plan.micro_batch * job.seq_len // plan.cp * m.hidden
        saved /= plan.tp if plan.sequence_parallel else 1
        # Layers outside the recomputed share keep selective's set (modern stacks) or all of it.
        rest = act - cheap if sw.flash_attention else act
        saved = plan.recompute_share * saved + (1 - plan.recompute_share) * rest
        working = act  # one layer's activations exist while it is recomputed
    else:
        saved, working = (act - cheap if plan.recompute == "selective" else act), 0.0
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


def step_cost(job: Job, plan: Plan, micro_batches: int | None = None, global_batch: int | None = None) -> StepCost:
    """Time, memory and communication of one optimizer step of `plan`.

    `global_batch` may be ragged (not a multiple of dp x micro-batch, e.g. 1024 sequences
    over dp = 124): the busiest rank then runs `micro_batches` rounded up, the model FLOPs
    count the real batch."""
    m, sw = job.model, job.software
    fabric = Fabric(job.network, job.eff.net_eff)
    if micro_batches is None:
        micro_batches = max(job.global_batch // (plan.dp * plan.micro_batch), 1)
    if global_batch is None:
        global_batch = micro_batches * plan.dp * plan.micro_batch
    layers = stage_layers(m, plan.pp, plan.vp)
    args = (plan.tp, plan.cp, plan.ep, plan.dp, plan.micro_batch, plan.recompute,
            plan.sequence_parallel, plan.precision)
    per_mb: dict[str, float] = {}
    n_moe = round(layers * m.moe_layers / m.layers)
    for moe, count in ((False, layers - n_moe), (True, n_moe)):
        if count:
            for k, v in layer_time(job, *args, moe).items():
                per_mb[k] = per_mb.get(k, 0.0) + v * count
    if plan.recompute == "full" and plan.recompute_share < 1:
        rest = 0.0  # the other layers' selective recompute (modern stacks)
        if sw.flash_attention:
            for moe, count in ((False, layers - n_moe), (True, n_moe)):
                rest += count * selective_time(job, plan.tp, plan.cp, plan.micro_batch, plan.sequence_parallel, moe)
        per_mb["recompute"] = plan.recompute_share * per_mb["recompute"] + (1 - plan.recompute_share) * rest
    # The last stage also runs the LM head and the loss.
    head = logits_matmul(m, plan.micro_batch, job.seq_len, plan.tp, plan.cp)
    per_mb["compute"] += 3 * matmul_time(job, [head], "bf16")
    per_mb["elementwise"] += mem_time(job, 3 * 4 * head.m * head.n)  # fp32 softmax-xent passes
    t_stage = sum(per_mb.values())

    bd = {k: v * micro_batches for k, v in per_mb.items()}
    bubble = bubble_fraction(plan.pp, micro_batches, plan.vp) * sw.bubble_scale
    bd["pp_bubble"] = bubble * micro_batches * t_stage
    stride_pp = plan.tp * plan.cp * plan.dp
    p2p_bytes = plan.micro_batch * job.seq_len // plan.cp * m.hidden * BYTES / plan.tp
    bd["pp_p2p"] = 2 * plan.vp * micro_batches * fabric.p2p(p2p_bytes, stride_pp) if plan.pp > 1 else 0.0

    mem = memory(job, plan, micro_batches, with_gathered=True)
    gathered = mem.pop("gathered")
    grad_bytes = mem["grads"] * (plan.dp * plan.cp if plan.zero_stage >= 2 else 1)
    t_dp = fabric.all_reduce(grad_bytes, plan.dp * plan.cp, plan.tp)
    if plan.zero_stage >= 3:  # gather weights once for forward and once for backward per step
        # The full weights, not the sharded memory times dp: that would also count the
        # gather buffer once per rank (tests/plan/test_formulas.py works it by hand).
        # Gathered layers stay resident across the step's micro-batches (FSDP2 without
        # resharding between accumulation steps; Llama 3 paper section 3.3.2).
        t_dp += 2 * fabric.reduce_scatter(gathered, plan.dp * plan.cp, plan.tp)
    # Gradients reduce during the last micro-batch's backward (2/3 of its compute); ZeRO-3's
    # gathers prefetch behind every micro-batch's forward and backward.
    window = per_mb["compute"] * 2 / 3 * (micro_batches if plan.zero_stage >= 3 else 1)
    # FSDP / ZeRO-3 overlap by construction (prefetching gathers, reduce-scatter hooks in
    # backward), whatever the era; plain data parallelism overlaps only in modern stacks.
    overlap = sw.dp_overlap or plan.zero_stage >= 3
    bd["dp_comm"] = max(0.0, t_dp - window) if overlap else t_dp
    optim_params = mem["optimizer"] / OPTIM_BYTES
    bd["optimizer"] = mem_time(job, optim_params * OPTIM_TRAFFIC)

    step = sum(bd.values())
    model_flops = 3 * forward_flops(m, job.seq_len) * global_batch
    mfu = model_flops / (step * plan.n * job.accel.peak_flops(plan.precision))
    fits = sum(mem.values()) <= job.accel.mem_gb * 1e9 * USABLE_MEMORY
    # Payload each accelerator hands to collectives per step (before algorithm overheads).
    act = plan.micro_batch * job.seq_len // plan.cp * m.hidden * BYTES
    tp_msgs = 4 + (2 * plan.recompute_share if plan.recompute == "full" else 0)
    a2a = moe_a2a_bytes(m, plan.micro_batch, job.seq_len, plan.tp, plan.cp, plan.sequence_parallel)
    comm = {"tp": tp_msgs * act * layers * micro_batches if plan.tp > 1 else 0.0,
            "ep": 4 * a2a * n_moe * micro_batches if plan.ep > 1 else 0.0,
            "cp": 3 * cp_ring_bytes(m, plan.micro_batch, job.seq_len, plan.tp, plan.cp) * layers * micro_batches,
            "pp": 2 * plan.vp * p2p_bytes * micro_batches if plan.pp > 1 else 0.0,
            "dp": grad_bytes if plan.dp * plan.cp > 1 else 0.0}
    return StepCost(plan, step, micro_batches, global_batch, bd, mem, model_flops, mfu, fits, comm)
