"""Reliability arithmetic: Llama 3's failure rate, Young/Daly, goodput."""

from __future__ import annotations

import math

import pytest

from exaflop.plan.outcome import FAILURES_PER_ACCEL_HOUR, goodput, young_daly


def test_interruptions_scale_with_accelerators_and_wall_clock():
    # Through the run arithmetic, not the constant: a job's failure rate is per accelerator,
    # so 10x the accelerators fail 10x as often, and the count is over wall-clock time
    # (checkpoint and restart overhead included), not the ideal time.
    from exaflop.plan.catalog import load_catalog
    from exaflop.plan.cost import Job, Plan, step_cost
    from exaflop.plan.outcome import RunInputs, outcome

    cat = load_catalog()
    m = cat.model("llama3-8b")
    job = Job(m, cat.accelerator("h100-sxm"), cat.network("llama3-h100-roce"), 1024, m.seq_len)
    runs = {}
    for n in (1024, 10240):
        cost = step_cost(job, Plan(tp=1, pp=1, dp=n, micro_batch=1, zero_stage=1))
        runs[n] = outcome(cost, m, n, m.seq_len, 700.0, RunInputs(tokens=1e12))
    for n, o in runs.items():
        mtbf_h = 54 * 24 / 419 * 16384 / n  # Llama 3: 419 in 54 days on 16,384 GPUs
        assert o.job_mtbf_h == pytest.approx(mtbf_h)
        assert o.interruptions == pytest.approx(o.days * 24 / mtbf_h)
        assert o.days > o.ideal_days  # the overhead is counted in wall-clock time
    assert FAILURES_PER_ACCEL_HOUR > 0


def test_young_daly_interval_minimizes_waste():
    write, mtbf, restart = 30.0, 3 * 3600.0, 600.0
    best = young_daly(write, mtbf)
    assert best == math.sqrt(2 * write * mtbf) - write
    g = goodput(write, best, mtbf, restart)
    assert all(goodput(write, best * f, mtbf, restart) <= g + 1e-9 for f in (0.25, 0.5, 2, 4))


def test_goodput_collapses_when_restart_exceeds_mtbf():
    assert goodput(5.0, 60.0, 300.0, 600.0) == 0.0
