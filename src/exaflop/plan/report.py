"""Plans and validation results as rich tables and as JSON-ready dicts."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table

from exaflop.plan.cost import USABLE_MEMORY, Job, StepCost
from exaflop.plan.outcome import RunInputs, RunOutcome
from exaflop.plan.search import SearchResult
from exaflop.plan.shapes import total_params


def plan_dict(job: Job, n: int, chips: str, res: SearchResult, best: StepCost, run: RunOutcome,
              inputs: RunInputs) -> dict[str, Any]:
    total, active = total_params(job.model)
    return {
        "model": job.model.name, "params": total, "active_params": active,
        "accelerator": job.accel.name, "n": n, "cluster": chips, "network": job.network.name,
        "software": job.software.name, "seq_len": job.seq_len, "global_batch": best.global_batch,
        "plan": asdict(best.plan), "micro_batches": best.micro_batches,
        "step_s": best.step_s, "step_breakdown_s": best.breakdown,
        "memory_gb": {k: v / 1e9 for k, v in best.memory.items()},
        "memory_limit_gb": job.accel.mem_gb * USABLE_MEMORY,
        "comm_gb_per_step": {k: v / 1e9 for k, v in best.comm_bytes.items()},  # per accelerator
        "run": run.to_dict(), "inputs": asdict(inputs),
        "alternatives": [{"plan": c.plan.label(), "step_s": c.step_s, "mfu": c.mfu,
                          "global_batch": c.global_batch} for c in res.plans[1:]],
        "search": {"evaluated": res.evaluated, "seconds": res.seconds},
    }


def _interval(d: dict[str, Any]) -> str:
    iv = d.get("step_interval_s") or {}
    if iv.get("low_s") is None:
        return "unknown (no cross-validation data)"
    return f"{iv['low_s']:.3f} - {iv['high_s']:.3f} s (from {iv['basis']})"


def _recompute(p: dict[str, Any]) -> str:
    if p["recompute"] == "full" and p.get("recompute_share", 1.0) < 1:
        return f"full on {p['recompute_share']:.0%} of layers"
    return p["recompute"]


def _fmt_time(days: float) -> str:
    if days == float("inf"):
        return "never (goodput 0)"
    return f"{days:.1f} days" if days >= 1 else f"{days * 24:.1f} hours"


def print_plan(console: Console, d: dict[str, Any]) -> None:
    run, p = d["run"], d["plan"]
    head = Table(title=f"{d['model']} ({d['params'] / 1e9:.3g}B params, {d['active_params'] / 1e9:.3g}B active) "
                       f"on {d['cluster']}", show_header=False)
    head.add_column(style="bold")
    head.add_column()
    rows = [
        ("plan", f"TP {p['tp']} x PP {p['pp']} x DP {p['dp']} x CP {p['cp']} (EP {p['ep']} inside DP x CP), "
                 f"interleave {p['vp']}, micro-batch {p['micro_batch']}, recompute {_recompute(p)}, "
                 f"ZeRO {p['zero_stage']}, {p['precision']}"),
        ("global batch", f"{d['global_batch']} x {d['seq_len']} tokens, {d['micro_batches']} micro-batches"),
        ("step time", f"{d['step_s']:.3f} s  ({run['tokens_per_s'] / 1e6:.2f} M tokens/s)"),
        ("likely range", _interval(d)),
        ("MFU", f"{run['mfu'] * 100:.1f}%"),
        ("memory / accel", f"{sum(d['memory_gb'].values()):.1f} GB of {d['memory_limit_gb']:.1f} GB usable"),
        ("time to train", f"{_fmt_time(run['days'])} for {d['inputs']['tokens']:.3g} tokens "
                          f"({_fmt_time(run['ideal_days'])} without failures)"),
        ("accel-hours", f"{run['accel_hours']:.3g}"),
        ("power / energy", f"{run['avg_power_mw']:.1f} MW at PUE {d['inputs']['pue']}, {run['energy_mwh']:.3g} MWh"),
        ("cost", f"${run['cost_usd']:.3g} at ${d['inputs']['usd_per_accel_hour']:.3g}/accel-hour"),
        ("reliability", f"job MTBF {run['job_mtbf_h']:.2f} h, {run['interruptions']:.0f} interruptions expected"),
        ("checkpoint", f"{run['checkpoint_gb']:.0f} GB, written in {run['checkpoint_write_s']:.1f} s, "
                       f"every {run['checkpoint_interval_s'] / 60:.1f} min (Young/Daly)"),
        ("goodput", f"{run['goodput'] * 100:.1f}%"),
    ]
    for k, v in rows:
        head.add_row(k, v)
    console.print(head)
    bd = Table(title="step time breakdown")
    bd.add_column("cause")
    bd.add_column("seconds", justify="right")
    bd.add_column("share", justify="right")
    for k, v in sorted(d["step_breakdown_s"].items(), key=lambda kv: -kv[1]):
        if v > 0:
            bd.add_row(k, f"{v:.3f}", f"{v / d['step_s'] * 100:.1f}%")
    mem = Table(title="memory per accelerator (GB)")
    mem.add_column("what")
    mem.add_column("GB", justify="right")
    for k, v in d["memory_gb"].items():
        mem.add_row(k, f"{v:.2f}")
    console.print(bd)
    console.print(mem)
    if d["alternatives"]:
        alt = Table(title="next best plans")
        for col in ("plan", "step s", "MFU", "batch"):
            alt.add_column(col)
        for a in d["alternatives"][:5]:
            alt.add_row(a["plan"], f"{a['step_s']:.3f}", f"{a['mfu'] * 100:.1f}%", str(a["global_batch"]))
        console.print(alt)
    console.print(f"searched {d['search']['evaluated']} plans in {d['search']['seconds']:.3f} s")


def print_validation(console: Console, results: list[dict[str, Any]], summary: dict[str, dict[str, float]],
                     cross: bool = False) -> None:
    title = ("held out: each source predicted by constants fitted on the others" if cross
             else "predicted vs published step time")
    t = Table(title=title)
    cols = ["row", "plan", "predicted s", "published s", "error"] + (["held-out s", "held-out error"] if cross else [])
    for col in cols:
        t.add_column(col, justify="left" if col in ("row", "plan") else "right")
    for r in results:
        if r.get("predicted_step_s") is None:  # reported, not refused: the other rows still print
            t.add_row(r["name"], f"not representable: {r['unrepresentable']}", "-", f"{r['measured_step_s']:.2f}", "-",
                      *(["-", "-"] if cross else []))
            continue
        cells = [r["name"], r["plan"], f"{r['predicted_step_s']:.2f}", f"{r['measured_step_s']:.2f}",
                 f"{r['error_pct']:+.1f}%"]
        if cross:
            cells += [f"{r['cross_predicted_step_s']:.2f}", f"{r['cross_error_pct']:+.1f}%"]
        t.add_row(*cells)
    console.print(t)
    s = Table(title="absolute error by source" + (" (held out)" if cross else ""))
    for col in ("source", "rows", "mean", "median", "max"):
        s.add_column(col, justify="left" if col == "source" else "right")
    for g, v in summary.items():
        s.add_row(g, str(v["rows"]), f"{v['mean']:.2f}%", f"{v['median']:.2f}%", f"{v['max']:.2f}%")
    console.print(s)
