"""Simulated drives: highway-env episodes driven by its IDM/MOBIL expert, seeded.

Episodes are recorded first as video + telemetry in the generic layout
(episode_NNNN.mp4 + .csv + meta.json), then imported by the generic importer,
so simulated data goes through exactly the path real data takes.

The camera is top-down, centred on the ego (highway-env's renderer): the ego
drives towards the right of the frame. highway-env's y axis points down the
screen, so y, yaw and steering are negated here to make the recorded frame
right-handed (y left of travel = up the screen, steering positive = left).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exaflop.drive.importers.clips import ImportOptions
from exaflop.drive.shards import write_json
from exaflop.errors import UserError

EGO_AT = (0.3, 0.5)  # ego position in the rendered frame (fractions of width, height)


@dataclass
class SimOptions:
    episodes: int = 40
    seconds: float = 30.0  # per episode (shorter if the ego crashes)
    fps: float = 10.0
    render_size: int = 128  # square frames, downscaled by the import
    metres_per_width: float = 64.0
    lanes: int = 4
    vehicles: int = 25
    seed: int = 0
    workers: int = 2


def _quiet_sdl() -> None:
    """SDL prints "XDG_RUNTIME_DIR is invalid" once per render on headless machines: give it
    a private runtime dir. (Never set SDL_VIDEODRIVER=dummy: highway-env then renders black.)"""
    if not os.environ.get("XDG_RUNTIME_DIR"):
        import tempfile

        os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="exaflop-xdg-")


def make_env(so: SimOptions, seed: int, action: dict | None = None):
    """(env, unwrapped sim) of one seeded episode, reset, with the ego an IDM/MOBIL expert.
    `action`: highway-env's action config (closed loop drives with ContinuousAction); the
    recordings use the environment's default, which the expert ignores."""
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    _quiet_sdl()
    import gymnasium as gym
    import highway_env  # noqa: F401  (registers the environments)
    from highway_env.vehicle.behavior import IDMVehicle

    rng = np.random.default_rng(seed)
    # Physics at the frame rate (highway-fast itself uses 5 Hz): a higher rate renders the
    # in-between steps too. The agent observation is unused, so it is made as cheap as possible.
    config = {
        "screen_width": so.render_size, "screen_height": so.render_size,
        "scaling": so.render_size / so.metres_per_width, "centering_position": list(EGO_AT),
        "policy_frequency": so.fps, "simulation_frequency": so.fps, "duration": so.seconds,
        "observation": {"type": "Kinematics", "vehicles_count": 1, "features": ["presence"]},
        "lanes_count": so.lanes, "vehicles_count": so.vehicles,
        "vehicles_density": float(rng.uniform(0.8, 1.6)),
    }
    if action is not None:
        config["action"] = action
    env = gym.make("highway-fast-v0", render_mode="rgb_array", disable_env_checker=True, config=config)
    env.reset(seed=seed)
    sim = env.unwrapped
    # Swap the agent-controlled ego for an IDM/MOBIL driver at the same state: the expert.
    old = sim.vehicle
    if hasattr(old, "target_lane_index"):
        ego = IDMVehicle.create_from(old)
    else:  # a plain Vehicle (continuous control): it has no lane target to copy
        ego = IDMVehicle(sim.road, old.position, old.heading, old.speed, target_lane_index=old.lane_index)
    ego.target_speed = float(rng.uniform(22.0, 34.0))
    ego.POLITENESS = float(rng.uniform(0.0, 0.3))  # eager to overtake: more lane changes to learn
    ego.LANE_CHANGE_MIN_ACC_GAIN = 0.1
    ego.color = (50, 200, 0)  # drawn like highway-env's own ego, not like the blue traffic
    sim.road.vehicles[sim.road.vehicles.index(old)] = ego
    sim.controlled_vehicles[0] = ego
    return env, sim


def simulate_episode(index: int, raw_dir: str, so: SimOptions) -> str:
    """Worker: one seeded episode -> episode_NNNN.mp4 + .csv (csv written last = done marker)."""
    from exaflop.drive.video import write_video

    stem = Path(raw_dir) / f"episode_{index:04d}"
    if stem.with_suffix(".csv").exists():
        return stem.name
    env, sim = make_env(so, so.seed * 100_003 + index)
    frames, rows = [], []
    for step in range(int(so.seconds * so.fps) + 1):
        if step:
            _, _, terminated, truncated, _ = env.step(0)  # action ignored: IDMVehicle decides
            if terminated or truncated:
                break
        frames.append(env.render())
        v = sim.vehicle
        rows.append((step / so.fps, -np.rad2deg(v.action.get("steering", 0.0)), v.speed,
                     v.position[0], -v.position[1], -np.rad2deg(v.heading)))
    env.close()
    tmp = stem.with_name(stem.name + ".tmp.mp4")
    write_video(tmp, frames, so.fps, crf=18)
    tmp.replace(stem.with_suffix(".mp4"))
    lines = ["t,steering,speed,x,y,yaw"] + [",".join(f"{v:.5f}" for v in r) for r in rows]
    tmp_csv = stem.with_name(stem.name + ".tmp.csv")
    tmp_csv.write_text("\n".join(lines) + "\n")
    tmp_csv.replace(stem.with_suffix(".csv"))
    return stem.name


def simulate(raw_dir: Path, so: SimOptions, quiet: bool = False) -> list[str]:
    """Write `so.episodes` episodes into raw_dir (resumable: finished episodes are kept)."""
    try:
        import highway_env  # noqa: F401
    except ImportError:
        raise UserError("the sim importer needs highway-env: pip install 'exaflop[sim]'") from None
    raw_dir.mkdir(parents=True, exist_ok=True)
    write_json(raw_dir / "meta.json", {
        "source": "highway-env highway-fast-v0, ego = IDMVehicle (IDM + MOBIL)",
        "view": {"type": "bev", "ego": list(EGO_AT), "metres_per_width": so.metres_per_width,
                 "forward": "right", "mirror_axis": "height"},
        # highway-env's kinematic bicycle: yaw rate ~ v * steering / vehicle length (5 m), and
        # the recorded steering is the road-wheel angle itself.
        "wheelbase": 5.0, "steer_ratio": 1.0, "seed": so.seed,
    })
    from rich.progress import Progress

    names = []
    with Progress(disable=quiet) as progress:
        task = progress.add_task(f"simulating {so.episodes} episodes", total=so.episodes)
        if so.workers <= 1:
            for i in range(so.episodes):
                names.append(simulate_episode(i, str(raw_dir), so))
                progress.advance(task)
        else:
            with ProcessPoolExecutor(so.workers, mp_context=mp.get_context("spawn")) as pool:
                for name in pool.map(simulate_episode, range(so.episodes), [str(raw_dir)] * so.episodes,
                                     [so] * so.episodes):
                    names.append(name)
                    progress.advance(task)
    return names


def default_options() -> ImportOptions:
    """Clip settings of the embedded default dataset (drive-tiny reads these)."""
    return ImportOptions(frames=8, fps=10.0, width=64, height=64, stride=3, waypoints=6, dt=0.5,
                         wheelbase=5.0, steer_ratio=1.0, max_gap=0.5, val_fraction=0.2)


def run_sim_import(out: Path | str, so: SimOptions, opts: ImportOptions | None = None,
                   raw_dir: Path | None = None, quiet: bool = False, storage_options: dict | None = None,
                   ray_address: str | None = None) -> dict:
    from exaflop.drive.importers.run import run_import

    opts = opts or default_options()
    raw_dir = raw_dir or Path(out).with_name(Path(out).name + "-raw")
    simulate(raw_dir, so, quiet)
    prov = {"simulator": "highway-env", "episodes": so.episodes, "seconds": so.seconds, "seed": so.seed,
            "raw_dir": str(raw_dir)}
    return run_import("generic", raw_dir, out, opts, provenance=prov, quiet=quiet,
                      storage_options=storage_options, ray_address=ray_address)
