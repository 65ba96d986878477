"""`exaflop data drive {generic,comma2k19,udacity,sim}` and `exaflop drive {render,eval,demo}`."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from exaflop.errors import UserError

# Flags shared by every importer -> ImportOptions fields (None = the importer's default).
CLIP_FLAGS = {
    "frames": (int, "frames per clip (T)"),
    "fps": (float, "target frame rate of the clips"),
    "stride": (int, "frames between the starts of consecutive clips"),
    "waypoints": (int, "future waypoints per clip (K)"),
    "dt": (float, "seconds between waypoints (horizon = K * dt)"),
    "wheelbase": (float, "metres; for the bicycle model and the hold-steering baseline"),
    "steer_ratio": (float, "steering-wheel degrees per road-wheel degree"),
    "max_gap": (float, "seconds; a longer hole in the telemetry skips the drive"),
    "max_bad_fraction": (float, "stop when more than this share of drives is bad"),
    "val_fraction": (float, "share of drives (never clips) held out for validation"),
    "clips_per_shard": (int, "clips per tar shard"),
    "workers": (int, "conversion processes (0: in this process)"),
}


def add_data_parser(data_subparsers) -> None:
    p = data_subparsers.add_parser("drive", help="import driving video + telemetry into clip shards")
    imp = p.add_subparsers(dest="importer", required=True, parser_class=type(p))
    gen = _importer(imp, "generic", "a folder of videos, each with a telemetry .csv/.json of the same name")
    gen.add_argument("--col", action="append", default=[], metavar="FIELD=NAME",
                     help="telemetry column for a field (t, steering, speed, x, y, yaw, lat, lon); repeatable")
    gen.add_argument("--time-unit", choices=["s", "ms", "us", "ns"], default="s")
    gen.add_argument("--angle-unit", choices=["deg", "rad"], default="deg", help="of steering and yaw")
    gen.add_argument("--speed-unit", choices=["mps", "kph", "mph"], default="mps")
    gen.add_argument("--time-origin", choices=["video", "first-row"], default="video",
                     help="video: t is seconds since the first frame; first-row: the first row is the first frame")
    gen.add_argument("--time-offset", type=float, default=0.0, help="seconds added to telemetry t")
    gen.add_argument("--raw-fps", type=float, default=20.0, help="frame rate of raw .h264/.hevc streams")
    gen.add_argument("--codecs", default="h264,hevc,mpeg4,vp9,av1", help="accepted video codecs")
    _steering_sign(gen)
    com = _importer(imp, "comma2k19", "comma2k19 segments (raw HEVC + global_pose + CAN)")
    com.add_argument("--codecs", default="hevc,h264", help="accepted video codecs")
    uda = _importer(imp, "udacity", "Udacity challenge (interpolated.csv) or simulator (driving_log.csv)")
    uda.add_argument("--sim-max-steer", type=float, default=25.0,
                     help="road-wheel degrees of the simulator's steering = 1.0")
    _steering_sign(uda)
    rec = _importer(imp, "records", "requests recorded by `exaflop serve --drive-record-dir`, labelled by "
                    "telemetry that arrived later")
    rec.add_argument("--telemetry", help="folder of DRIVE_ID.csv telemetry files (default INPUT/telemetry)")
    sim = _importer(imp, "sim", "simulate highway-env episodes (IDM/MOBIL expert) and import them", needs_input=False)
    sim.add_argument("--episodes", type=int, default=40)
    sim.add_argument("--seconds", type=float, default=30.0, help="length of each episode")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--raw-dir", help="where episodes are recorded (default: OUT-raw)")


def _importer(sub, name: str, help_text: str, needs_input: bool = True) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text)
    if needs_input:
        p.add_argument("input", help="folder to import")
    p.add_argument("--out", help=f"output folder or URL, e.g. s3://BUCKET/PREFIX (default data/drive-{name})")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec option of the output store, e.g. endpoint_url=http://HOST:9000 (repeatable)")
    p.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="convert drives as Ray tasks across a cluster: its address (default auto: the "
                        "running cluster), or 'local' to start one on this machine")
    p.add_argument("--size", help="clip frame size WIDTHxHEIGHT (default 64x64)")
    for flag, (typ, text) in CLIP_FLAGS.items():
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=typ, default=None, help=text)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_import)
    return p


def _steering_sign(p: argparse.ArgumentParser) -> None:
    p.add_argument("--flip-steering", action="store_true",
                   help="the source's steering is positive to the right (ours is positive left)")


def build_options(args, base):
    """ImportOptions from flags: explicitly given flags override the importer's defaults."""
    opts = base
    explicit = []
    for f in fields(opts):
        v = getattr(args, f.name, None)
        if v is not None and f.name in CLIP_FLAGS:
            setattr(opts, f.name, v)
            explicit.append(f.name)
    if args.size:
        try:
            w, h = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            raise UserError(f"--size {args.size!r}: expected WIDTHxHEIGHT, e.g. 64x64") from None
        if w % 2 or h % 2 or w < 8 or h < 8:
            raise UserError(f"--size {args.size}: width and height must be even and >= 8 (H.264 4:2:0)")
        opts.width, opts.height = w, h
    for name, lo, hi in (("val_fraction", 0.0, 0.95), ("max_bad_fraction", 0.0, 1.0)):
        if not lo <= getattr(opts, name) <= hi:
            raise UserError(f"--{name.replace('_', '-')} {getattr(opts, name)}: must be in [{lo}, {hi}]")
    for name in ("frames", "fps", "stride", "waypoints", "dt", "wheelbase", "steer_ratio", "clips_per_shard"):
        if getattr(opts, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(opts, name)}: must be positive")
    if hasattr(args, "codecs"):
        opts.codecs = tuple(c.strip() for c in args.codecs.split(",") if c.strip())
    extra = {"explicit": explicit}
    if getattr(args, "flip_steering", False):
        extra["steering_sign"] = -1.0
    if args.importer == "generic":
        cols = {}
        for item in args.col:
            field, sep, name = item.partition("=")
            if not sep or not name:
                raise UserError(f"--col {item!r}: expected FIELD=NAME, e.g. --col steering=steer_deg")
            cols[field.strip()] = name.strip()
        extra.update(columns=cols, time_unit=args.time_unit, angle_unit=args.angle_unit,
                     speed_unit=args.speed_unit, time_origin=args.time_origin,
                     time_offset=args.time_offset, raw_fps=args.raw_fps)
    if args.importer == "udacity":
        extra["sim_max_steer"] = args.sim_max_steer
    if args.importer == "records":
        extra["telemetry_dir"] = args.telemetry
    opts.extra.update(extra)
    return opts


def _cmd_import(args) -> int:
    from exaflop.drive.importers.clips import ImportOptions
    from exaflop.drive.importers.run import run_import
    from exaflop.drive.importers.sim import SimOptions, default_options, run_sim_import
    from exaflop.drive.store import is_url, parse_storage_options
    from exaflop.progress import console

    out = args.out or f"data/drive-{args.importer}"
    out = out if is_url(out) else Path(out)
    storage = parse_storage_options(args.storage_option)
    if args.importer == "sim":
        opts = build_options(args, default_options())
        so = SimOptions(episodes=args.episodes, seconds=args.seconds, seed=args.seed,
                        fps=opts.fps, workers=max(1, opts.workers))
        if args.episodes < 2:
            raise UserError("--episodes: need at least 2 (whole episodes are held out for validation)")
        if args.raw_dir:
            raw = Path(args.raw_dir)
        else:  # episodes are recorded locally, whatever the output store
            raw = Path("data/drive-sim-raw") if is_url(out) else None
        manifest = run_sim_import(out, so, opts, raw_dir=raw, quiet=args.quiet, storage_options=storage,
                                  ray_address=args.ray)
    else:
        opts = build_options(args, ImportOptions())
        manifest = run_import(args.importer, Path(args.input), out, opts,
                              provenance={"command": f"exaflop data drive {args.importer}"}, quiet=args.quiet,
                              storage_options=storage, ray_address=args.ray)
    c = manifest["counts"]
    console.print(f"{out}: {c['clips_train']:,} train / {c['clips_val']:,} val clips from {c['items_ok']} drives"
                  f" ({c['items_skipped']} skipped; labels from {', '.join(manifest['labels_from']) or '-'})")
    if manifest["run"]["retries"]:
        console.print(f"  {len(manifest['run']['retries'])} task(s) retried on the cluster "
                      f"(first: {manifest['run']['retries'][0]['reason']})", markup=False, highlight=False)
    for s in manifest["skipped"][:10]:
        console.print(f"  skipped {s['item']}: {s['reason']}", markup=False, highlight=False)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("drive", help="driving models: render predictions, evaluate, demo")
    sub = p.add_subparsers(dest="drive_cmd", required=True, parser_class=type(p))
    r = sub.add_parser("render", help="MP4 + PNG of held-out clips with true and predicted trajectories")
    r.add_argument("run", help="run directory (runs/<name>) or a checkpoint directory")
    r.add_argument("--out", help="output folder (default RUN/render)")
    r.add_argument("--clips", type=int, default=8)
    r.add_argument("--split", choices=["val", "train"], default="val")
    r.add_argument("--data", help=DATA_HELP)
    r.set_defaults(func=_cmd_render)
    e = sub.add_parser("eval", help="ADE/FDE/L2/steering of a run beside both baselines on a whole split")
    e.add_argument("run")
    e.add_argument("--split", choices=["val", "train"], default="val")
    e.add_argument("--limit", type=int, default=0, help="only the first N clips (0: all)")
    e.add_argument("--data", help=DATA_HELP)
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.set_defaults(func=_cmd_eval)
    c = sub.add_parser("closed-loop", help="the model drives the simulator from its own frames, beside baselines")
    c.add_argument("run", help="run directory (runs/<name>) of a model trained on simulator clips")
    c.add_argument("--episodes", type=int, default=20, help="held-out seeds (disjoint from the recordings')")
    c.add_argument("--seconds", type=float, default=20.0, help="length of each episode")
    c.add_argument("--seed", type=int, default=0, help="which block of evaluation seeds")
    c.add_argument("--policies", default=",".join(CLOSED_LOOP_POLICIES),
                   help="comma-separated, from: " + ", ".join(CLOSED_LOOP_POLICIES))
    c.add_argument("--vs", action="append", default=[], metavar="RUN",
                   help="another run (e.g. the ego-status MLP) driven on the same seeds; repeatable")
    c.add_argument("--render", action="store_true", help="also write closed_loop.mp4: the model driving, "
                   "its predicted waypoints drawn")
    c.add_argument("--out", help="where closed_loop.json and closed_loop.png go (default RUN/closed_loop)")
    c.add_argument("--json", action="store_true", help="print the results as JSON")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=_cmd_closed_loop)
    en = sub.add_parser("engine", help="the data engine: drive, trigger on failures, relabel by the expert "
                        "(DAgger), grow the train split, resume training, gate, promote")
    en.add_argument("run", help="a driving run trained on simulator clips (its data.path is grown in place)")
    en.add_argument("--rounds", type=int, default=1)
    en.add_argument("--episodes", type=int, default=8, help="episodes driven per round (engine seeds)")
    en.add_argument("--seconds", type=float, default=20.0)
    en.add_argument("--steps", type=int, default=200, help="training steps per round, resumed from the checkpoint")
    en.add_argument("--eval-episodes", type=int, default=20, help="held-out closed-loop seeds for the gate")
    en.add_argument("--eval-seconds", type=float, default=20.0)
    en.add_argument("--seed", type=int, default=0)
    en.add_argument("--records", help="take clips from requests recorded by `serve --drive-record-dir DIR` "
                    "(labelled by telemetry that has arrived) instead of driving the simulator")
    en.add_argument("--telemetry", help="with --records: folder of DRIVE_ID.csv (default RECORDS/telemetry)")
    en.add_argument("--quiet", action="store_true")
    en.set_defaults(func=_cmd_engine)
    pr = sub.add_parser("promote", help="name the checkpoint `exaflop serve RUN` serves (RUN/promoted.json)")
    pr.add_argument("run")
    pr.add_argument("checkpoint", nargs="?", help="step_NNNNNNN under RUN/checkpoints (default: the newest)")
    pr.set_defaults(func=_cmd_promote)
    d = sub.add_parser("demo", help="simulate, train drive-tiny, evaluate against baselines, render")
    d.add_argument("--out", default="runs")
    d.add_argument("--data", default="data/drive-sim")
    d.add_argument("--episodes", type=int, default=None)
    d.add_argument("--steps", type=int, default=None, help="override train.steps")
    d.set_defaults(func=_cmd_demo)


DATA_HELP = ("the imported dataset whose clips to use (default: data.path in the run's config.toml); "
             "the run holds the model, not the clips")


def _cmd_render(args) -> int:
    from exaflop.drive.render import render_run
    from exaflop.progress import console

    res = render_run(args.run, Path(args.out) if args.out else None, args.clips, args.split, data=args.data)
    console.print(res["title"], markup=False)
    for kind, path in res["files"].items():
        console.print(f"{kind}: {path}")
    return 0


def _cmd_eval(args) -> int:
    from exaflop.drive.render import evaluate_split, print_table
    from exaflop.engine.checkpoint import load_for_inference

    cfg, task, model = load_for_inference(args.run)
    task.use_data(args.data or cfg.data.path, "drive eval")
    source = task.build_dataset("val") if args.split == "val" else _train_source(task)
    res = evaluate_split(task, model, source, limit=args.limit, dtype=cfg.run.dtype)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print_table(res)
    return 0


CLOSED_LOOP_POLICIES = ("model", "model-no-video", "expert", "expert-no-lane-change", "expert-tracked",
                        "constant-velocity", "hold-steering")


def _cmd_closed_loop(args) -> int:
    from exaflop.drive import closedloop

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    bad = [p for p in policies if p not in closedloop.POLICIES]
    if bad or not policies:
        raise UserError(f"--policies {args.policies!r}: unknown {bad} (choose from {', '.join(closedloop.POLICIES)})")
    if args.episodes < 1 or args.seconds <= 1:
        raise UserError("--episodes must be >= 1 and --seconds > 1")
    try:
        import highway_env  # noqa: F401
    except ImportError:
        raise UserError("closed loop needs the simulator: pip install 'exaflop[sim]'") from None
    out = Path(args.out) if args.out else Path(args.run) / "closed_loop"
    result = closedloop.evaluate(args.run, policies, args.episodes, args.seconds, args.seed, quiet=args.quiet,
                                 other_runs=args.vs, render=out / "closed_loop.mp4" if args.render else None)
    closedloop.save(result, out)
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True))
    else:
        closedloop.print_table(result)
        for name, d in result.get("model_vs", {}).items():
            print(f"model - {name}: composite {d['mean']:+.3f} (95% CI {d['ci95'][0]:+.3f} .. {d['ci95'][1]:+.3f})")
        print(f"wrote {out / 'closed_loop.json'} and {out / 'closed_loop.png'}"
              + (f" and {out / 'closed_loop.mp4'}" if args.render else ""))
    return 0


def _cmd_engine(args) -> int:
    from exaflop.drive.engine import run_engine

    for name in ("rounds", "episodes", "steps", "eval_episodes"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    lines = run_engine(Path(args.run), args.rounds, args.episodes, args.seconds, args.steps, args.eval_episodes,
                       args.eval_seconds, args.seed, args.quiet,
                       records=Path(args.records) if args.records else None,
                       telemetry=Path(args.telemetry) if args.telemetry else None)
    for line in lines:
        print(json.dumps({k: line.get(k) for k in ("round", "triggers", "clips_added", "promoted", "reasons",
                                                   "seconds_first_trigger_to_served")}))
    return 0


def _cmd_promote(args) -> int:
    from exaflop.drive.promote import promote
    from exaflop.engine.checkpoint import read_latest

    run = Path(args.run)
    ckpt = Path(args.checkpoint) if args.checkpoint else read_latest(run / "checkpoints")[0]
    if ckpt is None:
        raise UserError(f"{run}: no complete checkpoint to promote")
    rec = promote(run, ckpt, by="exaflop drive promote")
    print(f"{run}: serving {rec['checkpoint']} (servers watching the run reload it within one poll)")
    return 0


def _train_source(task):
    from exaflop.drive.source import ClipSource

    return ClipSource(task.dcfg.path, "train", storage_options=task.dcfg.storage_options)


def _cmd_demo(args) -> int:
    from exaflop.drive.demo import run_demo

    rehearsal = {"closed_loop": (2, 6.0)} if args.steps else {}
    res = run_demo(Path(args.out), data=Path(args.data), episodes=args.episodes, steps=args.steps, **rehearsal)
    return 0 if res["beats_baselines"] else 1
