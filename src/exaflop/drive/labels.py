"""Telemetry, poses and trajectory labels (numpy only).

Conventions, everywhere in drive/: time in seconds, speed in m/s, steering in
degrees with positive = turning left, poses in a right-handed planar frame
(x, y in metres, yaw in radians counter-clockwise). The ego frame of a clip is
x forward, y left, origin at the ego position at the clip's last frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exaflop.drive.badinput import BadInput

WGS84_A = 6378137.0
WGS84_E2 = 6.69437999014e-3


@dataclass
class Telemetry:
    """Per-sample drive signals on one clock. x/y/yaw are None when the source has no poses."""

    t: np.ndarray
    speed: np.ndarray
    steering: np.ndarray  # degrees, positive left (steering wheel angle for real cars)
    x: np.ndarray | None = None
    y: np.ndarray | None = None
    yaw: np.ndarray | None = None

    def validate(self, name: str, max_gap: float) -> None:
        """Reject what would silently poison labels: NaNs, time going backwards, holes."""
        for field in ("speed", "steering", "x", "y", "yaw"):
            v = getattr(self, field)
            if v is not None:
                validate_series(name, field, self.t, v, max_gap)

    @property
    def has_poses(self) -> bool:
        return self.x is not None and self.y is not None


def validate_series(name: str, column: str, t: np.ndarray, v: np.ndarray, max_gap: float) -> None:
    """One telemetry signal with its own timestamps: finite, strictly increasing, no holes."""
    if len(t) < 2:
        raise BadInput(f"{name}: telemetry {column!r} has {len(t)} samples; need at least 2")
    for what, arr in (("timestamps", t), (f"column {column!r}", v)):
        bad = ~np.isfinite(arr)
        if bad.any():
            raise BadInput(f"{name}: telemetry {what}: NaN/inf at row {int(np.flatnonzero(bad)[0])}")
    dt = np.diff(t)
    if np.any(dt <= 0):
        row = int(np.flatnonzero(dt <= 0)[0]) + 1
        raise BadInput(f"{name}: telemetry timestamps are not increasing at row {row} "
                       f"(t={t[row - 1]:.3f} then {t[row]:.3f})")
    if dt.max() > max_gap:
        row = int(dt.argmax()) + 1
        raise BadInput(f"{name}: telemetry gap of {dt.max():.2f} s at t={t[row - 1]:.2f} s "
                       f"(more than --max-gap {max_gap} s)")


def interp(t_src: np.ndarray, v: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.interp(t, t_src, v)


def bicycle_poses(t: np.ndarray, speed: np.ndarray, steering_deg: np.ndarray,
                  wheelbase: float, steer_ratio: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integrate a kinematic bicycle model (rear-axle reference) into poses at times t.

    Each interval moves along an exact circular arc with the interval's mean
    speed and steering, so a constant-radius turn comes out exact, not drifting.
    """
    x, y, yaw = np.zeros(len(t)), np.zeros(len(t)), np.zeros(len(t))
    for i in range(1, len(t)):
        dt = t[i] - t[i - 1]
        v = 0.5 * (speed[i] + speed[i - 1])
        wheel = np.deg2rad(0.5 * (steering_deg[i] + steering_deg[i - 1]) / steer_ratio)
        omega = v * np.tan(wheel) / wheelbase
        dyaw, ds = omega * dt, v * dt
        if abs(dyaw) < 1e-9:
            dx, dy = ds, 0.0
        else:
            r = ds / dyaw
            dx, dy = r * np.sin(dyaw), r * (1 - np.cos(dyaw))
        c, s = np.cos(yaw[i - 1]), np.sin(yaw[i - 1])
        x[i], y[i] = x[i - 1] + c * dx - s * dy, y[i - 1] + s * dx + c * dy
        yaw[i] = yaw[i - 1] + dyaw
    return x, y, yaw


def yaw_from_path(t: np.ndarray, x: np.ndarray, y: np.ndarray, min_step: float = 0.3) -> np.ndarray:
    """Heading from the direction of travel, for sources with positions but no orientation.

    Directions come from points at least `min_step` metres apart (GPS jitter at a
    standstill would otherwise spin the heading); stationary stretches hold the last heading.
    """
    yaw = np.zeros(len(t))
    last = 0.0
    j = 0
    for i in range(len(t)):
        j = max(j, i)
        while j < len(t) - 1 and np.hypot(x[j] - x[i], y[j] - y[i]) < min_step:
            j += 1
        dx, dy = x[j] - x[i], y[j] - y[i]
        if np.hypot(dx, dy) >= min_step:
            last = float(np.arctan2(dy, dx))
        yaw[i] = last
    return yaw


def to_ego(x: np.ndarray, y: np.ndarray, x0: float, y0: float, yaw0: float) -> np.ndarray:
    """World points -> ego frame at (x0, y0, yaw0); returns (N, 2) of (forward, left)."""
    c, s = np.cos(yaw0), np.sin(yaw0)
    dx, dy = x - x0, y - y0
    return np.stack([c * dx + s * dy, -s * dx + c * dy], axis=-1)


def future_waypoints(tel: Telemetry, t_last: float, k: int, dt: float) -> np.ndarray:
    """(k, 2) future positions at t_last + dt, ..., t_last + k dt in the ego frame at t_last."""
    yaw = np.unwrap(tel.yaw)
    x0, y0, yaw0 = (float(np.interp(t_last, tel.t, v)) for v in (tel.x, tel.y, yaw))
    tf = t_last + dt * np.arange(1, k + 1)
    return to_ego(np.interp(tf, tel.t, tel.x), np.interp(tf, tel.t, tel.y), x0, y0, yaw0)


def past_poses(tel: Telemetry, t_frames: np.ndarray) -> np.ndarray:
    """(T, 3) poses (forward, left, yaw) at the clip's frames, in the ego frame of its last frame."""
    yaw = np.unwrap(tel.yaw)
    x0, y0, yaw0 = (float(np.interp(t_frames[-1], tel.t, v)) for v in (tel.x, tel.y, yaw))
    xy = to_ego(np.interp(t_frames, tel.t, tel.x), np.interp(t_frames, tel.t, tel.y), x0, y0, yaw0)
    return np.concatenate([xy, (np.interp(t_frames, tel.t, yaw) - yaw0)[:, None]], axis=1)


# --- geodesy (WGS84) for GPS and ECEF sources ---------------------------------------------------

def lla_to_ecef(lat_deg: np.ndarray, lon_deg: np.ndarray, alt: np.ndarray | float = 0.0) -> np.ndarray:
    lat, lon = np.deg2rad(lat_deg), np.deg2rad(lon_deg)
    n = WGS84_A / np.sqrt(1 - WGS84_E2 * np.sin(lat) ** 2)
    return np.stack([(n + alt) * np.cos(lat) * np.cos(lon), (n + alt) * np.cos(lat) * np.sin(lon),
                     (n * (1 - WGS84_E2) + alt) * np.sin(lat)], axis=-1)


def ecef_to_latlon(p: np.ndarray) -> tuple[float, float]:
    """Geodetic latitude/longitude (degrees) of one ECEF point, by fixed-point iteration."""
    x, y, z = (float(v) for v in p)
    lon = np.arctan2(y, x)
    r = np.hypot(x, y)
    lat = np.arctan2(z, r * (1 - WGS84_E2))
    for _ in range(8):
        n = WGS84_A / np.sqrt(1 - WGS84_E2 * np.sin(lat) ** 2)
        lat = np.arctan2(z + WGS84_E2 * n * np.sin(lat), r)
    return float(np.rad2deg(lat)), float(np.rad2deg(lon))


def enu_rotation(lat_deg: float, lon_deg: float) -> np.ndarray:
    """3x3 matrix taking ECEF vectors to local east/north/up at (lat, lon)."""
    lat, lon = np.deg2rad(lat_deg), np.deg2rad(lon_deg)
    return np.array([[-np.sin(lon), np.cos(lon), 0.0],
                     [-np.sin(lat) * np.cos(lon), -np.sin(lat) * np.sin(lon), np.cos(lat)],
                     [np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)]])


def ecef_to_enu(points: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """(N, 3) ECEF points -> (N, 3) east/north/up metres around the ECEF point `ref`."""
    return (points - ref) @ enu_rotation(*ecef_to_latlon(ref)).T


def latlon_to_xy(lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GPS track -> planar east/north metres around its first point."""
    ecef = lla_to_ecef(lat, lon)
    enu = ecef_to_enu(ecef, ecef[0])
    return enu[:, 0], enu[:, 1]


def quat_to_rot(q: np.ndarray) -> np.ndarray:
    """(..., 4) unit quaternions (w, x, y, z) -> (..., 3, 3) rotation matrices."""
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)
