"""Closed-loop scores on hand-made trajectories, and the waypoint tracker on the simulator."""

import math

import numpy as np
import pytest

from exaflop.drive import scores as S
from exaflop.drive.closedloop import pure_pursuit, speed_command

DT = 0.1


def test_ttc_closing_and_opening_gaps():
    assert S.ttc(np.array([20.0]), np.array([30.0]), np.array([20.0]))[0] == pytest.approx(2.0)
    assert math.isinf(S.ttc(np.array([20.0]), np.array([20.0]), np.array([25.0]))[0])  # opening
    assert math.isinf(S.ttc(np.array([np.inf]), np.array([30.0]), np.array([0.0]))[0])  # no lead


def test_comfort_bounds():
    t = np.arange(0, 5, DT)
    ok, _ = S.comfort(10 + 1.0 * t, np.zeros_like(t), DT)  # 1 m/s^2: comfortable
    assert ok
    ok, peaks = S.comfort(10 + 3.0 * t, np.zeros_like(t), DT)  # 3 m/s^2 > nuPlan's 2.40
    assert not ok and peaks["lon_accel_max"] == pytest.approx(3.0, rel=1e-6)
    ok, peaks = S.comfort(np.full_like(t, 20.0), 1.2 * t, DT)  # yaw rate 1.2 rad/s > 0.95
    assert not ok and peaks["yaw_rate"] == pytest.approx(1.2, rel=1e-6)


@pytest.mark.parametrize(("seconds", "passes"), [(2.1, False), (1.9, True)])
def test_lane_keeping_threshold(seconds, passes):
    n = round(seconds / DT)
    offset = np.concatenate([np.zeros(10), np.full(n, 0.6), np.zeros(10)])
    ok, longest = S.lane_keeping(offset, DT)
    assert ok == passes and longest == pytest.approx(seconds)


def _trace(n: int = 100, speed: float = 20.0, crash_at: int | None = None) -> dict:
    s = speed * DT * np.arange(n)
    crashed = np.zeros(n, bool)
    if crash_at is not None:
        crashed[crash_at:] = True
    return {"s": s, "speed": np.full(n, speed), "heading": np.zeros(n), "lane_offset": np.zeros(n),
            "gap": np.full(n, np.inf), "lead_speed": np.zeros(n), "crashed": crashed, "on_road": np.ones(n, bool)}


def test_expert_against_itself_and_a_crash():
    tr = _trace()
    dist = float(tr["s"][-1] - tr["s"][0])
    me = S.score_episode(1, tr, DT, 9.9, dist)
    assert me.progress == 1.0 and me.composite == 1.0 and not me.collision and me.route_completion == 1.0
    crash = S.score_episode(1, _trace(60, crash_at=59), DT, 9.9, dist)
    assert crash.collision and crash.composite == 0.0 and crash.progress < 1.0
    assert crash.route_completion == pytest.approx(5.9 / 9.9)
    agg = S.aggregate([me, crash])
    assert agg["collision_rate"]["mean"] == 0.5 and agg["collision_rate"]["ci95"] == [0.0, 1.0]
    diff = S.paired_difference([me, me], [crash, crash])
    assert diff["mean"] == 1.0 and diff["ci95"] == [1.0, 1.0]


def test_pure_pursuit_inverts_the_kinematic_bicycle():
    """Steering toward points on a circle of radius R reproduces the circle in highway-env's
    own kinematics: curvature = sin(beta) / (L/2), beta = atan(tan(delta) / 2)."""
    for radius in (30.0, -60.0, 200.0):
        th = np.linspace(0.05, 0.6, 6) * 30.0 / abs(radius)
        wp = np.stack([abs(radius) * np.sin(th), radius * (1 - np.cos(th))], -1)
        delta = pure_pursuit(wp, speed=10.0)
        beta = math.atan(math.tan(delta) / 2)
        assert math.sin(beta) / 2.5 == pytest.approx(1 / radius, rel=0.02)
    assert pure_pursuit(np.stack([np.arange(1, 7) * 5.0, np.zeros(6)], -1), 20.0) == 0.0
    assert speed_command(np.array([[10.0, 0.0]] * 6), speed=20.0, dt=0.5) == 0.0  # 10 m in 0.5 s
    assert speed_command(np.array([[20.0, 0.0]] * 6), speed=20.0, dt=0.5) == 3.0  # clipped


@pytest.fixture(scope="module")
def sim():
    pytest.importorskip("highway_env", reason="the sim extra is not installed")
    from exaflop.drive import closedloop

    return closedloop


def test_tracker_follows_the_experts_own_path(sim):
    """The tracker fed the expert's future positions on 20 held-out seeds drives like the
    expert: tracker bugs must not be blamed on models."""
    r = sim.evaluate(None, ["expert", "expert-tracked"], episodes=20, seconds=8.0, seed=3, quiet=True)
    expert, tracked = (r["policies"][p]["aggregate"] for p in ("expert", "expert-tracked"))
    assert tracked["collision_rate"]["mean"] <= expert["collision_rate"]["mean"] + 0.05, r
    assert tracked["progress"]["mean"] >= 0.95 and tracked["off_road_rate"]["mean"] == 0.0, tracked
    assert expert["progress"]["mean"] == 1.0


def test_baselines_are_deterministic_and_seeds_held_out(sim):
    import json

    from exaflop.drive.closedloop import EVAL_SEED_BASE

    policies = ["expert", "constant-velocity", "hold-steering"]
    a = sim.evaluate(None, policies, episodes=2, seconds=6.0, seed=0, quiet=True)
    b = sim.evaluate(None, policies, episodes=2, seconds=6.0, seed=0, quiet=True)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    seeds = [e["seed"] for e in a["policies"]["expert"]["episodes"]]
    assert seeds == [EVAL_SEED_BASE, EVAL_SEED_BASE + 1]  # training recordings use 100_003 * seed + i < 10**9
    c = sim.evaluate(None, ["constant-velocity"], episodes=2, seconds=6.0, seed=1, quiet=True)
    assert c["policies"]["constant-velocity"]["episodes"][0]["seed"] == EVAL_SEED_BASE + 100_003
