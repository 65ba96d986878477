"""comma2k19 importer: segments of raw HEVC video with ECEF poses and CAN signals.

One segment (a minute of driving) is a folder such as
`Chunk_1/b0c9d2329ad1606b|2018-07-27--06-03-57/3/` (route names contain `|`) holding

    video.hevc                              raw HEVC stream, no container (20 fps, 1164x874)
    global_pose/frame_times                 (N,) seconds; the timing of video frame i
    global_pose/frame_positions             (N, 3) ECEF metres
    global_pose/frame_orientations          (N, 4) quaternions (w, x, y, z), device -> ECEF
    processed_log/CAN/speed/{t,value}       m/s on the same clock as frame_times; value (N, 1)
    processed_log/CAN/steering_angle/{t,value}   degrees, positive left; value (N,)

All arrays are NumPy files saved without the .npy extension. Frame timing comes
from frame_times, never from the stream (a raw stream has none). Poses become a
local east/north plane around the segment's first position; heading is the
device's forward (x) axis. Segments of one route are one drive for the split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from exaflop.drive import labels as L
from exaflop.drive.badinput import BadInput
from exaflop.drive.importers.clips import ImportOptions, Item, Recording, safe_id
from exaflop.drive.video import decode_video

REQUIRED = ("video.hevc", "global_pose/frame_times", "global_pose/frame_positions",
            "global_pose/frame_orientations", "processed_log/CAN/speed/t", "processed_log/CAN/speed/value",
            "processed_log/CAN/steering_angle/t", "processed_log/CAN/steering_angle/value")
EXPECTED = ("expected comma2k19 segment folders (e.g. Chunk_1/<dongle>|<date>/<n>/) holding "
            + ", ".join(REQUIRED))


def discover(root: Path, opts: ImportOptions) -> tuple[list[Item], list[dict]]:
    segments = {p.parent for p in root.rglob("video.hevc")}
    segments |= {p.parent for p in root.rglob("global_pose") if p.is_dir()}
    if (root / "video.hevc").exists() or (root / "global_pose").is_dir():
        segments.add(root)
    items, skipped = [], []
    for seg in sorted(segments):
        route, number = seg.parent.name, seg.name
        item_id = safe_id(f"{route}-{number}")
        missing = [r for r in REQUIRED if not (seg / r).is_file()]
        if missing:
            skipped.append({"item": item_id, "reason": f"{seg}: not a complete comma2k19 segment, missing "
                            f"{', '.join(missing)} (expected {', '.join(REQUIRED)})"})
            continue
        items.append(Item(item_id, group=route, paths={"segment": str(seg)}))
    return items, skipped


def _array(path: Path, ndim: int, cols: int | None = None) -> np.ndarray:
    """A float64 array of shape (N,) (ndim 1) or (N, cols) (ndim 2), as the dataset stores it.

    The published segments mix layouts for one-value series: `CAN/speed/value` is a column
    array (N, 1) while `CAN/steering_angle/value` is (N,). Both are accepted and read as (N,).
    """
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise BadInput(f"{path}: not a readable NumPy array ({e})") from None
    if ndim == 1 and a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != ndim or (cols is not None and a.shape[-1] != cols):
        accepted = "(N,) or (N, 1)" if ndim == 1 else f"(N, {cols})"
        raise BadInput(f"{path}: shape {a.shape}, expected {accepted}")
    if not np.issubdtype(a.dtype, np.number):
        raise BadInput(f"{path}: dtype {a.dtype}, expected numbers (float or int)")
    return a.astype(np.float64)


def load(item: Item, opts: ImportOptions) -> Recording:
    seg = Path(item.paths["segment"])
    name = str(seg)
    gp, can = seg / "global_pose", seg / "processed_log" / "CAN"
    frame_times = _array(gp / "frame_times", 1)
    positions = _array(gp / "frame_positions", 2, 3)
    quats = _array(gp / "frame_orientations", 2, 4)
    if not len(frame_times) == len(positions) == len(quats):
        raise BadInput(f"{gp}: frame_times/frame_positions/frame_orientations have different lengths "
                       f"({len(frame_times)}, {len(positions)}, {len(quats)})")
    L.validate_series(name, "frame_positions", frame_times, positions[:, 0], opts.max_gap)
    signals = {}
    for sig in ("speed", "steering_angle"):
        t, v = _array(can / sig / "t", 1), _array(can / sig / "value", 1)
        if len(t) != len(v):
            raise BadInput(f"{can / sig}: t has {len(t)} values, value has {len(v)}")
        L.validate_series(name, f"CAN/{sig}", t, v, opts.max_gap)
        signals[sig] = (t, v)

    frames, _, _ = decode_video(seg / "video.hevc", opts.width, opts.height, opts.codecs)
    if abs(len(frames) - len(frame_times)) > 2:
        raise BadInput(f"{seg / 'video.hevc'}: {len(frames)} frames decoded but frame_times has "
                       f"{len(frame_times)}; the video is truncated or belongs to another segment")
    n = min(len(frames), len(frame_times))
    frames, frame_times, positions, quats = frames[:n], frame_times[:n], positions[:n], quats[:n]

    # Local plane: east/north around the first position; heading of the device's forward axis.
    enu_rot = L.enu_rotation(*L.ecef_to_latlon(positions[0]))
    enu = (positions - positions[0]) @ enu_rot.T
    forward = (L.quat_to_rot(quats) @ np.array([1.0, 0.0, 0.0])) @ enu_rot.T
    yaw = np.arctan2(forward[:, 1], forward[:, 0])

    # Telemetry lives on the frame clock, where CAN covers it: no extrapolated signals.
    lo = max(signals["speed"][0][0], signals["steering_angle"][0][0])
    hi = min(signals["speed"][0][-1], signals["steering_angle"][0][-1])
    inside = (frame_times >= lo) & (frame_times <= hi)
    if inside.sum() < 2:
        raise BadInput(f"{name}: CAN signals (t={lo:.2f}..{hi:.2f}) and video frames "
                       f"(t={frame_times[0]:.2f}..{frame_times[-1]:.2f}) do not overlap in time")
    t = frame_times[inside]
    tel = L.Telemetry(t, np.interp(t, *signals["speed"]), np.interp(t, *signals["steering_angle"]),
                      enu[inside, 0], enu[inside, 1], yaw[inside])
    return Recording(frames, frame_times, tel, n)
