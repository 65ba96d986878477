"""Predict published step times (calibration.csv format) and fit the efficiency model once.

Each row fixes a model shape, a cluster and (some of) a parallel plan; blank plan fields
are chosen by the search, exactly as for a user's plan. The rows ran 2021-22
Megatron-LM, so the default software profile is "megatron-2021" (no flash attention, no
gradient-reduction overlap); an optional `software` column overrides it per row.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from exaflop.errors import UserError
from exaflop.plan.catalog import Catalog, ModelSpec, parse_field, read_rows
from exaflop.plan.cost import RECOMPUTE, SOFTWARE, Job
from exaflop.plan.efficiency import CALIBRATED, Efficiency
from exaflop.plan.search import search

REQUIRED = ["name", "accelerator", "n_accel", "layers", "hidden", "heads", "ffn", "vocab",
            "seq_len", "global_batch", "measured_step_s"]
INT_COLUMNS = ["n_accel", "layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "seq_len",
               "global_batch", "experts", "top_k", "tp", "pp", "dp", "cp", "ep", "vp",
               "micro_batch", "zero_stage"]


@dataclass
class Row:
    line: int
    name: str
    source: str
    job: Job
    n: int
    fixed: dict[str, Any]
    measured_step_s: float


def _choice(path: Path, line: int, column: str, text: str, allowed: tuple[str, ...]) -> str:
    if text not in allowed:
        raise UserError(f"{path}:{line}: field {column}={text!r}: expected one of {', '.join(allowed)}")
    return text


def read_calibration(path: Path, catalog: Catalog, software: str = "megatron-2021") -> list[Row]:
    rows = []
    for line, raw in read_rows(path, REQUIRED):
        for col in REQUIRED:
            if not raw[col]:
                raise UserError(f"{path}:{line}: field {col} is empty; give a value")
        num = {c: parse_field(path, line, c, raw[c], int) for c in INT_COLUMNS if raw.get(c)}
        measured = parse_field(path, line, "measured_step_s", raw["measured_step_s"], float)
        try:
            accel = catalog.accelerator(raw["accelerator"])
        except UserError as e:
            raise UserError(f"{path}:{line}: field accelerator: {e}") from None
        model = ModelSpec(
            name=raw["name"], layers=num["layers"], hidden=num["hidden"], heads=num["heads"],
            kv_heads=num.get("kv_heads", num["heads"]), ffn=num["ffn"], vocab=num["vocab"],
            seq_len=num["seq_len"], mlp=_choice(path, line, "mlp", raw.get("mlp") or "gelu", ("gelu", "swiglu")),
            experts=num.get("experts", 1), top_k=num.get("top_k", 1),
        )
        fixed: dict[str, Any] = {k: num[k] for k in ("tp", "pp", "dp", "cp", "ep", "vp", "micro_batch", "zero_stage") if k in num}
        if raw.get("recompute"):
            fixed["recompute"] = _choice(path, line, "recompute", raw["recompute"], RECOMPUTE)
        if raw.get("sequence_parallel"):
            fixed["sequence_parallel"] = _choice(path, line, "sequence_parallel", raw["sequence_parallel"], ("yes", "no")) == "yes"
        if raw.get("precision"):
            prec = _choice(path, line, "precision", raw["precision"], ("fp16", "bf16", "fp8"))
            fixed["precision"] = "bf16" if prec == "fp16" else prec  # same tensor-core rate
        fixed.setdefault("vp", 1)  # the format says blank vp means no interleaving
        dims = [fixed.get(k) for k in ("tp", "pp", "dp", "cp")]
        if all(dims) and dims[0] * dims[1] * dims[2] * dims[3] != num["n_accel"]:
            raise UserError(f"{path}:{line}: tp*pp*dp*cp = {dims[0] * dims[1] * dims[2] * dims[3]} "
                            f"but n_accel = {num['n_accel']}; fix one of them")
        sw = _choice(path, line, "software", raw.get("software") or software, tuple(SOFTWARE))
        job = Job(model, accel, catalog.default_network(accel), num["global_batch"], num["seq_len"], SOFTWARE[sw])
        rows.append(Row(line, raw["name"], raw.get("source", ""), job, num["n_accel"], fixed, measured))
    if not rows:
        raise UserError(f"{path}: no rows; the columns are those of the shipped exaflop/plan/catalog/calibration.csv")
    return rows


def predict(row: Row, eff: Efficiency = CALIBRATED) -> dict[str, Any]:
    job = replace(row.job, eff=eff)
    res = search(job, row.n, row.fixed, exact_batch=True, keep=1)
    fits = bool(res.plans)
    if not fits:  # the run happened, so predict its time even if our memory model disagrees
        roomy = replace(job, accel=replace(job.accel, mem_gb=1e9))
        res = search(roomy, row.n, row.fixed, exact_batch=True, keep=1)
    if not res.plans:
        raise UserError(f"row {row.name} (line {row.line}): no plan matches its tp/pp/dp/batch fields")
    best = res.plans[0]
    err = (best.step_s - row.measured_step_s) / row.measured_step_s * 100
    return {"name": row.name, "source": row.source, "predicted_step_s": round(best.step_s, 4),
            "measured_step_s": row.measured_step_s, "error_pct": round(err, 2),
            "plan": best.plan.label(), "mfu": round(best.mfu, 4), "fits_in_memory": fits}


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """mean/median/max absolute % error per paper (the row name's prefix before '-') and overall."""
    groups: dict[str, list[float]] = {"all": []}
    for r in results:
        groups.setdefault(r["name"].split("-")[0], []).append(abs(r["error_pct"]))
        groups["all"].append(abs(r["error_pct"]))
    return {g: {"rows": len(e), "mean": statistics.fmean(e), "median": statistics.median(e), "max": max(e)}
            for g, e in groups.items()}


def fit(rows: list[Row], start: Efficiency = CALIBRATED, rounds: int = 4) -> tuple[Efficiency, float]:
    """Coordinate search for the four efficiency constants, one set for all rows.

    Objective: mean absolute % error plus a quarter of the worst row, so that no
    single row is sacrificed to the average.
    """
    steps = {"gemm_peak": 0.04, "gemm_knee": 16.0, "mem_eff": 0.08, "net_eff": 0.08}
    bounds = {"gemm_peak": (0.3, 1.0), "gemm_knee": (0.0, 512.0), "mem_eff": (0.3, 1.0), "net_eff": (0.3, 1.0)}

    def loss(e: Efficiency) -> float:
        errs = [abs(predict(r, e)["error_pct"]) for r in rows]
        return statistics.fmean(errs) + 0.25 * max(errs)

    best, best_loss = start, loss(start)
    for _ in range(rounds):
        for name, step in steps.items():
            improved = True
            while improved:
                improved = False
                for sign in (1, -1):
                    lo, hi = bounds[name]
                    value = min(hi, max(lo, getattr(best, name) + sign * step))
                    cand = replace(best, **{name: value})
                    cand_loss = loss(cand)
                    if cand_loss < best_loss - 1e-6:
                        best, best_loss, improved = cand, cand_loss, True
                        break
            steps[name] = step / 2
    return best, best_loss
