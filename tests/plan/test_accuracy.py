"""Accuracy on the published rows (shared/planner/calibration.csv): the issue's hard bounds."""

from __future__ import annotations

import json
import statistics

import pytest

from exaflop.plan.cli import main
from exaflop.plan.validate import predict, read_calibration


@pytest.fixture(scope="module")
def results(catalog, calibration_path):
    return [predict(r) for r in read_calibration(calibration_path, catalog)]


def errors(results, prefix: str) -> list[float]:
    return [abs(r["error_pct"]) for r in results if r["name"].startswith(prefix)]


def test_korthikanti_rows(results):
    e = errors(results, "korthikanti2022")
    assert len(e) == 8
    # In-sample (these rows set the constants), so only a regression guard ~10% above
    # today's 3.25% / 6.88%; the out-of-sample evidence is the cross-paper fit below.
    assert statistics.fmean(e) <= 3.6 and max(e) <= 7.6


def test_narayanan_rows(results):
    e = errors(results, "narayanan2021")
    assert len(e) == 10
    assert statistics.median(e) <= 2.1 and max(e) <= 6.6  # in-sample guard: today 1.85% / 5.96%


def test_validate_json(capsys, calibration_path):
    assert main(["validate", str(calibration_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 18
    for r in rows:
        assert {"name", "predicted_step_s", "measured_step_s", "error_pct"} <= set(r)
        assert r["error_pct"] == pytest.approx((r["predicted_step_s"] / r["measured_step_s"] - 1) * 100, abs=0.05)


def test_validate_table(capsys, calibration_path):
    assert main(["validate", str(calibration_path)]) == 0
    out = capsys.readouterr().out
    assert "korthikanti2022" in out and "median" in out


def test_packaged_copy_matches_shared(calibration_path):
    from exaflop.plan.catalog import CATALOG_DIR

    assert (CATALOG_DIR / "calibration.csv").read_text() == calibration_path.read_text()


@pytest.mark.parametrize("train_on,held_out_on,stat,bound,worst", [
    # docs/benchmarks.md quotes these: K -> N 2.46% median / 6.63% max, N -> K 4.33% mean / 9.16% max
    ("korthikanti2022", "narayanan2021", statistics.median, 3.0, 7.5),
    ("narayanan2021", "korthikanti2022", statistics.fmean, 4.8, 10.0),
])
def test_fit_on_one_paper_predicts_the_other(catalog, calibration_path, train_on, held_out_on, stat, bound, worst):
    """The efficiency model generalizes: constants fitted on one paper's rows alone predict the other's."""
    from exaflop.plan.efficiency import Efficiency
    from exaflop.plan.validate import fit

    rows = read_calibration(calibration_path, catalog)
    eff, _ = fit([r for r in rows if r.name.startswith(train_on)], Efficiency(0.8, 40.0, 0.8, 0.8), rounds=2)
    held_out = [abs(predict(r, eff)["error_pct"]) for r in rows if r.name.startswith(held_out_on)]
    assert len(held_out) >= 8
    assert stat(held_out) <= bound and max(held_out) <= worst
