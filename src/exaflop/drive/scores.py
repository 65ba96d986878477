"""Closed-loop driving scores: per-episode metrics from a driven trajectory, the composite,
and bootstrap intervals. Pure numpy, no simulator: unit-testable on hand-made trajectories.

Definitions (docs/drive.md, "Closed loop"):
- collision: the ego crashed at any step.
- off-road: the ego's centre left the drivable lanes at any step.
- progress: distance driven along the road / the expert's on the same seed (1 = as far as
  the expert; capped at 1 in the composite, as NAVSIM's ego progress is).
- route completion: time driven before the episode ended (a crash ends it) / episode length.
- time to collision (TTC) to the lead vehicle in the ego's lane: gap / closing speed when
  closing, infinite otherwise; min TTC and the fraction of time below 1.5 s.
- comfort: nuPlan's `ego_is_comfortable` bounds on the smoothed trajectory: longitudinal
  acceleration in [-4.05, 2.40] m/s^2, |lateral acceleration| <= 4.89 m/s^2, |yaw rate| <=
  0.95 rad/s, |yaw acceleration| <= 1.93 rad/s^2, |longitudinal jerk| <= 4.13 m/s^3,
  |jerk| <= 8.37 m/s^3 (nuPlan devkit, planning/metrics/evaluation_metrics/common/
  ego_is_comfortable; the same bounds NAVSIM's PDMS uses).
- lane keeping: |lateral offset from the nearest lane centre| > 0.5 m for >= 2 s (continuous)
  fails (NAVSIM v2's EPDMS lane-keeping term).
- composite (NAVSIM-EPDMS-style): no_collision x on_road x (5 * min(progress, 1) + 5 * TTC
  + 2 * comfort + 2 * lane_keeping) / 14, where TTC = 1 when the time below 1.5 s is under
  0.5 s, else 0 (a hard-penalty product times a weighted mean of the rest; PDMS weights
  ep 5, ttc 5, c 2 with lane keeping added at 2).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

COMFORT = {"lon_accel": (-4.05, 2.40), "lat_accel": 4.89, "yaw_rate": 0.95, "yaw_accel": 1.93,
           "lon_jerk": 4.13, "jerk": 8.37}
TTC_LOW = 1.5  # s
TTC_GRACE = 0.5  # s below TTC_LOW tolerated in the composite
LANE_OFFSET = 0.5  # m
LANE_TIME = 2.0  # s
WEIGHTS = {"progress": 5.0, "ttc": 5.0, "comfort": 2.0, "lane_keeping": 2.0}


def ttc(gap: np.ndarray, ego_speed: np.ndarray, lead_speed: np.ndarray) -> np.ndarray:
    """Time to collision per step: bumper gap (m) / closing speed (m/s); inf when opening or
    no lead (gap = inf)."""
    gap, closing = np.asarray(gap, float), np.asarray(ego_speed, float) - np.asarray(lead_speed, float)
    out = np.full(gap.shape, np.inf)
    m = (closing > 1e-9) & np.isfinite(gap)
    out[m] = np.maximum(gap[m], 0.0) / closing[m]
    return out


def _smooth(x: np.ndarray, n: int = 3) -> np.ndarray:
    """Centered moving average (edges kept): differentiating raw simulator states amplifies
    step noise; nuPlan filters the same way (a Savitzky-Golay filter) before its bounds."""
    if len(x) < n:
        return x
    k = np.ones(n) / n
    y = np.convolve(x, k, mode="same")
    y[: n // 2], y[-(n // 2):] = x[: n // 2], x[-(n // 2):]
    return y


def comfort(speed: np.ndarray, heading: np.ndarray, dt: float) -> tuple[bool, dict[str, float]]:
    """(within nuPlan's bounds, the peak of each quantity) of a trajectory sampled every dt."""
    v = _smooth(np.asarray(speed, float))
    yaw = _smooth(np.unwrap(np.asarray(heading, float)))
    if len(v) < 3:
        return True, {}
    a_lon = np.gradient(v, dt)
    yaw_rate = np.gradient(yaw, dt)
    yaw_acc = np.gradient(yaw_rate, dt)
    a_lat = v * yaw_rate
    j_lon = np.gradient(a_lon, dt)
    jerk = np.hypot(j_lon, np.gradient(a_lat, dt))
    peaks = {"lon_accel_min": float(a_lon.min()), "lon_accel_max": float(a_lon.max()),
             "lat_accel": float(np.abs(a_lat).max()), "yaw_rate": float(np.abs(yaw_rate).max()),
             "yaw_accel": float(np.abs(yaw_acc).max()), "lon_jerk": float(np.abs(j_lon).max()),
             "jerk": float(jerk.max())}
    lo, hi = COMFORT["lon_accel"]
    ok = (lo <= peaks["lon_accel_min"] and peaks["lon_accel_max"] <= hi
          and all(peaks[k] <= COMFORT[k] for k in ("lat_accel", "yaw_rate", "yaw_accel", "lon_jerk", "jerk")))
    return bool(ok), peaks


def lane_keeping(offset: np.ndarray, dt: float) -> tuple[bool, float]:
    """(passes, the longest run in seconds with |offset| > 0.5 m)."""
    longest = run = 0
    for off in np.abs(np.asarray(offset, float)) > LANE_OFFSET:
        run = run + 1 if off else 0
        longest = max(longest, run)
    seconds = longest * dt
    return seconds < LANE_TIME - 1e-9, seconds


@dataclass
class EpisodeScore:
    seed: int
    collision: bool
    off_road: bool
    progress: float  # vs the expert on this seed
    route_completion: float
    min_ttc: float
    ttc_below: float  # fraction of time with TTC < 1.5 s
    comfortable: bool
    lane_keeping: bool
    lane_offset_seconds: float
    composite: float
    distance: float  # m along the road
    seconds: float  # driven

    def dict(self) -> dict:
        d = asdict(self)
        d["min_ttc"] = None if math.isinf(self.min_ttc) else round(self.min_ttc, 4)
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


def score_episode(seed: int, trace: dict[str, np.ndarray], dt: float, episode_seconds: float,
                  expert_distance: float | None) -> EpisodeScore:
    """Scores of one driven episode. trace: per-step arrays s (m along the road), speed,
    heading (rad), lane_offset (m), gap / lead_speed (lead in lane; gap inf without one),
    crashed, on_road (bools)."""
    s = np.asarray(trace["s"], float)
    crashed = bool(np.any(trace["crashed"]))
    off_road = not bool(np.all(trace["on_road"]))
    distance = float(s[-1] - s[0]) if len(s) else 0.0
    progress = distance / expert_distance if expert_distance and expert_distance > 0 else 1.0
    seconds = (len(s) - 1) * dt
    t = ttc(trace["gap"], trace["speed"], trace["lead_speed"])
    below = float(np.mean(t < TTC_LOW)) if len(t) else 0.0
    comfy, _ = comfort(trace["speed"], trace["heading"], dt)
    lk, lk_s = lane_keeping(trace["lane_offset"], dt)
    ttc_ok = below * seconds < TTC_GRACE
    weighted = (WEIGHTS["progress"] * min(max(progress, 0.0), 1.0) + WEIGHTS["ttc"] * ttc_ok
                + WEIGHTS["comfort"] * comfy + WEIGHTS["lane_keeping"] * lk) / sum(WEIGHTS.values())
    composite = (not crashed) * (not off_road) * weighted
    return EpisodeScore(seed=seed, collision=crashed, off_road=off_road, progress=progress,
                        route_completion=min(seconds / episode_seconds, 1.0) if episode_seconds else 1.0,
                        min_ttc=float(t.min()) if len(t) else math.inf, ttc_below=below,
                        comfortable=comfy, lane_keeping=lk, lane_offset_seconds=lk_s,
                        composite=float(composite), distance=distance, seconds=seconds)


def bootstrap(values: np.ndarray, n: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap over episodes (deterministic for a seed)."""
    x = np.asarray(values, float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n, len(x)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(x.mean()), float(lo), float(hi)


def aggregate(scores: list[EpisodeScore]) -> dict:
    """Every rate with its 95% bootstrap interval over episodes."""
    out: dict = {"episodes": len(scores)}
    fields = {"collision_rate": [s.collision for s in scores], "off_road_rate": [s.off_road for s in scores],
              "progress": [s.progress for s in scores], "route_completion": [s.route_completion for s in scores],
              "ttc_below_rate": [s.ttc_below for s in scores], "comfort_rate": [s.comfortable for s in scores],
              "lane_keeping_rate": [s.lane_keeping for s in scores], "composite": [s.composite for s in scores]}
    for name, vals in fields.items():
        mean, lo, hi = bootstrap(np.asarray(vals, float))
        out[name] = {"mean": round(mean, 4), "ci95": [round(lo, 4), round(hi, 4)]}
    finite = [s.min_ttc for s in scores if math.isfinite(s.min_ttc)]
    out["min_ttc_median"] = round(float(np.median(finite)), 4) if finite else None
    return out


def paired_difference(a: list[EpisodeScore], b: list[EpisodeScore], field: str = "composite") -> dict:
    """Mean of a - b over the same seeds, with its 95% bootstrap interval (paired)."""
    by_seed = {s.seed: getattr(s, field) for s in b}
    diffs = np.asarray([float(getattr(s, field)) - float(by_seed[s.seed]) for s in a if s.seed in by_seed])
    mean, lo, hi = bootstrap(diffs)
    return {"mean": round(mean, 4), "ci95": [round(lo, 4), round(hi, 4)], "episodes": len(diffs)}
