"""From one recording (frames + telemetry on one clock) to fixed-length labelled clips.

Every importer ends here, so real and simulated data get identical clips:
resample to the target fps, cut T-frame clips every `stride` frames, and label
each with the K future waypoints (ego frame of its last frame) and the future
steering. Sources without poses get them from a kinematic bicycle model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from exaflop.drive import labels as L
from exaflop.drive.badinput import BadInput

DASHCAM_VIEW = {"type": "dashcam", "hfov_deg": 60.0, "cam_height_m": 1.3, "horizon": 0.5,
                "mirror_axis": "width"}


@dataclass
class ImportOptions:
    frames: int = 8  # T per clip
    fps: float = 10.0
    width: int = 64
    height: int = 64
    stride: int = 4  # frames between clip starts (clips of one drive may overlap)
    waypoints: int = 6  # K
    dt: float = 0.5  # seconds between waypoints: K * dt is the horizon
    wheelbase: float = 2.7  # metres, for the bicycle model and the hold-steering baseline
    steer_ratio: float = 15.0  # steering-wheel degrees per road-wheel degree
    max_gap: float = 0.5  # seconds; a bigger hole in telemetry skips the drive
    max_bad_fraction: float = 0.2
    val_fraction: float = 0.2
    clips_per_shard: int = 512
    workers: int = 2
    codecs: tuple[str, ...] = ("h264", "hevc", "mpeg4", "vp9", "av1")
    extra: dict[str, Any] = field(default_factory=dict)  # importer-specific flags

    def clip_spec(self) -> dict:
        return {"frames": self.frames, "fps": self.fps, "width": self.width, "height": self.height,
                "stride": self.stride, "waypoints": self.waypoints, "dt": self.dt}


@dataclass
class Item:
    """One drive/episode to convert: found by `discover` in the parent, loaded in a worker."""

    item_id: str  # unique, safe as a file name and clip-key prefix
    group: str  # the drive it belongs to: the train/val split never separates a group
    paths: dict[str, str]
    split: str = "train"

    @property
    def telemetry_name(self) -> str:
        """What a telemetry problem is reported against: the file a user would open."""
        for key in ("telemetry", "csv", "segment"):
            if key in self.paths:
                return self.paths[key]
        return self.item_id


@dataclass
class Recording:
    frames: np.ndarray | Callable[[np.ndarray], np.ndarray]  # (N,H,W,3), or a loader of indices
    frame_times: np.ndarray  # (N,) seconds, on the telemetry clock
    telemetry: L.Telemetry
    n_frames: int = 0
    wheelbase: float | None = None  # per-recording overrides of the import options
    steer_ratio: float | None = None
    view: dict | None = None

    def take(self, idx: np.ndarray) -> np.ndarray:
        return self.frames[idx] if isinstance(self.frames, np.ndarray) else self.frames(idx)


def safe_id(text: str) -> str:
    """Item ids become file names and WebDataset keys: no dots, slashes or pipes."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "item"


def ensure_poses(tel: L.Telemetry, wheelbase: float, steer_ratio: float) -> str:
    """Fill in x/y/yaw where missing; returns where the labels' poses came from."""
    if tel.x is not None and tel.y is not None:
        if tel.yaw is None:
            tel.yaw = L.yaw_from_path(tel.t, tel.x, tel.y)
            return "positions (heading from direction of travel)"
        return "poses"
    tel.x, tel.y, tel.yaw = L.bicycle_poses(tel.t, tel.speed, tel.steering, wheelbase, steer_ratio)
    return "bicycle model (speed + steering)"


def resample(frame_times: np.ndarray, lo: float, hi: float, fps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Output times lo, lo+1/fps, ... <= hi; the nearest source frame for each; and whether that
    frame is close enough (a dropped-frame hole in the source makes a clip invalid, not smeared)."""
    t_out = lo + np.arange(int(np.floor((hi - lo) * fps + 1e-9)) + 1) / fps
    j = np.clip(np.searchsorted(frame_times, t_out), 1, len(frame_times) - 1)
    nearest = np.where(np.abs(frame_times[j - 1] - t_out) <= np.abs(frame_times[j] - t_out), j - 1, j)
    if len(frame_times) == 1:
        nearest = np.zeros_like(j)
    ok = np.abs(frame_times[nearest] - t_out) <= 1.0 / fps
    return t_out, nearest, ok


def _r(a: np.ndarray, nd: int = 4) -> list:
    return np.round(np.asarray(a, dtype=np.float64), nd).tolist()


def make_clips(name: str, rec: Recording, opts: ImportOptions) -> Iterator[tuple[int, np.ndarray, dict, dict]]:
    """Yield (start index, frames (T,H,W,3), telemetry dict, labels dict) for each clip.

    Raises BadInput (before yielding anything) when the recording cannot give one clip.
    """
    tel, T, K = rec.telemetry, opts.frames, opts.waypoints
    wheelbase = rec.wheelbase or opts.wheelbase
    steer_ratio = rec.steer_ratio or opts.steer_ratio
    tel.validate(name, opts.max_gap)
    if len(rec.frame_times) == 0:
        raise BadInput(f"{name}: no video frames")
    source = ensure_poses(tel, wheelbase, steer_ratio)
    lo, hi = max(rec.frame_times[0], tel.t[0]), min(rec.frame_times[-1], tel.t[-1])
    if hi <= lo:
        raise BadInput(f"{name}: telemetry (t={tel.t[0]:.2f}..{tel.t[-1]:.2f} s) and video "
                       f"(t={rec.frame_times[0]:.2f}..{rec.frame_times[-1]:.2f} s) do not overlap in time; "
                       "check the telemetry clock (--time-origin / --time-offset)")
    t_out, src_idx, ok = resample(rec.frame_times, lo, hi, opts.fps)
    horizon = K * opts.dt
    starts = [s for s in range(0, len(t_out) - T + 1, opts.stride)
              if t_out[s + T - 1] + horizon <= tel.t[-1] + 1e-9 and ok[s:s + T].all()]
    if not starts:
        need = (T - 1) / opts.fps + horizon
        raise BadInput(f"{name}: only {hi - lo:.2f} s of video overlaps the telemetry; one clip needs "
                       f"{need:.2f} s ({T} frames at {opts.fps:g} fps + {horizon:g} s of future)")
    yaw = np.unwrap(tel.yaw)
    for s in starts:
        t_frames = t_out[s:s + T]
        t_last = float(t_frames[-1])
        t_future = t_last + opts.dt * np.arange(1, K + 1)
        telemetry = {
            "t": _r(t_frames - t_last, 5), "t_last": round(t_last, 5),
            "speed": _r(np.interp(t_frames, tel.t, tel.speed)),
            "steering": _r(np.interp(t_frames, tel.t, tel.steering)),
            "pose": _r(L.past_poses(L.Telemetry(tel.t, tel.speed, tel.steering, tel.x, tel.y, yaw), t_frames)),
        }
        labels = {
            "waypoints": _r(L.future_waypoints(tel, t_last, K, opts.dt)),
            "steering": _r(np.interp(t_future, tel.t, tel.steering)),
            "speed": _r(np.interp(t_future, tel.t, tel.speed)),
            "dt": opts.dt, "source": source, "wheelbase": wheelbase, "steer_ratio": steer_ratio,
        }
        yield s, rec.take(src_idx[s:s + T]), telemetry, labels
