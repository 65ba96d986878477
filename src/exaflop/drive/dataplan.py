"""`exaflop plan data`: size a fleet-video import before starting it.

Bytes, shards, core-hours and nodes follow from two numbers measured on this machine by
importing one drive for real (the generic importer's own `convert_item`, so decode,
resize, clip encode, labels and the tar are all in it): the CPU seconds it takes per
second of one camera's video, and the bytes each clip takes in its shard. CPU seconds are
the process's user + system time (`resource.getrusage`), so FFmpeg's decoder threads
count too and the figure is core-seconds whatever the thread count. The measured drive
is a synthetic recording at the requested resolution, frame rate and codec — smoother
than real dashcam footage, so it understates decode cost — or, with `--sample VIDEO`, a
real recording of the user's own fleet (recommended).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from exaflop.errors import UserError

SOURCE_CODECS = {"hevc": ("libx265", ".mp4"), "h264": ("libx264", ".mp4")}


@dataclass
class Measured:
    core_seconds_per_video_second: float  # one camera, the whole import path
    bytes_per_clip: float
    clips_per_video_second: float
    source: str  # what was measured
    video_seconds: float


def _size(text: str, flag: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected WIDTHxHEIGHT, e.g. 1164x874") from None
    if w < 8 or h < 8 or w % 2 or h % 2:
        raise UserError(f"{flag} {text}: width and height must be even and >= 8")
    return w, h


def _synthetic_drive(folder: Path, width: int, height: int, fps: float, seconds: float, codec: str) -> Path:
    """A moving scene with texture and sensor noise (so the encoder cannot skip it), and
    telemetry of a constant-speed drive, in the generic importer's layout."""
    from exaflop.drive.video import write_video

    rng = np.random.default_rng(0)
    n = max(2, int(seconds * fps))
    u = np.arange(width)[None, :, None]
    v = np.arange(height)[:, None, None]
    texture = rng.integers(0, 60, size=(height, width, 3), dtype=np.int16)

    def frames():
        for i in range(n):
            road = (80 + 40 * np.sin((u + 6 * i) / 23.0) + 30 * np.cos((v - 3 * i) / 17.0)).astype(np.int16)
            noise = rng.integers(-8, 9, size=(height, width, 3), dtype=np.int16)
            yield np.clip(road + np.roll(texture, 4 * i, axis=1) + noise, 0, 255).astype(np.uint8)

    enc, suffix = SOURCE_CODECS[codec]
    video = folder / f"drive{suffix}"
    write_video(video, frames(), fps, codec=enc, crf=23)
    return video


def _telemetry(path: Path, seconds: float, speed: float = 20.0) -> None:
    t = np.arange(0.0, seconds + 0.05, 0.05)
    rows = ["t,steering,speed,x,y,yaw"] + [f"{x:.3f},0,{speed},{speed * x:.3f},0,0" for x in t]
    path.write_text("\n".join(rows) + "\n")


def measure(width: int, height: int, fps: float, codec: str, clip_opts, sample: Path | None = None,
            seconds: float = 4.0) -> Measured:
    """Import one drive for real and time it (core-seconds; see the module docstring)."""
    from exaflop.drive.importers.generic import discover
    from exaflop.drive.importers.run import convert_item

    with tempfile.TemporaryDirectory(prefix="exaflop-plan-data-") as tmp:
        folder = Path(tmp) / "raw"
        folder.mkdir()
        if sample is not None:
            if not sample.is_file():
                raise UserError(f"--sample {sample}: no such video file")
            from exaflop.drive.video import decode_video

            link = folder / f"drive{sample.suffix}"
            link.symlink_to(sample.resolve())
            what = f"{sample} (a real recording)"
        else:
            _synthetic_drive(folder, width, height, fps, seconds, codec)
            what = f"a synthetic {width}x{height} {codec} drive at {fps:g} fps"
        from exaflop.drive.video import decode_video

        _, times, _ = decode_video(next(folder.glob("drive.*")), 16, 16)
        video_seconds = float(times[-1]) + 1.0 / fps if times is not None and len(times) > 1 else seconds
        # Telemetry past the video's end: a fleet drive lasts minutes, so clips start right
        # up to its end; here the last waypoint horizon must not shorten the measured part.
        horizon = clip_opts.waypoints * clip_opts.dt
        _telemetry(folder / "drive.csv", video_seconds + horizon + 1.0)
        items, skipped = discover(folder, clip_opts)
        if not items:
            raise UserError(f"--sample {sample}: not importable ({skipped[0]['reason'] if skipped else 'no video'})")
        item = items[0]
        item.split = "train"
        before = resource.getrusage(resource.RUSAGE_SELF)
        result = convert_item("generic", item, clip_opts, str(Path(tmp) / "out"))
        after = resource.getrusage(resource.RUSAGE_SELF)
        if "skipped" in result:
            raise UserError(f"measuring the import rate failed: {result['skipped']}")
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        clips = result["clips"]
        shard_bytes = sum(s["bytes"] for s in result["shards"])
    # Clips per second of a long drive: one starts every `stride` frames at the clip rate (a
    # few-second measured drive loses its first clip length to warm-up, a fleet drive does not).
    return Measured(core_seconds_per_video_second=cpu / video_seconds, bytes_per_clip=shard_bytes / max(clips, 1),
                    clips_per_video_second=clip_opts.fps / clip_opts.stride, source=what,
                    video_seconds=video_seconds)


def plan(hours: float, cameras: int, m: Measured, clips_per_shard: int, wall_hours: float,
         cores_per_node: int, efficiency: float) -> dict:
    video_seconds = hours * 3600.0 * cameras
    clips = video_seconds * m.clips_per_video_second
    core_hours = video_seconds * m.core_seconds_per_video_second / 3600.0
    nodes = math.ceil(core_hours / (wall_hours * cores_per_node * efficiency))
    return {
        "video_hours": hours * cameras, "clips": clips, "bytes": clips * m.bytes_per_clip,
        "shards": math.ceil(clips / clips_per_shard), "core_hours": core_hours,
        "nodes": nodes, "wall_hours": wall_hours, "cores_per_node": cores_per_node,
        "efficiency": efficiency,
        "wall_hours_on_nodes": core_hours / (nodes * cores_per_node * efficiency),
    }


def add_parser(sub) -> None:
    d = sub.add_parser("data", help="size a fleet-video import: bytes, shards, core-hours, nodes",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--hours", type=float, required=True, help="hours of driving recorded")
    d.add_argument("--cameras", type=int, default=1, help="cameras per vehicle imported as clips")
    d.add_argument("--fps", type=float, default=20.0, help="frame rate of the recordings")
    d.add_argument("--resolution", default="1164x874", help="recorded WIDTHxHEIGHT (default: comma2k19's road camera)")
    d.add_argument("--codec", choices=sorted(SOURCE_CODECS), default="hevc", help="codec of the recordings")
    d.add_argument("--sample", type=Path, help="measure on this real recording instead of a synthetic one")
    d.add_argument("--clip-size", default="64x64", help="clip frame size WIDTHxHEIGHT, as `data drive --size`")
    d.add_argument("--clip-fps", type=float, default=10.0)
    d.add_argument("--frames", type=int, default=8, help="frames per clip")
    d.add_argument("--stride", type=int, default=3, help="frames between clip starts")
    d.add_argument("--clips-per-shard", type=int, default=256)
    d.add_argument("--wall-hours", type=float, default=24.0, help="import wall time to size the cluster for")
    d.add_argument("--cores-per-node", type=int, default=64)
    d.add_argument("--efficiency", type=float, default=0.9,
                   help="share of cores doing conversion (scheduling, I/O waits, stragglers)")
    d.add_argument("--json", action="store_true")
    d.set_defaults(plan_func=run)


def run(args: argparse.Namespace) -> int:
    from exaflop.drive.importers.sim import default_options

    w, h = _size(args.resolution, "--resolution")
    cw, ch = _size(args.clip_size, "--clip-size")
    for name in ("hours", "fps", "clip_fps", "wall_hours", "efficiency"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be positive")
    for name in ("cameras", "frames", "stride", "clips_per_shard", "cores_per_node"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.efficiency > 1:
        raise UserError(f"--efficiency {args.efficiency}: a share, at most 1")
    opts = default_options()
    opts.width, opts.height, opts.fps, opts.frames, opts.stride = cw, ch, args.clip_fps, args.frames, args.stride
    opts.clips_per_shard, opts.workers, opts.max_gap = args.clips_per_shard, 0, 1.0
    opts.wheelbase, opts.steer_ratio = 2.7, 15.0
    m = measure(w, h, args.fps, args.codec, opts, args.sample)
    p = plan(args.hours, args.cameras, m, args.clips_per_shard, args.wall_hours, args.cores_per_node,
             args.efficiency)
    out = {"measured": asdict(m), "plan": p, "cpu": _cpu_name()}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    from rich.console import Console

    c = Console()
    c.print(f"measured on this CPU ({out['cpu']}) by importing {m.source}: "
            f"{m.core_seconds_per_video_second:.3f} core-s per video-second, "
            f"{m.bytes_per_clip / 1024:.1f} KiB per clip, {m.clips_per_video_second:.2f} clips per video-second")
    c.print(f"{args.hours:,.0f} h x {args.cameras} camera(s) at {w}x{h} {args.fps:g} fps -> "
            f"{p['clips']:,.0f} clips of {cw}x{ch}x{args.frames}, {_bytes(p['bytes'])} in {p['shards']:,} shards")
    c.print(f"import: {p['core_hours']:,.0f} core-hours; {p['nodes']:,} node(s) of {args.cores_per_node} cores "
            f"finish in {p['wall_hours_on_nodes']:.1f} h (target {args.wall_hours:g} h, "
            f"{args.efficiency:.0%} of cores converting)")
    return 0


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB", "EB"):
        if n < 1000 or unit == "EB":
            return f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:.1f}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
