"""`exaflop plan`: argument parsing and the glue between catalog, search, outcome and report.

Mounted by the main CLI through `add_parser(subparsers)` + `run(args)`; also runnable
as `python -m exaflop.plan`. Sub-commands: (none) plan one run, `scaling` plan it from
1K to 1M accelerators, `validate` against published step times, `calibrate` re-fit the
efficiency constants, `list` the catalogs, `data` size a fleet-video import.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from rich.console import Console

from exaflop.errors import UserError
from exaflop.plan.catalog import CATALOG_DIR, Catalog, load_catalog
from exaflop.plan.cost import RECOMPUTE, SOFTWARE, Job
from exaflop.plan.outcome import FAILURES_PER_ACCEL_HOUR, RunInputs, outcome
from exaflop.plan.report import plan_dict, print_plan, print_validation
from exaflop.plan.search import not_fit_message, search
from exaflop.plan.validate import CROSS_FILE, interval, read_cross

PINS = ("tp", "pp", "dp", "cp", "ep", "vp", "micro_batch", "recompute", "zero_stage")
DEFAULT_CALIBRATION = CATALOG_DIR / "calibration.csv"


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama3-405b", help="catalog model name or an exaflop config .toml")
    p.add_argument("--accel", default="h100-sxm", help="accelerator name (dojo-tile/dojo-exapod count as units)")
    p.add_argument("--n", type=int, default=16384, help="number of accelerators (or aggregate units)")
    p.add_argument("--network", help="network name from networks.csv (default: the accelerator's own row)")
    p.add_argument("--tokens", type=float, default=15e12, help="tokens to train on")
    p.add_argument("--global-batch-tokens", type=float, default=16 * 2**20,
                   help="upper bound on tokens per optimizer step (the critical batch size)")
    p.add_argument("--seq-len", type=int, help="sequence length (default: the model's)")
    p.add_argument("--software", choices=sorted(SOFTWARE), default="modern")
    p.add_argument("--precision", choices=["bf16", "fp8"], default="bf16")
    for pin in PINS:
        kind: Any = str if pin == "recompute" else int
        p.add_argument(f"--{pin.replace('_', '-')}", type=kind, dest=pin,
                       choices=RECOMPUTE if pin == "recompute" else None, help=f"pin {pin}")
    p.add_argument("--pue", type=float, default=1.2)
    p.add_argument("--system-factor", type=float, default=1.5, help="node power / accelerator power")
    p.add_argument("--usd-per-hour", type=float, default=2.0, help="price per accelerator-hour (per --accel unit)")
    p.add_argument("--failures-per-accel-hour", type=float, default=FAILURES_PER_ACCEL_HOUR,
                   help="default: Llama 3's 419 interruptions / (54 days x 16,384 GPUs)")
    p.add_argument("--storage-gbps", type=float, default=2000.0, help="checkpoint write bandwidth, GB/s")
    p.add_argument("--restart-min", type=float, default=10.0, help="minutes lost per restart")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--png", type=Path, help="write a plot (plan: step breakdown; scaling: curves)")


def _catalog_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalog-dir", type=Path, action="append",
                   help="directory (or CSV file) of extra catalog rows; repeatable")


def add_parser(subparsers, extra: tuple = ()) -> None:
    """`extra`: functions adding more `plan` sub-commands (each sets `plan_func` as its
    handler): the top-level CLI mounts `plan data` from drive/ this way, so the planner
    itself stays free of the driving stack."""
    p = subparsers.add_parser("plan", help="plan a training run on a cluster (1K-1M accelerators)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              allow_abbrev=False)
    _run_options(p)
    _catalog_option(p)
    p.add_argument("--emit", type=Path, help="write an exaflop training config for the chosen plan")
    p.add_argument("--top", type=int, default=10, help="plans to keep in the ranking")
    sub = p.add_subparsers(dest="plan_command")
    sc = sub.add_parser("scaling", help="best plan from 1K to 1M accelerators", allow_abbrev=False)
    _run_options(sc)
    _catalog_option(sc)
    sc.add_argument("--from-n", dest="n_from", type=int, default=1024, help="smallest cluster")
    sc.add_argument("--to-n", dest="n_to", type=int, default=1_000_000, help="largest cluster")
    for name, helptext in (("validate", "predict the step times of a calibration CSV"),
                           ("calibrate", "re-fit the efficiency constants on a calibration CSV")):
        v = sub.add_parser(name, help=helptext)
        v.add_argument("file", type=Path, nargs="?", default=DEFAULT_CALIBRATION)
        v.add_argument("--software", choices=["auto", *sorted(SOFTWARE)], default="auto",
                       help="for rows without a software column (auto: the stack of the row's year, "
                            "else of its accelerator's)")
        v.add_argument("--json", action="store_true")
        _catalog_option(v)
        if name == "validate":
            v.add_argument("--cross", action="store_true",
                           help="leave one source out: fit on the other sources, predict the held-out one")
            v.add_argument("--write", type=Path, help="with --cross: write the held-out errors (CSV) that "
                                                        "plans draw their uncertainty interval from")
    for add in extra:
        add(sub)
    ls = sub.add_parser("list", help="list catalog entries")
    _catalog_option(ls)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "plan_func", None) is not None:
        return args.plan_func(args)
    catalog = load_catalog(args.catalog_dir or [])
    command = getattr(args, "plan_command", None)
    if command in ("validate", "calibrate"):
        return _validate(args, catalog, fit_constants=command == "calibrate")
    if command == "list":
        return _list(catalog)
    if command == "scaling":
        return _scaling(args, catalog)
    return _plan(args, catalog)


def _job(args: argparse.Namespace, catalog: Catalog) -> tuple[Job, int, str, RunInputs]:
    model = catalog.model(args.model)
    unit = catalog.accelerator(args.accel)
    if args.n < 1:
        raise UserError(f"--n {args.n}: need at least one accelerator")
    accel, n = catalog.chip(unit, args.n)
    chips = f"{args.n} x {unit.name}" + (f" = {n} x {accel.name}" if accel is not unit else "")
    network = catalog.network(args.network) if args.network else catalog.default_network(accel)
    seq = args.seq_len or model.seq_len
    batch = int(args.global_batch_tokens // seq)
    if batch < 1:
        raise UserError(f"--global-batch-tokens {args.global_batch_tokens:g} is less than one sequence of {seq}")
    job = Job(model, accel, network, batch, seq, SOFTWARE[args.software])
    inputs = RunInputs(tokens=args.tokens, pue=args.pue, system_factor=args.system_factor,
                       usd_per_accel_hour=args.usd_per_hour / max(unit.units, 1),  # price is per unit
                       failures_per_accel_hour=args.failures_per_accel_hour,
                       storage_gbps=args.storage_gbps, restart_s=args.restart_min * 60)
    return job, n, chips, inputs


def _best(job: Job, n: int, chips: str, inputs: RunInputs, args: argparse.Namespace,
          keep: int = 10) -> dict[str, Any]:
    fixed = {k: getattr(args, k) for k in PINS if getattr(args, k, None) is not None}
    fixed["precision"] = args.precision
    res = search(job, n, fixed, keep=keep)
    if not res.plans:
        raise UserError(not_fit_message(job, n, res, fixed))
    best = res.plans[0]
    run = outcome(best, job.model, n, job.seq_len, job.accel.power_w, inputs)
    d = plan_dict(job, n, chips, res, best, run, inputs)
    kind = ("moe" if job.model.moe else "dense", best.plan.precision, job.accel.name)
    d["step_interval_s"] = interval(best.step_s, kind, _cross_errors())
    return d


@lru_cache(maxsize=1)
def _cross_errors() -> tuple[tuple[str, float], ...]:
    return tuple(read_cross(CATALOG_DIR / CROSS_FILE))


def _plan(args: argparse.Namespace, catalog: Catalog) -> int:
    job, n, chips, inputs = _job(args, catalog)
    d = _best(job, n, chips, inputs, args, keep=max(args.top, 1))
    if args.json:
        print(json.dumps(_finite(d), indent=2))
    else:
        print_plan(Console(), d)
    if args.png:
        from exaflop.plan.artifacts import breakdown_png

        breakdown_png(d, args.png)
    if args.emit:
        from exaflop.plan.artifacts import write_config

        write_config(job.model, d, args.emit)
    return 0


def scaling_counts(n_from: int, n_to: int) -> list[int]:
    """Powers of two from n_from, then n_to itself (so 1,000,000 is a point, not just 2^20)."""
    if n_from < 1 or n_to < n_from:
        raise UserError(f"--from-n {n_from} --to-n {n_to}: need 1 <= from <= to")
    counts = [n_from * 2**k for k in range(int(math.log2(n_to / n_from)) + 1)]
    return sorted(set(counts + [n_to]))


def _scaling(args: argparse.Namespace, catalog: Catalog) -> int:
    points, skipped = [], []
    for n_units in scaling_counts(args.n_from, args.n_to):
        job, n, chips, inputs = _job(replace_n(args, n_units), catalog)
        try:
            points.append(_best(job, n, chips, inputs, args, keep=1))
        except UserError as e:  # an unfit point is part of the answer, not a crash
            skipped.append({"n": n_units, "reason": str(e)})
    if not points:
        raise UserError(f"scaling: no accelerator count from {args.n_from} to {args.n_to} has a plan: "
                        f"{skipped[0]['reason']}")
    if args.json:
        print(json.dumps(_finite({"points": points, "skipped": skipped}), indent=2))
    else:
        _print_scaling(points, skipped)
    if args.png:
        from exaflop.plan.artifacts import scaling_png

        title = f"{points[0]['model']} on {args.accel}, {args.tokens:.3g} tokens"
        scaling_png(points, args.png, title)
    return 0


def replace_n(args: argparse.Namespace, n: int) -> argparse.Namespace:
    copy = argparse.Namespace(**vars(args))
    copy.n = n
    return copy


def _print_scaling(points: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> None:
    from rich import box
    from rich.table import Table

    t = Table(title=f"{points[0]['model']}: best plan per cluster size", box=box.SIMPLE, pad_edge=False)
    for col in ("accels", "tp.pp.dp.cp", "batch", "step s", "MFU", "goodput", "days", "GWh", "$M"):
        t.add_column(col, justify="left" if col.startswith("tp") else "right", no_wrap=True)
    for d in points:
        p, r = d["plan"], d["run"]
        t.add_row(f"{d['n']:,}", f"{p['tp']}.{p['pp']}.{p['dp']}.{p['cp']}", str(d["global_batch"]),
                  f"{d['step_s']:.2f}", f"{r['mfu'] * 100:.1f}%", f"{r['goodput'] * 100:.1f}%",
                  f"{r['days']:.1f}", f"{r['energy_mwh'] / 1e3:.1f}", f"{r['cost_usd'] / 1e6:,.0f}")
    console = Console()
    console.width = max(console.width, 100)  # one row per cluster size beats wrapped cells
    console.print(t)
    for s in skipped:
        console.print(f"skipped {s['n']:,}: {s['reason']}")


def _validate(args: argparse.Namespace, catalog: Catalog, fit_constants: bool) -> int:
    from exaflop.plan.efficiency import CALIBRATED, NEUTRAL
    from exaflop.plan.validate import (
        cross_csv,
        cross_validate,
        fit,
        predict,
        read_calibration,
        summarize,
    )

    rows = read_calibration(args.file, catalog, args.software)
    cross = getattr(args, "cross", False)
    if getattr(args, "write", None) and not cross:
        raise UserError("--write: only with --cross (it writes the held-out errors)")
    eff = CALIBRATED
    if fit_constants:
        eff, _ = fit(rows, NEUTRAL)  # from the fixed start --cross uses: reproducible
    results = cross_validate(rows) if cross else [predict(r, eff) for r in rows]
    key = "cross_error_pct" if cross else "error_pct"
    if cross and args.write:
        write_atomic(args.write, cross_csv(results))
    if args.json:
        if cross:
            print(json.dumps({"rows": results, "summary": summarize(results, key),
                              "in_sample": summarize(results)}, indent=2))
        else:
            print(json.dumps(results, indent=2))
    else:
        console = Console()
        console.width = max(console.width, 120)
        print_validation(console, results, summarize(results, key), cross=cross)
        if fit_constants:
            print(f"fitted on {args.file}: {eff!r}  (paste into exaflop/plan/efficiency.py)")
    return 0


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as e:
        raise UserError(f"--write {path}: cannot write ({e.strerror})") from None


def _list(catalog: Catalog) -> int:
    console = Console()
    console.print("accelerators: " + ", ".join(sorted(catalog.accelerators)))
    console.print("networks:     " + ", ".join(sorted(catalog.networks)))
    console.print("models:       " + ", ".join(sorted(catalog.models)) + ", or any exaflop config .toml")
    return 0


def _finite(obj: Any) -> Any:
    """JSON has no infinity: an impossible run (goodput 0) is reported as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="exaflop")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
