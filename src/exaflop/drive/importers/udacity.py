"""Udacity importer: the self-driving-car challenge logs and the simulator's driving_log.csv.

Challenge layout (one drive per folder):

    interpolated.csv    index,timestamp,width,height,frame_id,filename,angle,torque,speed,lat,long,alt
    center/ left/ right/   JPEG frames named in `filename`

`timestamp` is nanoseconds, `angle` the steering-wheel angle in radians
(positive left), speed m/s. Only center_camera rows are used. GPS lat/long
becomes a local east/north track, heading from the direction of travel.

Simulator layout (github.com/udacity/self-driving-car-sim):

    driving_log.csv     center,left,right,steering,throttle,brake,speed   (header optional)
    IMG/center_2016_12_01_13_30_48_287.jpg ...

Frame time comes from the file name; steering is normalised to [-1, 1] of
--sim-max-steer degrees at the road wheels, positive turning *right* (so the
sign is flipped to our positive-left); speed is mph. There are no poses: the
labels come from the kinematic bicycle model.
"""

from __future__ import annotations

import csv
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from exaflop.drive import labels as L
from exaflop.drive.badinput import BadInput
from exaflop.drive.importers.clips import ImportOptions, Item, Recording, safe_id
from exaflop.drive.importers.generic import read_table
from exaflop.drive.video import read_image

EXPECTED = ("expected interpolated.csv with center/ images (Udacity challenge) or driving_log.csv "
            "with IMG/ images (Udacity simulator)")
SIM_COLUMNS = ("center", "left", "right", "steering", "throttle", "brake", "speed")
SIM_STAMP = re.compile(r"(\d{4})_(\d{2})_(\d{2})_(\d{2})_(\d{2})_(\d{2})_(\d{3})")


def discover(root: Path, opts: ImportOptions) -> tuple[list[Item], list[dict]]:
    items = []
    for kind, name in (("challenge", "interpolated.csv"), ("simulator", "driving_log.csv")):
        for csv_path in sorted(root.rglob(name)):
            rel = csv_path.parent.relative_to(root)
            item_id = safe_id(f"{kind}-{rel}" if str(rel) != "." else kind)
            items.append(Item(item_id, group=item_id, paths={"csv": str(csv_path), "kind": kind}))
    return items, []


def _image_loader(paths: list[Path], opts: ImportOptions):
    """Frames on demand: a drive is thousands of JPEGs, most never used after resampling.
    Overlapping clips reuse frames, so decoded ones are kept."""
    cache: dict[int, np.ndarray] = {}

    def take(idx: np.ndarray) -> np.ndarray:
        for i in idx:
            if int(i) not in cache:
                cache[int(i)] = read_image(paths[int(i)], opts.width, opts.height)
        return np.stack([cache[int(i)] for i in idx])

    return take


def _check_images(paths: list[Path], folder: str, csv_path: Path) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise BadInput(f"{csv_path}: {len(missing)} of {len(paths)} images missing, first {missing[0]} "
                       f"(expected the {folder} folder beside the CSV)")


def load_challenge(csv_path: Path, opts: ImportOptions) -> Recording:
    table = read_table(csv_path)
    need = ("timestamp", "frame_id", "filename", "angle", "speed")
    absent = [c for c in need if c not in table]
    if absent:
        raise BadInput(f"{csv_path}: missing column(s) {', '.join(absent)}; expected "
                       "index,timestamp,width,height,frame_id,filename,angle,torque,speed,lat,long,alt")
    rows = [i for i, f in enumerate(table["frame_id"]) if f.strip() == "center_camera"]
    if not rows:
        raise BadInput(f"{csv_path}: no center_camera rows")

    def col(name: str) -> np.ndarray:
        try:
            return np.array([float(table[name][i]) if table[name][i] != "" else np.nan for i in rows])
        except ValueError:
            raise BadInput(f"{csv_path}: column {name!r} has non-numeric values") from None

    t = col("timestamp") * 1e-9
    if len(t):
        t = t - t[0]
    steering = np.rad2deg(col("angle")) * opts.extra.get("steering_sign", 1.0)
    x = y = None
    if "lat" in table and "long" in table:
        x, y = L.latlon_to_xy(col("lat"), col("long"))
    paths = [csv_path.parent / table["filename"][i].strip() for i in rows]
    _check_images(paths, "center/", csv_path)
    tel = L.Telemetry(t, col("speed"), steering, x, y, None)
    return Recording(_image_loader(paths, opts), t, tel, len(paths))


def _sim_time(name: str, csv_path: Path) -> float:
    m = SIM_STAMP.search(name)
    if not m:
        raise BadInput(f"{csv_path}: image name {name!r} has no timestamp (center_YYYY_MM_DD_HH_MM_SS_mmm.jpg)")
    y, mo, d, h, mi, s, ms = (int(v) for v in m.groups())
    return datetime(y, mo, d, h, mi, s, ms * 1000, tzinfo=timezone.utc).timestamp()


def load_simulator(csv_path: Path, opts: ImportOptions) -> Recording:
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if rows and rows[0][0].strip().lower() == "center":
        rows = rows[1:]  # newer simulator builds write a header, older ones do not
    if not rows or any(len(r) < len(SIM_COLUMNS) for r in rows):
        raise BadInput(f"{csv_path}: expected rows of {','.join(SIM_COLUMNS)}")
    # Paths are absolute on the recording machine (often Windows): keep the file name only.
    names = [re.split(r"[\\/]", r[0].strip())[-1] for r in rows]
    t = np.array([_sim_time(n, csv_path) for n in names])
    t = t - t[0]
    try:
        steer = np.array([float(r[3]) for r in rows])
        speed = np.array([float(r[6]) for r in rows]) * 0.44704  # mph
    except ValueError:
        raise BadInput(f"{csv_path}: steering/speed columns are not numbers") from None
    max_steer = float(opts.extra.get("sim_max_steer", 25.0))
    steering = -steer * max_steer * opts.extra.get("steering_sign", 1.0)
    paths = [csv_path.parent / "IMG" / n for n in names]
    _check_images(paths, "IMG/", csv_path)
    tel = L.Telemetry(t, speed, steering)
    # The simulator reports the road-wheel angle: no steering-wheel ratio in between.
    return Recording(_image_loader(paths, opts), t, tel, len(paths), steer_ratio=1.0)


def load(item: Item, opts: ImportOptions) -> Recording:
    csv_path = Path(item.paths["csv"])
    if item.paths["kind"] == "challenge":
        return load_challenge(csv_path, opts)
    return load_simulator(csv_path, opts)
