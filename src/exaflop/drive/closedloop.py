"""Closed loop: a driving policy drives highway-env from its own rendered frames.

Each episode is one seeded highway-env scene, set up exactly as the simulator's recordings
(`sim.make_env`) but with continuous control and no reversing. The IDM/MOBIL expert drives
the first T frames (the policy's input buffer: frames, speed, steering) — those steps are not
scored — then the policy takes over: every step it sees the last T frames, at the import's
frame size, crop and rate, through the training path (encoded as an H.264 clip, decoded
the way the loader decodes), and the past speed/steering; it predicts waypoints, and one
waypoint tracker turns them into acceleration and steering for every policy alike:

- steering: pure pursuit on the predicted path at a lookahead of max(4 m, 0.8 s x speed),
  inverted through the simulator's own kinematic bicycle (highway-env: heading rate =
  v sin(beta) / (L/2), beta = atan(tan(delta) / 2), L = 5 m);
- speed: a target of the distance to the first waypoint over its time, acceleration
  = 1.5 x (target - speed) clipped to [-5, 3] m/s^2.

Policies: "model" (a trained run; an `ego-mlp` run is the ego-status-only baseline),
"model-no-video" (the same run with its video input zeroed: how much the camera matters),
"expert" (IDM/MOBIL itself, never handed over), "expert-no-lane-change" (IDM alone),
"expert-tracked" (the tracker fed the expert's own future positions on the same seed —
checks the tracker, so tracker bugs are not blamed on models), "constant-velocity" (straight
ahead at the current speed) and "hold-steering" (last steering and speed held).

Evaluation seeds are 10**9 + 100_003 * K + i for `--seed K`; the recordings use
100_003 * seed + i with i < 10**5, so the two never meet.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exaflop.drive import scores as S
from exaflop.errors import UserError

EVAL_SEED_BASE = 10**9
POLICIES = ("model", "model-no-video", "expert", "expert-no-lane-change", "expert-tracked",
            "constant-velocity", "hold-steering")
EXPERTS = ("expert", "expert-no-lane-change")  # drive themselves: never handed over
MODELS = ("model", "model-no-video")
ACCEL = (-5.0, 3.0)  # m/s^2 the tracker may ask for
STEER_MAX = math.pi / 4  # highway-env's ContinuousAction steering range
LOOKAHEAD_S, LOOKAHEAD_MIN = 0.8, 4.0
SPEED_GAIN = 1.5


def eval_seed(seed: int, i: int) -> int:
    return EVAL_SEED_BASE + 100_003 * seed + i


@dataclass
class Clip:
    """What the policy's input looks like: the geometry of the run's training clips."""
    frames: int
    width: int
    height: int
    fps: float
    waypoints: int
    dt: float


def pure_pursuit(waypoints: np.ndarray, speed: float, length: float = 5.0) -> float:
    """Road-wheel angle (rad, positive left) that steers the kinematic bicycle onto the path
    through `waypoints` ((K, 2) ego frame, x forward, y left)."""
    path = np.vstack([[0.0, 0.0], np.asarray(waypoints, float)])
    seg = np.hypot(*np.diff(path, axis=0).T)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    look = max(LOOKAHEAD_MIN, LOOKAHEAD_S * speed)
    if arc[-1] < 1e-6:
        return 0.0
    look = min(look, arc[-1])
    x, y = np.interp(look, arc, path[:, 0]), np.interp(look, arc, path[:, 1])
    d2 = x * x + y * y
    if d2 < 1e-6:
        return 0.0
    curvature = 2.0 * y / d2
    beta = math.asin(max(-1.0, min(1.0, curvature * length / 2.0)))
    delta = math.atan(2.0 * math.tan(beta))
    return max(-STEER_MAX, min(STEER_MAX, delta))


def speed_command(waypoints: np.ndarray, speed: float, dt: float) -> float:
    """Acceleration (m/s^2) toward the speed the first waypoint implies."""
    target = float(np.hypot(*np.asarray(waypoints, float)[0])) / dt
    return max(ACCEL[0], min(ACCEL[1], SPEED_GAIN * (target - speed)))


def ego_frame(points: np.ndarray, pos: np.ndarray, heading: float) -> np.ndarray:
    """World points (highway-env frame, y down) -> ego frame (x forward, y left)."""
    d = np.asarray(points, float) - pos
    c, s = math.cos(heading), math.sin(heading)
    fwd = d[:, 0] * c + d[:, 1] * s
    right = -d[:, 0] * s + d[:, 1] * c  # highway-env's y points down the screen: +lateral is right
    return np.stack([fwd, -right], -1)


def _state(sim, ego) -> dict:
    """One step of the scored trace (highway-env frame; offsets/headings only by magnitude)."""
    road = sim.road
    lane_index = road.network.get_closest_lane_index(ego.position, ego.heading)
    lane = road.network.get_lane(lane_index)
    s_ego, lateral = lane.local_coordinates(ego.position)
    front, _ = road.neighbour_vehicles(ego, lane_index)
    gap, lead_speed = math.inf, 0.0
    if front is not None:
        s_front = lane.local_coordinates(front.position)[0]
        gap = s_front - s_ego - (front.LENGTH + ego.LENGTH) / 2
        lead_speed = front.speed
    return {"s": float(ego.position[0]), "speed": float(ego.speed), "heading": float(ego.heading),
            "lane_offset": float(lateral), "gap": float(gap), "lead_speed": float(lead_speed),
            "crashed": bool(ego.crashed), "on_road": bool(ego.on_road),
            "x": float(ego.position[0]), "y": float(ego.position[1])}


# Continuous control with reversing forbidden; the expert ignores it while it drives.
CONTROL = {"type": "ContinuousAction", "acceleration_range": [-5.0, 5.0],
           "steering_range": [-STEER_MAX, STEER_MAX], "speed_range": [0.0, 40.0]}


def hand_over(sim):
    """Replace the expert ego by a kinematic bicycle driven by our commands, in place."""
    from highway_env.vehicle.kinematics import Vehicle

    ego = Vehicle.create_from(sim.vehicle)
    # Drawn as the recordings drew the expert: the model has only ever seen a green ego.
    ego.MIN_SPEED, ego.color = 0.0, sim.vehicle.color
    sim.road.vehicles[sim.road.vehicles.index(sim.vehicle)] = ego
    sim.controlled_vehicles[0] = ego
    return ego


class Episode:
    """One seeded scene driven by one policy; `run()` -> (trace dict of arrays, frames, plans).
    Every command applied is kept in `actions` (the episode replays exactly from them);
    `observe()` is called at every scored step with what the policy saw and did."""

    def __init__(self, seed: int, so, clip: Clip, policy: str, predict=None,
                 expert_path: np.ndarray | None = None, keep_frames: bool = False):
        self.seed, self.so, self.clip, self.policy = seed, so, clip, policy
        self.predict, self.expert_path, self.keep_frames = predict, expert_path, keep_frames
        self.actions: list[np.ndarray] = []
        self.expert_speed = 0.0

    def observe(self, step: int, sim, ego, frames, speeds, steers, command: tuple[float, float]) -> None:
        """Hook for subclasses (the data engine's shadow): command = (acceleration m/s^2,
        steering rad in highway-env's sign)."""

    def run(self) -> tuple[dict[str, np.ndarray], list[np.ndarray], list[np.ndarray]]:
        import av

        from exaflop.drive.importers.sim import make_env
        from exaflop.drive.video import decode_clip, encode_clip, fit_frame

        so, clip = self.so, self.clip
        env, sim = make_env(so, self.seed, action=CONTROL)
        self.expert_speed = float(sim.vehicle.target_speed)
        T = clip.frames
        if self.policy == "expert-no-lane-change":
            sim.vehicle.enable_lane_change = False
        frames: deque = deque(maxlen=T)
        speeds: deque = deque(maxlen=T)
        steers: deque = deque(maxlen=T)
        trace, shown, plans = [], [], []
        steps = int(round(so.seconds * so.fps))
        action = np.zeros(2, np.float32)
        try:
            for step in range(steps + 1):
                if step:
                    self.actions.append(action.copy())
                    _, _, terminated, truncated, _ = env.step(action)
                    if terminated or truncated:
                        if step >= T:  # the last (possibly crashed) state is scored too
                            trace.append(_state(sim, sim.vehicle))
                        break
                ego = sim.vehicle
                rgb = env.render()
                frames.append(fit_frame(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24"),
                                        clip.width, clip.height))
                speeds.append(float(ego.speed))
                # Telemetry convention of the recordings: degrees, positive left (highway-env: right).
                steers.append(-math.degrees(ego.action.get("steering", 0.0)) if isinstance(ego.action, dict) else 0.0)
                if step < T - 1:
                    continue  # the expert fills the policy's input buffer; not scored
                if step == T - 1 and self.policy not in EXPERTS:
                    ego = hand_over(sim)
                trace.append(_state(sim, ego))
                if self.keep_frames:
                    shown.append(rgb)
                if self.policy in EXPERTS:
                    continue
                wp = self._waypoints(step, ego, frames, speeds, steers, encode_clip, decode_clip)
                plans.append(wp)
                if self.policy == "hold-steering":
                    delta, accel = math.radians(steers[-1]), 0.0
                else:
                    delta = pure_pursuit(wp, ego.speed, ego.LENGTH)
                    accel = speed_command(wp, ego.speed, clip.dt)
                self.observe(step, sim, ego, frames, speeds, steers, (accel, -delta))
                # ContinuousAction maps [-1, 1] onto its ranges; highway-env steers positive right.
                action = np.array([accel / 5.0, -delta / STEER_MAX], np.float32)
        finally:
            env.close()
        arrays = {k: np.asarray([t[k] for t in trace]) for k in trace[0]} if trace else {}
        return arrays, shown, plans

    def _waypoints(self, step, ego, frames, speeds, steers, encode_clip, decode_clip) -> np.ndarray:
        clip = self.clip
        k, dt = clip.waypoints, clip.dt
        t = dt * np.arange(1, k + 1)
        if self.policy == "constant-velocity":
            return np.stack([ego.speed * t, np.zeros(k)], -1)
        if self.policy == "hold-steering":
            return np.stack([ego.speed * t, np.zeros(k)], -1)  # drawn only; control holds steering
        if self.policy == "expert-tracked":
            path = self.expert_path  # (steps, 2) world positions of the expert on this seed
            idx = np.minimum(step + np.round(t * self.so.fps).astype(int), len(path) - 1)
            return ego_frame(path[idx], ego.position, ego.heading)
        video = decode_clip(encode_clip(np.stack(frames), clip.fps), channels_first=True)
        if self.policy == "model-no-video":
            video = np.zeros_like(video)
        return self.predict(video, np.asarray(speeds, np.float32), np.asarray(steers, np.float32))


def model_predictor(run: str | Path):
    """(predict(video (T,C,H,W) uint8, speed (T,), steering (T,)) -> waypoints (K, 2), Clip, so)."""
    import torch

    from exaflop.drive.importers.sim import SimOptions
    from exaflop.engine.checkpoint import load_for_inference

    cfg, task, model = load_for_inference(run)
    view = task.manifest.get("view", {})
    if view.get("type") != "bev":
        raise UserError(f"{run}: closed loop drives the simulator; this run was trained on "
                        f"{task.manifest.get('importer', 'other')} data with a {view.get('type', 'dashcam')} view "
                        "(train on `exaflop data drive sim` clips)")
    c = task.manifest["clip"]
    clip = Clip(frames=c["frames"], width=c["width"], height=c["height"], fps=c["fps"],
                waypoints=c["waypoints"], dt=c["dt"])
    so = SimOptions(fps=c["fps"], metres_per_width=float(view.get("metres_per_width", 64.0)))
    model.eval()

    @torch.inference_mode()
    def predict(video: np.ndarray, speed: np.ndarray, steering: np.ndarray) -> np.ndarray:
        wp, _ = model(torch.from_numpy(video)[None], torch.from_numpy(speed)[None], torch.from_numpy(steering)[None])
        return wp[0].float().numpy()

    return predict, clip, so


def evaluate(run: str | Path | None, policies: list[str], episodes: int, seconds: float, seed: int,
             quiet: bool = False, clip: Clip | None = None, so=None, other_runs: list[str] = (),
             render: Path | None = None) -> dict:
    """Every policy (and the model of each of `other_runs`, as "run:NAME") on the same seeds;
    JSON-ready results, per episode and aggregated, with paired differences model - other.
    `render`: an MP4 of the model's first episodes with its predicted waypoints drawn."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from exaflop.drive.importers.sim import SimOptions

    predictors: dict[str, tuple[str, object]] = {}
    for p in policies:
        if p in MODELS:
            if run is None:
                raise UserError("the model policies need a run: exaflop drive closed-loop RUN")
            if "model" not in predictors:
                predict, clip, so = model_predictor(run)
                predictors["model"] = ("model", predict)
            predictors[p] = (p, predictors["model"][1])
        else:
            predictors[p] = (p, None)
    for other in other_runs:
        predict, other_clip, _ = model_predictor(other)
        if clip is not None and other_clip != clip:
            raise UserError(f"--vs {other}: its clips ({other_clip}) differ from {run}'s ({clip}); "
                            "compare runs trained on the same data")
        clip = clip or other_clip
        predictors[f"run:{Path(other).name}"] = ("model", predict)
    clip = clip or Clip(frames=8, width=64, height=64, fps=10.0, waypoints=6, dt=0.5)
    so = so or SimOptions(fps=clip.fps)
    so.seconds = seconds
    seeds = [eval_seed(seed, i) for i in range(episodes)]
    per: dict[str, list[S.EpisodeScore]] = {name: [] for name in predictors}
    shown: list[tuple[np.ndarray, np.ndarray]] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=quiet) as progress:
        task = progress.add_task("closed loop", total=episodes * (len(set(predictors) | {"expert"})))
        for sd in seeds:
            # The expert first: the reference distance (progress) and path (expert-tracked).
            tr, _, _ = Episode(sd, so, clip, "expert").run()
            progress.advance(task)
            dist = float(tr["s"][-1] - tr["s"][0])
            for name, (policy, predict) in predictors.items():
                if policy == "expert":
                    trace = tr
                else:
                    path = np.stack([tr["x"], tr["y"]], -1) if policy == "expert-tracked" else None
                    keep = render is not None and name == "model" and len(shown) < 600
                    trace, frames, plans = Episode(sd, so, clip, policy, predict=predict, expert_path=path,
                                                   keep_frames=keep).run()
                    shown += list(zip(frames, plans, strict=False)) if keep else []
                    progress.advance(task)
                per[name].append(S.score_episode(sd, trace, 1.0 / so.fps, so.seconds - (clip.frames - 1) / so.fps,
                                                 dist))
    out = {"seeds": {"base": EVAL_SEED_BASE, "seed": seed, "episodes": episodes}, "seconds": seconds,
           "clip": clip.__dict__, "run": str(run) if run else None,
           "policies": {p: {"aggregate": S.aggregate(v), "episodes": [e.dict() for e in v]} for p, v in per.items()}}
    if "model" in per:
        out["model_vs"] = {p: S.paired_difference(per["model"], per[p]) for p in per if p != "model"}
    if render is not None and shown:
        write_video_overlay(shown, so, clip, render)
    return out


def write_video_overlay(shown: list[tuple[np.ndarray, np.ndarray]], so, clip: Clip, path: Path) -> None:
    """MP4 of the model driving (the simulator's frames) with its predicted waypoints drawn."""
    from exaflop.drive.importers.sim import EGO_AT
    from exaflop.drive.render import draw_polyline
    from exaflop.drive.video import write_video

    def frames():
        for rgb, wp in shown:
            img = np.ascontiguousarray(rgb).copy()
            h, w = img.shape[:2]
            px = w / so.metres_per_width
            # Ego frame (x forward = right of the screen, y left = up) -> pixels.
            u = EGO_AT[0] * w + np.concatenate([[0.0], wp[:, 0]]) * px
            v = EGO_AT[1] * h - np.concatenate([[0.0], wp[:, 1]]) * px
            draw_polyline(img, np.stack([u, v], -1), (255, 40, 40), radius=1)
            yield img

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.mp4")
    write_video(tmp, frames(), so.fps)
    tmp.replace(path)


def write_chart(result: dict, path: Path) -> None:
    """Bar chart: collision rate and composite per policy, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["policies"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in ((axes[0], "collision_rate", "collision rate"), (axes[1], "composite", "composite score")):
        means = [result["policies"][n]["aggregate"][key]["mean"] for n in names]
        lo = [m - result["policies"][n]["aggregate"][key]["ci95"][0] for m, n in zip(means, names, strict=True)]
        hi = [result["policies"][n]["aggregate"][key]["ci95"][1] - m for m, n in zip(means, names, strict=True)]
        ax.bar(range(len(names)), means, yerr=[lo, hi], capsize=3, color="#4a7dbf")
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
        ax.set_title(f"{title} (95% CI, {result['seeds']['episodes']} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"closed loop, {result['seeds']['episodes']} held-out seeds x {result['seconds']:g} s")
    for col in ("policy", "collisions", "off-road", "progress", "completion", "TTC<1.5s", "comfort", "lane keep",
                "composite"):
        t.add_column(col, justify="right" if col != "policy" else "left")
    def cell(a: dict, k: str, pct: bool = True) -> str:
        m, (lo, hi) = a[k]["mean"], a[k]["ci95"]
        return f"{m:.0%} [{lo:.0%}, {hi:.0%}]" if pct else f"{m:.2f} [{lo:.2f}, {hi:.2f}]"

    for name, v in result["policies"].items():
        a = v["aggregate"]
        t.add_row(name, cell(a, "collision_rate"), cell(a, "off_road_rate"), cell(a, "progress", False),
                  cell(a, "route_completion"), cell(a, "ttc_below_rate"), cell(a, "comfort_rate"),
                  cell(a, "lane_keeping_rate"), cell(a, "composite", False))
    Console().print(t)


def save(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "closed_loop.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
    tmp.replace(out / "closed_loop.json")
    write_chart(result, out / "closed_loop.png")
