"""Writers of small fixtures in each dataset's real on-disk layout, plus known motion."""

from __future__ import annotations

import csv
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from exaflop.drive import labels as L
from exaflop.drive.video import write_video


def frames(n: int, width: int = 64, height: int = 48, seed: int = 0) -> np.ndarray:
    """A moving gradient with a bright bar: compresses well, and frames differ."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, size=3)
    u = np.arange(width)[None, :]
    out = np.zeros((n, height, width, 3), np.uint8)
    for i in range(n):
        out[i, :, :, 0] = (base[0] + (u + 2 * i) % 50).astype(np.uint8)
        out[i, :, :, 1] = base[1]
        out[i, :, :, 2] = base[2]
        bar = (5 * i) % width
        out[i, :, bar:bar + 3] = 255
    return out


def circle(t: np.ndarray, speed: float, radius: float, yaw0: float = 0.3, x0: float = 10.0, y0: float = -5.0):
    """Constant-speed left turn of the given radius: world x, y, yaw at times t."""
    theta = speed * t / radius
    lx, ly = radius * np.sin(theta), radius * (1 - np.cos(theta))
    c, s = np.cos(yaw0), np.sin(yaw0)
    return x0 + c * lx - s * ly, y0 + s * lx + c * ly, yaw0 + theta


def analytic_turn(speed: float, radius: float, k: int, dt: float) -> np.ndarray:
    """Waypoints of that turn in the ego frame, any start: the same arc from the origin."""
    theta = speed * dt * np.arange(1, k + 1) / radius
    return np.stack([radius * np.sin(theta), radius * (1 - np.cos(theta))], -1)


def write_generic(root: Path, name: str, seconds: float = 6.0, fps: float = 20.0, speed: float = 10.0,
                  radius: float = 40.0, suffix: str = ".mp4", seed: int = 0, tel_hz: float = 50.0,
                  fmt: str = "csv") -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    n = int(seconds * fps)
    video = root / f"{name}{suffix}"
    write_video(video, frames(n, seed=seed), fps, codec="libx265" if suffix == ".hevc" else "libx264")
    t = np.arange(0, seconds + 1e-9, 1 / tel_hz)
    x, y, yaw = circle(t, speed, radius)
    steering = np.full_like(t, 5.0)
    if fmt == "csv":
        tel = root / f"{name}.csv"
        with open(tel, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["t", "steering", "speed", "x", "y", "yaw"])
            for row in zip(t, steering, np.full_like(t, speed), x, y, np.rad2deg(yaw), strict=True):
                w.writerow([f"{v:.6f}" for v in row])
    else:  # JSON of columns with custom names, milliseconds and radians
        import json

        tel = root / f"{name}.json"
        tel.write_text(json.dumps({"stamp_ms": (t * 1000).tolist(), "steer_rad": np.deg2rad(steering).tolist(),
                                   "v": [speed] * len(t), "x": x.tolist(), "y": y.tolist(), "heading": yaw.tolist()}))
    return video, tel


def write_comma_segment(chunk: Path, route: str, number: int, seconds: float = 6.0, speed: float = 12.0,
                        radius: float = 60.0, size: tuple[int, int] = (128, 96), accel: float = 0.0,
                        speed_column: bool = True) -> Path:
    """A comma2k19 segment: raw HEVC, extension-less .npy arrays, ECEF poses on a circle.

    The arrays have the dataset's own shapes and dtypes: `CAN/speed/value` is a float64
    column array (N, 1), `CAN/steering_angle/value` is (N,) (speed_column=False writes
    speed as (N,) too). With `accel` the car speeds up along the arc: speed + accel * t.
    """
    seg = chunk / route / str(number)
    fps = 20.0
    n = int(seconds * fps)
    (seg / "global_pose").mkdir(parents=True)
    write_video(seg / "video.hevc", frames(n, *size, seed=number), fps, codec="libx265")
    frame_times = 1000.0 + number * 60 + np.arange(n) / fps  # boot-clock seconds
    # Circle in a local east/north/up plane at a real place, then into ECEF.
    lat0, lon0 = 37.4, -122.1
    ref = L.lla_to_ecef(np.array([lat0]), np.array([lon0]), 10.0)[0]
    tt = frame_times - frame_times[0]
    # Arc length speed*t + accel*t^2/2, expressed as a constant-speed circle over "effective" time.
    x, y, yaw = circle(tt + accel * tt**2 / (2 * speed), speed, radius)
    rot = L.enu_rotation(lat0, lon0)  # ECEF -> ENU
    enu = np.stack([x, y, np.zeros_like(x)], -1)
    positions = ref + enu @ rot
    # Device frame: x forward, y right, z down. Build device->ENU, then device->ECEF quaternions.
    fwd = np.stack([np.cos(yaw), np.sin(yaw), 0 * yaw], -1)
    right = np.stack([np.sin(yaw), -np.cos(yaw), 0 * yaw], -1)
    down = np.tile([0.0, 0.0, -1.0], (n, 1))
    dev_to_enu = np.stack([fwd, right, down], -1)  # columns are the device axes in ENU
    dev_to_ecef = rot.T @ dev_to_enu
    quats = np.stack([rot_to_quat(m) for m in dev_to_ecef])
    _npy(seg / "global_pose" / "frame_times", frame_times)
    _npy(seg / "global_pose" / "frame_positions", positions)
    _npy(seg / "global_pose" / "frame_orientations", quats)
    _npy(seg / "global_pose" / "frame_velocities", np.diff(positions, axis=0, prepend=positions[:1]) * fps)
    t_can = frame_times[0] - 0.5 + np.arange(0, seconds + 1.0, 0.01)
    can_speed = speed + accel * np.clip(t_can - frame_times[0], 0, None)
    for sig, val in (("speed", can_speed[:, None] if speed_column else can_speed),
                     ("steering_angle", np.full_like(t_can, 8.0))):
        (seg / "processed_log" / "CAN" / sig).mkdir(parents=True)
        _npy(seg / "processed_log" / "CAN" / sig / "t", t_can)
        _npy(seg / "processed_log" / "CAN" / sig / "value", val)
    return seg


def _npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:  # comma2k19 stores .npy content without the extension
        np.save(f, arr)


def rot_to_quat(m: np.ndarray) -> np.ndarray:
    """3x3 rotation -> (w, x, y, z)."""
    w = np.sqrt(max(0.0, 1 + m[0, 0] + m[1, 1] + m[2, 2])) / 2
    if w > 1e-6:
        return np.array([w, (m[2, 1] - m[1, 2]) / (4 * w), (m[0, 2] - m[2, 0]) / (4 * w), (m[1, 0] - m[0, 1]) / (4 * w)])
    x = np.sqrt(max(0.0, 1 + m[0, 0] - m[1, 1] - m[2, 2])) / 2
    return np.array([(m[2, 1] - m[1, 2]) / (4 * x), x, (m[0, 1] + m[1, 0]) / (4 * x), (m[0, 2] + m[2, 0]) / (4 * x)])


def _jpg(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=90)


def write_udacity_challenge(root: Path, seconds: float = 6.0, fps: float = 20.0, speed: float = 8.0) -> Path:
    """interpolated.csv + center/left/right JPEGs; drives due north at constant speed."""
    root.mkdir(parents=True, exist_ok=True)
    n = int(seconds * fps)
    imgs = frames(n, 80, 60)
    t0 = 1479424215880976321
    lat0, lon0 = 37.4, -122.1
    with open(root / "interpolated.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow("index,timestamp,width,height,frame_id,filename,angle,torque,speed,lat,long,alt".split(","))
        for i in range(n):
            ts = t0 + int(i / fps * 1e9)
            north = speed * i / fps
            lat = lat0 + np.rad2deg(north / 6_371_000.0)
            for cam in ("left_camera", "center_camera", "right_camera"):
                folder = cam.split("_")[0]
                name = f"{folder}/{ts}.jpg"
                if cam == "center_camera":
                    _jpg(root / name, imgs[i])
                w.writerow([i, ts, 80, 60, cam, name, 0.0, 0.0, speed, f"{lat:.10f}", lon0, 10.0])
    return root


def write_udacity_sim(root: Path, seconds: float = 6.0, fps: float = 15.0, speed_mph: float = 20.0,
                      steer: float = -0.2, header: bool = False) -> Path:
    """driving_log.csv with Windows paths + IMG/; steer < 0 is a left turn in the simulator."""
    root.mkdir(parents=True, exist_ok=True)
    n = int(seconds * fps)
    imgs = frames(n, 80, 40, seed=3)
    start = datetime(2016, 12, 1, 13, 30, 48, tzinfo=timezone.utc)
    rows = []
    for i in range(n):
        ts = start + timedelta(milliseconds=round(i * 1000 / fps))
        stamp = ts.strftime("%Y_%m_%d_%H_%M_%S_") + f"{ts.microsecond // 1000:03d}"
        names = [f"{cam}_{stamp}.jpg" for cam in ("center", "left", "right")]
        _jpg(root / "IMG" / names[0], imgs[i])
        rows.append([f"C:\\Users\\me\\Desktop\\data\\IMG\\{nm}" for nm in names] + [steer, 0.5, 0, speed_mph])
    with open(root / "driving_log.csv", "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(["center", "left", "right", "steering", "throttle", "brake", "speed"])
        w.writerows(rows)
    return root
