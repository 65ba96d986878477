"""Run-level answers for a chosen plan: time, accelerator-hours, energy, money, reliability.

Reliability follows the Llama 3 paper's published experience: 419 unexpected
interruptions in 54 days of pre-training on 16,384 H100s, i.e. a per-accelerator
failure rate that the job's failure rate scales with. Checkpointing uses the
Young/Daly optimum interval sqrt(2 * write_time * MTBF) and the usual first-order
waste model: time writing checkpoints, work lost since the last one (half an interval
on average) and the restart itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from exaflop.plan.catalog import ModelSpec
from exaflop.plan.cost import OPTIM_BYTES, WEIGHT_BYTES, StepCost
from exaflop.plan.shapes import total_params

LLAMA3_INTERRUPTIONS, LLAMA3_DAYS, LLAMA3_GPUS = 419, 54, 16384
FAILURES_PER_ACCEL_HOUR = LLAMA3_INTERRUPTIONS / (LLAMA3_DAYS * 24 * LLAMA3_GPUS)


@dataclass(frozen=True)
class RunInputs:
    tokens: float = 15e12  # tokens to train on (Llama 3 405B: 15.6T)
    pue: float = 1.2  # facility power / IT power
    system_factor: float = 1.5  # node power / accelerator power (CPUs, NICs, switches, fans)
    usd_per_accel_hour: float = 2.0
    failures_per_accel_hour: float = FAILURES_PER_ACCEL_HOUR
    storage_gbps: float = 2000.0  # aggregate checkpoint write bandwidth, GB/s (Llama 3: 2-7 TB/s)
    restart_s: float = 600.0  # detect, reschedule, reload after an interruption


@dataclass
class RunOutcome:
    steps: int
    step_s: float
    tokens_per_s: float
    ideal_days: float  # without failures or checkpoints
    days: float  # wall clock including checkpoint and failure overhead
    accel_hours: float
    mfu: float
    avg_power_mw: float  # facility power while training
    energy_mwh: float
    cost_usd: float
    job_mtbf_h: float
    interruptions: float
    checkpoint_gb: float
    checkpoint_write_s: float
    checkpoint_interval_s: float
    goodput: float  # useful fraction of wall-clock time

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def checkpoint_bytes(model: ModelSpec) -> float:
    """Weights plus optimizer state (fp32 master, m, v): what a resumable checkpoint holds."""
    total, _ = total_params(model)
    return total * (WEIGHT_BYTES + OPTIM_BYTES)


def goodput(write_s: float, interval_s: float, mtbf_s: float, restart_s: float) -> float:
    """Fraction of time doing useful work with checkpoints every `interval_s`."""
    if interval_s <= 0:
        return 0.0
    useful_per_segment = interval_s / (interval_s + write_s)
    lost_per_failure = (interval_s + write_s) / 2 + restart_s
    return max(0.0, useful_per_segment * (1 - lost_per_failure / mtbf_s))


def young_daly(write_s: float, mtbf_s: float) -> float:
    """Daly's first-order optimum; falls back to the MTBF when writes are slower than failures."""
    if write_s >= 2 * mtbf_s:
        return mtbf_s
    return math.sqrt(2 * write_s * mtbf_s) - write_s if write_s > 0 else mtbf_s


def outcome(cost: StepCost, model: ModelSpec, n: int, seq_len: int, power_w: float, run: RunInputs) -> RunOutcome:
    tokens_per_step = cost.global_batch * seq_len
    steps = math.ceil(run.tokens / tokens_per_step)
    ideal_s = steps * cost.step_s
    mtbf_s = 3600 / (run.failures_per_accel_hour * n) if run.failures_per_accel_hour > 0 else math.inf
    ckpt = checkpoint_bytes(model)
    write_s = ckpt / (run.storage_gbps * 1e9)
    interval = young_daly(write_s, mtbf_s) if math.isfinite(mtbf_s) else ideal_s
    good = goodput(write_s, interval, mtbf_s, run.restart_s) if math.isfinite(mtbf_s) else 1.0
    wall_s = ideal_s / good if good > 0 else math.inf
    hours = wall_s / 3600
    power_mw = n * power_w * run.system_factor * run.pue / 1e6
    return RunOutcome(
        steps=steps, step_s=cost.step_s, tokens_per_s=tokens_per_step / cost.step_s,
        ideal_days=ideal_s / 86400, days=wall_s / 86400, accel_hours=n * hours, mfu=cost.mfu,
        avg_power_mw=power_mw, energy_mwh=power_mw * hours, cost_usd=n * hours * run.usd_per_accel_hour,
        job_mtbf_h=mtbf_s / 3600, interruptions=hours * 3600 / mtbf_s if math.isfinite(mtbf_s) else 0.0,
        checkpoint_gb=ckpt / 1e9, checkpoint_write_s=write_s, checkpoint_interval_s=interval, goodput=good,
    )
