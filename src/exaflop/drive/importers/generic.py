"""Generic importer: a folder of videos, each with a telemetry CSV or JSON of the same stem.

    drives/
      morning.mp4   morning.csv       (or .json: a list of rows, or {column: [values]})
      evening.hevc  evening.json      raw streams need --raw-fps
      meta.json                       optional: {"view": {...}, "wheelbase": m, "steer_ratio": r}

Telemetry columns (names mappable with --col FIELD=NAME): t, steering, speed, and
optionally x/y (metres) with yaw, or lat/lon (degrees). By default t is seconds
on the video's clock (0 = first frame); --time-origin first-row aligns the first
row with the first frame instead, --time-offset shifts it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from exaflop.drive import labels as L
from exaflop.drive.badinput import BadInput
from exaflop.drive.importers.clips import ImportOptions, Item, Recording, safe_id
from exaflop.drive.video import VIDEO_SUFFIXES, decode_video

EXPECTED = ("expected videos (.mp4/.mkv/.mov/.h264/.hevc) each with a telemetry file of the same "
            "name (.csv or .json) holding t, steering, speed columns")
ALIASES = {
    "t": ("t", "time", "timestamp", "ts"),
    "steering": ("steering", "steering_angle", "steer", "angle"),
    "speed": ("speed", "velocity", "v"),
    "x": ("x",), "y": ("y",), "yaw": ("yaw", "heading"),
    "lat": ("lat", "latitude"), "lon": ("lon", "long", "lng", "longitude"),
}
TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
SPEED_UNITS = {"mps": 1.0, "kph": 1 / 3.6, "mph": 0.44704}


def discover(root: Path, opts: ImportOptions) -> tuple[list[Item], list[dict]]:
    meta = root / "meta.json"
    if meta.exists():
        _apply_meta(json.loads(meta.read_text()), opts)
    items, skipped, seen = [], [], set()
    for video in sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()):
        item_id = safe_id(str(video.relative_to(root).with_suffix("")))
        tel = next((video.with_suffix(s) for s in (".csv", ".json") if video.with_suffix(s).exists()), None)
        if tel is None:
            skipped.append({"item": item_id, "reason": f"{video}: no telemetry; expected "
                            f"{video.with_suffix('.csv').name} or {video.with_suffix('.json').name} beside it"})
            continue
        if item_id in seen:  # a.mp4 and a.mkv: same telemetry file, ambiguous
            skipped.append({"item": item_id, "reason": f"{video}: another video has the same name"})
            continue
        seen.add(item_id)
        items.append(Item(item_id, group=item_id, paths={"video": str(video), "telemetry": str(tel)}))
    return items, skipped


def _apply_meta(meta: dict, opts: ImportOptions) -> None:
    """meta.json gives defaults (the simulator writes one); explicit flags still win."""
    explicit = opts.extra.get("explicit", ())
    if "view" in meta:
        opts.extra["view"] = meta["view"]
    for key in ("wheelbase", "steer_ratio"):
        if key in meta and key not in explicit:
            setattr(opts, key, float(meta[key]))


def read_table(path: Path) -> dict[str, list[str]]:
    """CSV (with header) or JSON rows/columns -> {column: values}."""
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, list):
                if not data or not isinstance(data[0], dict):
                    raise BadInput(f"{path}: expected a list of row objects or an object of columns")
                return {k: [row.get(k) for row in data] for k in data[0]}
            if isinstance(data, dict):
                return {k: list(v) for k, v in data.items() if isinstance(v, list)}
            raise BadInput(f"{path}: expected a list of row objects or an object of columns")
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{path}: cannot read telemetry ({e})") from None
    if len(rows) < 2:
        raise BadInput(f"{path}: telemetry has no data rows")
    header = [h.strip() for h in rows[0]]
    return {h: [r[i] if i < len(r) else "" for r in rows[1:]] for i, h in enumerate(header)}


def column(table: dict[str, list], field: str, path: Path, mapping: dict[str, str], required: bool):
    """Find a field by its --col mapping or its usual names; values as float (blank -> NaN)."""
    names = (mapping[field],) if field in mapping else ALIASES[field]
    lower = {k.lower().strip(): k for k in table}
    for name in names:
        if name.lower() in lower:
            vals = table[lower[name.lower()]]
            try:
                return np.array([float(v) if v not in ("", None) else np.nan for v in vals])
            except (TypeError, ValueError):
                raise BadInput(f"{path}: column {name!r} has non-numeric values") from None
    if required:
        hint = f"--col {field}=NAME" if field not in mapping else f"--col {field}={mapping[field]} (not found)"
        raise BadInput(f"{path}: no {field} column (looked for {', '.join(names)}; "
                       f"columns are {', '.join(table) or 'none'}); map it with {hint}")
    return None


def load_telemetry(path: Path, opts: ImportOptions) -> L.Telemetry:
    ex = opts.extra
    mapping = dict(ex.get("columns", {}))
    table = read_table(path)
    get = lambda f, req=False: column(table, f, path, mapping, req)  # noqa: E731
    t = get("t", True) * TIME_UNITS[ex.get("time_unit", "s")]
    in_degrees = ex.get("angle_unit", "deg") == "deg"
    steering = get("steering", True) * ex.get("steering_sign", 1.0)
    steering = steering if in_degrees else np.rad2deg(steering)
    speed = get("speed", True) * SPEED_UNITS[ex.get("speed_unit", "mps")]
    x, y, yaw = get("x"), get("y"), get("yaw")
    if yaw is not None and in_degrees:
        yaw = np.deg2rad(yaw)
    if x is None or y is None:
        lat, lon = get("lat"), get("lon")
        x = y = None
        if lat is not None and lon is not None:
            x, y = L.latlon_to_xy(lat, lon)  # east/north metres; NaNs are caught by validate()
    if ex.get("time_origin", "video") == "first-row" and len(t):
        t = t - t[0]
    t = t + float(ex.get("time_offset", 0.0))
    return L.Telemetry(t, speed, steering, x, y, yaw)


def load(item: Item, opts: ImportOptions) -> Recording:
    video = Path(item.paths["video"])
    tel = load_telemetry(Path(item.paths["telemetry"]), opts)
    frames, times, src = decode_video(video, opts.width, opts.height, opts.codecs)
    if times is None:  # raw elementary stream: no timestamps inside, so the frame rate is a flag
        times = np.arange(len(frames)) / float(opts.extra.get("raw_fps", 20.0))
    view = opts.extra.get("view")
    return Recording(frames, times, tel, len(frames), view=fit_view(view, src, opts) if view else None)


def fit_view(view: dict, src: tuple[int, int], opts: ImportOptions) -> dict:
    """A top-down view's ego position is given in fractions of the source frame; the
    center-crop to the target aspect moves it, so re-express it in the clip's frame."""
    if view.get("type") != "bev":
        return view
    sw, sh = src
    scale = max(opts.width / sw, opts.height / sh)
    cw, ch = opts.width / scale, opts.height / scale  # crop box in source pixels
    ox, oy = (sw - cw) / 2, (sh - ch) / 2
    ex, ey = view["ego"]
    return {**view, "ego": [(ex * sw - ox) / cw, (ey * sh - oy) / ch],
            "metres_per_width": view["metres_per_width"] * cw / sw}
