"""Search every valid TP x PP x DP x CP (x EP inside DP x CP) factorization of the accelerator count.

For each factorization the search tries micro-batch sizes and interleaving depths;
recompute mode and ZeRO stage are not free knobs for speed (less recompute and less
sharding are never slower), so for each recompute mode it takes the least sharding
that fits, and keeps the fastest. Plans are ranked by tokens per second, i.e. time to
train. The global batch is an upper bound (the critical batch size): a plan may use a
slightly smaller one so that awkward accelerator counts like 1,000,000 still factor.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

from exaflop.errors import UserError
from exaflop.plan.cost import (
    RECOMPUTE,
    USABLE_MEMORY,
    Job,
    Plan,
    StepCost,
    memory,
    stage_layers,
    step_cost,
)

MICRO_BATCHES = (1, 2, 4, 8)
INTERLEAVE = (1, 2, 3, 4, 6, 8)
MAX_CP = 32
MIN_TOKENS_PER_CP_RANK = 1024  # below this, ring-attention chunks are too small to hide their exchange


@dataclass
class SearchResult:
    plans: list[StepCost]  # best first
    evaluated: int
    seconds: float
    smallest: StepCost | None = None  # least memory seen, for the "does not fit" message
    notes: list[str] = field(default_factory=list)


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def factorizations(job: Job, n: int, fixed: dict[str, Any]):
    """Yield (tp, cp, pp, dp) with tp*cp*pp*dp == n that the model's shape allows."""
    m = job.model
    domain = max(job.network.scaleup_domain, 8)
    # The size limits below steer the search away from plans nobody would run; a pinned
    # value (a published run) only has to be well formed.
    for tp in divisors(n):
        if m.heads % tp or fixed.get("tp", tp) != tp or ("tp" not in fixed and tp > 2 * domain):
            continue
        for cp in divisors(n // tp):
            if fixed.get("cp", cp) != cp or (cp > 1 and job.seq_len % cp):
                continue
            if "cp" not in fixed and cp > 1 and (cp > MAX_CP or job.seq_len // cp < MIN_TOKENS_PER_CP_RANK):
                continue
            for pp in divisors(n // (tp * cp)):
                if pp > m.layers or fixed.get("pp", pp) != pp:
                    continue
                dp = n // (tp * cp * pp)
                if fixed.get("dp", dp) != dp or dp > job.global_batch:
                    continue
                yield tp, cp, pp, dp


def search(job: Job, n: int, fixed: dict[str, Any] | None = None, exact_batch: bool = False,
           keep: int = 10) -> SearchResult:
    """All plans for `n` accelerators that fit in memory, fastest first."""
    fixed = dict(fixed or {})
    t0 = time.perf_counter()
    m = job.model
    usable = job.accel.mem_gb * 1e9 * USABLE_MEMORY
    best: list[StepCost] = []
    smallest: StepCost | None = None
    evaluated = 0
    n_factorizations = 0
    for tp, cp, pp, dp in factorizations(job, n, fixed):
        n_factorizations += 1
        # Megatron draws the expert-parallel group from the data x context ranks.
        eps = [e for e in (divisors(math.gcd(dp * cp, m.experts)) if m.moe else [1]) if fixed.get("ep", e) == e]
        for mb in MICRO_BATCHES:
            if fixed.get("micro_batch", mb) != mb or dp * mb > job.global_batch:
                continue
            ragged = job.global_batch % (dp * mb) != 0
            if ragged and not exact_batch:
                micro, batch = job.global_batch // (dp * mb), None
            else:  # a published batch that dp does not divide: the busiest rank sets the pace
                micro, batch = math.ceil(math.ceil(job.global_batch / dp) / mb), job.global_batch
            for vp in _interleave(fixed, pp, m.layers, micro):
                for ep in eps:
                    base = Plan(tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, vp=vp, micro_batch=mb,
                                sequence_parallel=fixed.get("sequence_parallel", tp > 1),
                                precision=fixed.get("precision", "bf16"))
                    for plan, fits in _fitting_variants(job, base, micro, usable, fixed):
                        evaluated += 1
                        cost = step_cost(job, plan, micro, batch)
                        if not fits:
                            if smallest is None or cost.memory_gb < smallest.memory_gb:
                                smallest = cost
                            continue
                        best.append(cost)
        if len(best) > 4 * keep:  # keep the list short; sorting 40 items is free
            best = sorted(best, key=_rank)[:keep]
    result = SearchResult(sorted(best, key=_rank)[:keep], evaluated, time.perf_counter() - t0, smallest)
    if not n_factorizations:
        raise UserError(no_factorization_reason(job, n, fixed))
    return result


def _interleave(fixed: dict[str, Any], pp: int, layers: int, micro: int) -> list[int]:
    """Interleaving depths to try. A pinned vp is taken as published (any depth with at
    least one layer per chunk, any micro-batch count); the search's own choices keep
    Megatron's rule that the micro-batches divide evenly into the stages."""
    if "vp" in fixed:
        vp = fixed["vp"]
        return [vp] if vp == 1 or (pp > 1 and pp * vp <= layers) else []
    return [v for v in INTERLEAVE if v == 1 or (pp > 1 and pp * v <= layers and micro % pp == 0)]


def _rank(c: StepCost) -> float:
    return c.step_s / c.global_batch  # seconds per sequence: lower trains faster


def _fitting_variants(job: Job, base: Plan, micro: int, usable: float, fixed: dict[str, Any]):
    """For each recompute mode, the least ZeRO sharding that fits (plan, True); else the
    most sharded (plan, False). Unless recompute is pinned, "full" recomputes only the share
    of layers needed to fit (all of them if nothing less fits), the others keeping
    selective's set; with flash attention a pinned "selective" may add that share too
    (what modern stacks do when fine-grained recompute alone does not fit)."""
    flash = job.software.flash_attention
    pinned = fixed.get("recompute")
    if pinned == "selective" and flash:
        modes = ["selective", "full"]  # selective, plus whole layers only if that is not enough
    elif pinned:
        modes = [pinned]
    else:
        modes = list(RECOMPUTE)
    if "zero_stage" in fixed:
        stages = [fixed["zero_stage"]]
    elif base.dp * base.cp > 1:
        stages = [1, 3]  # ZeRO-1 costs what plain DP costs (reduce-scatter + all-gather); 2 == 1 in time
    else:
        stages = [0]
    partial = pinned is None or (flash and pinned == "selective")
    for mode in modes:
        plan = None
        for z in stages:
            plan = replace(base, recompute=mode, zero_stage=z)
            need = sum(memory(job, plan, micro).values())
            if need > usable:
                continue
            if mode == "full" and partial:
                plan = replace(plan, recompute_share=_recompute_share(job, plan, micro, usable, need))
            yield plan, True
            break
        else:
            if plan is not None and mode == modes[-1]:
                yield plan, False
            continue
        if z == stages[0]:
            return  # fits with the least sharding: more recompute can only be slower


def _recompute_share(job: Job, plan: Plan, micro: int, usable: float, need_full: float) -> float:
    """Fewest recomputed layers (as a share of the stage's) that fit: activation memory is
    linear in the share, so interpolate between none and all, rounded up to whole layers."""
    need_none = sum(memory(job, replace(plan, recompute_share=0.0), micro).values())
    if need_none <= need_full:
        return 1.0
    share = (need_none - usable) / (need_none - need_full)
    layers = stage_layers(job.model, plan.pp, plan.vp)
    return min(1.0, max(1, math.ceil(share * layers)) / layers)


def pin_problem(job: Job, n: int, fixed: dict[str, Any]) -> str | None:
    """The first pinned value that breaks a rule on its own, as 'field=value rule' (None if each
    pin is fine alone and only their combination fails)."""
    m = job.model
    rules = [
        ("tp", lambda v: m.heads % v == 0, f"must divide heads={m.heads}"),
        ("cp", lambda v: job.seq_len % v == 0, f"must divide seq_len={job.seq_len}"),
        ("pp", lambda v: v <= m.layers, f"must be <= layers={m.layers}"),
        ("dp", lambda v: v <= job.global_batch, f"must be <= the global batch of {job.global_batch} sequences"),
        ("vp", lambda v: v == 1 or fixed.get("pp", 2) * v <= m.layers, "pp*vp must be <= layers (one layer per chunk)"),
        ("ep", lambda v: m.experts % v == 0 and (fixed.get("dp", 1) * fixed.get("cp", 1)) % v == 0
                         if "dp" in fixed else m.experts % v == 0,
         f"must divide experts={m.experts} and dp*cp (experts are drawn from the data x context ranks)"),
    ]
    for name, ok, rule in rules:
        if name in fixed and not ok(fixed[name]):
            return f"{name}={fixed[name]} {rule}"
    dims = [fixed[k] for k in ("tp", "pp", "dp", "cp") if k in fixed]
    if dims and n % math.prod(dims):
        return f"the pinned tp/pp/dp/cp multiply to {math.prod(dims)}, which does not divide n={n}"
    return None


def no_factorization_reason(job: Job, n: int, fixed: dict[str, Any]) -> str:
    m = job.model
    pins = {k: v for k, v in fixed.items() if k not in ("precision", "sequence_parallel")}
    if pins:
        pinned = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in pins.items())
        why = pin_problem(job, n, fixed)
        if why:
            return f"--n {n} with {pinned}: {why}; drop or change that pin"
        return (f"--n {n}: no factorization tp*pp*dp*cp = {n} is consistent with {pinned} and the model "
                f"({m.layers} layers, {m.heads} heads, global batch {job.global_batch}); drop or change a pin")
    return (f"--n {n}: no factorization tp*pp*dp*cp = {n} fits the model: tp must divide {m.heads} heads, "
            f"pp <= {m.layers} layers, dp <= global batch {job.global_batch} sequences, "
            f"cp <= {MAX_CP}; pick an --n with more factors of 2 or raise --global-batch-tokens")


def not_fit_message(job: Job, n: int, res: SearchResult, fixed: dict[str, Any] | None = None) -> str:
    usable = job.accel.mem_gb * USABLE_MEMORY
    s = res.smallest
    if s is None:
        why = pin_problem(job, n, fixed or {})
        return (f"{job.model.name} on {n} x {job.accel.name}: no plan matches the pins"
                + (f": {why}; drop or change that pin" if why else "; drop or change a pin"))
    state = s.memory["weights"] + s.memory["grads"] + s.memory["optimizer"]
    knob = ("more accelerators (--n) or one with more memory: weights, gradients and optimizer "
            "state alone exceed it" if state > usable * 1e9 else
            "a shorter --seq-len or a smaller --global-batch-tokens: activations dominate")
    return (f"{job.model.name} does not fit on {job.accel.name} ({usable:.1f} GB usable): the smallest "
            f"need is {s.memory_gb:.1f} GB per accelerator ({s.plan.label()}); fix: {knob}")
