"""Predict published step times (calibration.csv format), fit the efficiency model, and
measure how well it predicts runs it was not fitted on.

Each row fixes a model shape, a cluster and (some of) a parallel plan; blank plan fields
are chosen by the search, exactly as for a user's plan. Columns beyond the shared
format are optional (mlp, expert_ffn, shared_experts, dense_layers, attn_head_dim,
tie_embeddings, network, software, year); a blank `software` takes the stack typical of the row's year
(or its accelerator's), a blank or `auto` vp lets the search pick the interleaving.

`cross_validate` is the number to quote: each source (paper, vendor table) in turn is
held out, the constants are fitted on the others, and the held-out rows are predicted.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from exaflop.errors import UserError
from exaflop.plan.catalog import MLP_TYPES, Catalog, ModelSpec, check_model, parse_field, read_rows
from exaflop.plan.cost import RECOMPUTE, SOFTWARE, Job, software_for
from exaflop.plan.efficiency import CALIBRATED, NEUTRAL, Efficiency
from exaflop.plan.search import MAX_CP, pin_problem, search

REQUIRED = ["name", "accelerator", "n_accel", "layers", "hidden", "heads", "ffn", "vocab",
            "seq_len", "global_batch", "measured_step_s"]
INT_COLUMNS = ["n_accel", "layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "seq_len",
               "global_batch", "experts", "top_k", "tp", "pp", "dp", "cp", "ep",
               "micro_batch", "zero_stage", "expert_ffn", "shared_experts", "dense_layers", "attn_head_dim", "year"]
PLAN_COLUMNS = ("tp", "pp", "dp", "cp", "ep", "micro_batch", "zero_stage")


@dataclass
class Row:
    line: int
    name: str
    source: str
    job: Job
    n: int
    fixed: dict[str, Any]
    measured_step_s: float

    @property
    def group(self) -> str:
        """The publication a row comes from: its name up to the first '-'."""
        return self.name.split("-")[0]

    @property
    def kind(self) -> tuple[str, str, str]:
        """What makes runs similar for the error interval: MoE or dense, precision, chip."""
        return ("moe" if self.job.model.moe else "dense", self.fixed.get("precision", "bf16"), self.job.accel.name)


def _choice(path: Path, line: int, column: str, text: str, allowed: tuple[str, ...]) -> str:
    if text not in allowed:
        raise UserError(f"{path}:{line}: field {column}={text!r}: expected one of {', '.join(allowed)}")
    return text


def read_calibration(path: Path, catalog: Catalog, software: str = "auto") -> list[Row]:
    """Rows of a calibration CSV. `software`: the stack for rows without a software column
    ("auto": by the row's year, else its accelerator's)."""
    rows = []
    for line, raw in read_rows(path, REQUIRED):
        for col in REQUIRED:
            if not raw[col]:
                raise UserError(f"{path}:{line}: field {col} is empty; give a value")
        num = {c: parse_field(path, line, c, raw[c], int) for c in INT_COLUMNS if raw.get(c)}
        measured = parse_field(path, line, "measured_step_s", raw["measured_step_s"], float)
        try:
            accel = catalog.accelerator(raw["accelerator"])
            network = catalog.network(raw["network"]) if raw.get("network") else catalog.default_network(accel)
        except UserError as e:
            raise UserError(f"{path}:{line}: {e}") from None
        tie = raw.get("tie_embeddings") or "no"
        model = ModelSpec(
            name=raw["name"], layers=num["layers"], hidden=num["hidden"], heads=num["heads"],
            kv_heads=num.get("kv_heads", num["heads"]), ffn=num["ffn"], vocab=num["vocab"],
            seq_len=num["seq_len"], mlp=_choice(path, line, "mlp", raw.get("mlp") or "gelu", MLP_TYPES),
            tie_embeddings=_choice(path, line, "tie_embeddings", tie, ("yes", "no")) == "yes",
            experts=num.get("experts", 1), top_k=num.get("top_k", 1), expert_ffn=num.get("expert_ffn", 0),
            shared_experts=num.get("shared_experts", 0), dense_layers=num.get("dense_layers", 0),
            attn_head_dim=num.get("attn_head_dim", 0),
        )
        check_model(model, f"{path}:{line}")
        fixed: dict[str, Any] = {k: num[k] for k in PLAN_COLUMNS if k in num}
        vp = raw.get("vp") or "1"  # the shared format: blank vp means no interleaving
        if vp != "auto":
            fixed["vp"] = parse_field(path, line, "vp", vp, int)
        if raw.get("recompute"):
            fixed["recompute"] = _choice(path, line, "recompute", raw["recompute"], RECOMPUTE)
        if raw.get("sequence_parallel"):
            fixed["sequence_parallel"] = _choice(path, line, "sequence_parallel", raw["sequence_parallel"], ("yes", "no")) == "yes"
        if raw.get("precision"):
            prec = _choice(path, line, "precision", raw["precision"], ("fp16", "bf16", "fp8"))
            fixed["precision"] = "bf16" if prec == "fp16" else prec  # same tensor-core rate
        dims = [fixed.get(k) for k in ("tp", "pp", "dp", "cp")]
        if all(dims) and math.prod(dims) != num["n_accel"]:
            raise UserError(f"{path}:{line}: tp*pp*dp*cp = {math.prod(dims)} "
                            f"but n_accel = {num['n_accel']}; fix one of them")
        sw_name = raw.get("software") or software
        if sw_name == "auto":
            sw = software_for(num.get("year", 0), accel)
        else:
            sw = SOFTWARE[_choice(path, line, "software", sw_name, tuple(SOFTWARE))]
        job = Job(model, accel, network, num["global_batch"], num["seq_len"], sw)
        rows.append(Row(line, raw["name"], raw.get("source", ""), job, num["n_accel"], fixed, measured))
    if not rows:
        raise UserError(f"{path}: no rows; the columns are those of the shipped exaflop/plan/catalog/calibration.csv")
    return rows


def unrepresentable(row: Row) -> str:
    """Which field breaks which rule when no plan matches a row (for the report, not an error)."""
    f, job = row.fixed, row.job
    why = pin_problem(job, row.n, f)
    if why:
        return why
    if "micro_batch" in f and f["micro_batch"] * f.get("dp", 1) > job.global_batch:
        return f"micro_batch={f['micro_batch']} x dp exceeds global_batch={job.global_batch}"
    return f"no tp*pp*dp*cp factorization of n_accel={row.n} is consistent with the row's pins (cp <= {MAX_CP} when unpinned)"


def predict(row: Row, eff: Efficiency = CALIBRATED) -> dict[str, Any]:
    job = replace(row.job, eff=eff)
    base = {"name": row.name, "source": row.source, "measured_step_s": row.measured_step_s,
            "kind": "/".join(row.kind), "software": job.software.name}
    try:
        res = search(job, row.n, row.fixed, exact_batch=True, keep=1)
        fits = bool(res.plans)
        if not fits:  # the run happened, so predict its time even if our memory model disagrees
            roomy = replace(job, accel=replace(job.accel, mem_gb=1e9))
            res = search(roomy, row.n, row.fixed, exact_batch=True, keep=1)
    except UserError:  # no factorization at all: reported in the row, the others still print
        res, fits = None, False
    if res is None or not res.plans:
        return {**base, "predicted_step_s": None, "error_pct": None, "plan": None, "mfu": None,
                "fits_in_memory": None, "unrepresentable": unrepresentable(row)}
    best = res.plans[0]
    err = (best.step_s - row.measured_step_s) / row.measured_step_s * 100
    return {**base, "predicted_step_s": round(best.step_s, 4), "error_pct": round(err, 2),
            "plan": best.plan.label(), "mfu": round(best.mfu, 4), "fits_in_memory": fits}


def summarize(results: list[dict[str, Any]], key: str = "error_pct") -> dict[str, dict[str, float]]:
    """mean/median/max absolute % error per paper (the row name's prefix before '-') and overall."""
    groups: dict[str, list[float]] = {"all": []}
    for r in results:
        if r.get(key) is None:
            continue
        groups.setdefault(r["name"].split("-")[0], []).append(abs(r[key]))
        groups["all"].append(abs(r[key]))
    return {g: {"rows": len(e), "mean": statistics.fmean(e), "median": statistics.median(e), "max": max(e)}
            for g, e in groups.items() if e}


def fit(rows: list[Row], start: Efficiency = CALIBRATED, rounds: int = 4) -> tuple[Efficiency, float]:
    """Coordinate search for the four efficiency constants, one set for all rows.

    Objective: mean absolute % error plus a quarter of the worst row, so that no
    single row is sacrificed to the average.
    """
    steps = {"gemm_peak": 0.04, "gemm_knee": 16.0, "mem_eff": 0.08, "net_eff": 0.08}
    # Physical ranges: memory-bound kernels reach ~90% of HBM bandwidth at best, NCCL's bus
    # bandwidth ~90% of line rate; a fit that runs into these bounds is compensating for
    # something the model does not describe, and should not hide it.
    bounds = {"gemm_peak": (0.3, 0.95), "gemm_knee": (0.0, 512.0), "mem_eff": (0.3, 0.9), "net_eff": (0.3, 0.9)}

    def loss(e: Efficiency) -> float:
        errs = [abs(r["error_pct"]) for r in (predict(row, e) for row in rows) if r["error_pct"] is not None]
        return statistics.fmean(errs) + 0.25 * max(errs) if errs else math.inf

    best, best_loss = start, loss(start)
    for _ in range(rounds):
        for name, step in steps.items():
            improved = True
            while improved:
                improved = False
                for sign in (1, -1):
                    lo, hi = bounds[name]
                    value = round(min(hi, max(lo, getattr(best, name) + sign * step)), 6)
                    cand = replace(best, **{name: value})
                    cand_loss = loss(cand)
                    if cand_loss < best_loss - 1e-6:
                        best, best_loss, improved = cand, cand_loss, True
                        break
            steps[name] = step / 2
    return best, best_loss


def cross_validate(rows: list[Row], rounds: int = 4) -> list[dict[str, Any]]:
    """Leave one source out: fit on every other source, predict the held-out one's rows.

    Each result is `predict`'s dict plus `cross_error_pct` (held out) next to
    `error_pct` (fitted on everything, the shipped constants' in-sample error)."""
    out = []
    groups = sorted({r.group for r in rows})
    for g in groups:
        train = [r for r in rows if r.group != g]
        # From a fixed neutral start: starting at the shipped constants would leak the
        # held-out rows into the search's starting point.
        eff, _ = fit(train, NEUTRAL, rounds) if train else (NEUTRAL, 0.0)
        for r in rows:
            if r.group != g:
                continue
            held = predict(r, eff)
            res = predict(r)
            res["cross_error_pct"] = held["error_pct"]
            res["cross_predicted_step_s"] = held["predicted_step_s"]
            out.append(res)
    order = {r.name: i for i, r in enumerate(rows)}
    return sorted(out, key=lambda d: order[d["name"]])


# ---- uncertainty: what the held-out errors of similar runs say about a new prediction ----

CROSS_FILE = "cross_validation.csv"
CROSS_COLUMNS = ["name", "kind", "cross_error_pct"]


def cross_csv(results: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CROSS_COLUMNS)
    for r in results:
        if r["cross_error_pct"] is not None:
            w.writerow([r["name"], r["kind"], r["cross_error_pct"]])
    return buf.getvalue()


def read_cross(path: Path) -> list[tuple[str, float]]:
    """(kind, held-out signed % error) per row of a file written by `validate --cross --write`."""
    out = []
    for line, raw in read_rows(path, CROSS_COLUMNS):
        try:  # signed: parse_field refuses negatives, which are half of these
            out.append((raw["kind"], float(raw["cross_error_pct"])))
        except ValueError:
            raise UserError(f"{path}:{line}: field cross_error_pct={raw['cross_error_pct']!r}: "
                            "expected a number; regenerate with `exaflop plan validate --cross --write`") from None
    return out


MIN_SIMILAR = 3


def interval(step_s: float, kind: tuple[str, str, str], errors: Iterable[tuple[str, float]]) -> dict[str, Any]:
    """Where the real step time probably lies, from held-out errors of similar runs.

    A held-out error e means predicted = real x (1 + e/100), so real = predicted / (1 + e/100).
    Similar: same dense/MoE, precision and chip; with fewer than MIN_SIMILAR such rows the
    chip, then the precision is dropped. The range spans the 10th-90th percentile of those
    errors (their min-max with fewer than 10 rows)."""
    basis = "all published rows"
    chosen = [e for _, e in errors]
    for keep, label in ((3, "/".join(kind)), (2, "/".join(kind[:2])), (1, kind[0])):
        similar = [e for k, e in errors if tuple(k.split("/"))[:keep] == kind[:keep]]
        if len(similar) >= MIN_SIMILAR:
            chosen, basis = similar, f"{len(similar)} held-out rows like it ({label})"
            break
    if not chosen:
        return {"low_s": None, "high_s": None, "basis": "no cross-validation data"}
    chosen = sorted(chosen)
    if len(chosen) >= 10:
        q = statistics.quantiles(chosen, n=10)
        lo_err, hi_err = q[0], q[-1]
    else:
        lo_err, hi_err = chosen[0], chosen[-1]
    lo_err, hi_err = min(lo_err, 0.0), max(hi_err, 0.0)  # the range always holds the prediction itself
    return {"low_s": step_s / (1 + hi_err / 100), "high_s": step_s / (1 + lo_err / 100), "basis": basis}
