"""Reliability arithmetic: Llama 3's failure rate, Young/Daly, goodput."""

from __future__ import annotations

import math

from exaflop.plan.outcome import FAILURES_PER_ACCEL_HOUR, goodput, young_daly


def test_llama3_failure_rate():
    assert FAILURES_PER_ACCEL_HOUR * 16384 * 54 * 24 == 419


def test_young_daly_interval_minimizes_waste():
    write, mtbf, restart = 30.0, 3 * 3600.0, 600.0
    best = young_daly(write, mtbf)
    assert best == math.sqrt(2 * write * mtbf) - write
    g = goodput(write, best, mtbf, restart)
    assert all(goodput(write, best * f, mtbf, restart) <= g + 1e-9 for f in (0.25, 0.5, 2, 4))


def test_goodput_collapses_when_restart_exceeds_mtbf():
    assert goodput(5.0, 60.0, 300.0, 600.0) == 0.0
