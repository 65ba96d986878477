"""Labels from known motion: a constant-radius turn must give the analytic arc."""

import numpy as np
import torch

from exaflop.drive import labels as L
from exaflop.drive import metrics as M
from exaflop.drive.importers.clips import ImportOptions, Recording, make_clips

from .synth import analytic_turn, circle


def test_waypoints_from_poses_match_the_analytic_turn():
    t = np.arange(0, 10, 0.02)
    x, y, yaw = circle(t, speed=12.0, radius=50.0)
    tel = L.Telemetry(t, np.full_like(t, 12.0), np.zeros_like(t), x, y, yaw)
    for t_last in (0.7, 3.0, 6.1):
        wp = L.future_waypoints(tel, t_last, k=6, dt=0.5)
        # Linear interpolation of a sampled arc: error ~ chord sagitta, tiny at 50 Hz.
        np.testing.assert_allclose(wp, analytic_turn(12.0, 50.0, 6, 0.5), atol=2e-3)


def test_bicycle_model_with_constant_steering_is_a_circle():
    wheelbase, ratio, steer_deg, v = 2.7, 15.0, 60.0, 9.0
    radius = wheelbase / np.tan(np.deg2rad(steer_deg / ratio))
    t = np.arange(0, 8, 0.1)
    x, y, yaw = L.bicycle_poses(t, np.full_like(t, v), np.full_like(t, steer_deg), wheelbase, ratio)
    tel = L.Telemetry(t, np.full_like(t, v), np.full_like(t, steer_deg), x, y, yaw)
    np.testing.assert_allclose(L.future_waypoints(tel, 2.0, 6, 0.5), analytic_turn(v, radius, 6, 0.5), atol=1e-6)
    # The hold-steering baseline is the same arc.
    hold = M.hold_steering(torch.tensor([v]), torch.tensor([steer_deg]), torch.tensor([wheelbase]),
                           torch.tensor([ratio]), 6, 0.5)[0].numpy()
    np.testing.assert_allclose(hold, analytic_turn(v, radius, 6, 0.5), atol=1e-4)


def test_make_clips_labels_every_clip_with_the_arc():
    fps, n = 20.0, 160
    t = np.arange(n) / fps
    x, y, yaw = circle(t, 10.0, 30.0)
    rec = Recording(np.zeros((n, 8, 8, 3), np.uint8), t, L.Telemetry(t, np.full(n, 10.0), np.zeros(n), x, y, yaw))
    opts = ImportOptions(frames=4, fps=10.0, width=8, height=8, stride=2, waypoints=4, dt=0.5)
    clips = list(make_clips("turn", rec, opts))
    assert len(clips) == len(range(0, int(7.95 * 10) + 1 - 4 + 1, 2)) - 10  # last 2 s need a future
    for _, frames, tel, lab in clips:
        assert frames.shape == (4, 8, 8, 3)
        np.testing.assert_allclose(lab["waypoints"], analytic_turn(10.0, 30.0, 4, 0.5), atol=2e-3)
        assert lab["source"] == "poses" and tel["t"][-1] == 0.0


def test_yaw_from_path_and_geodesy():
    t = np.arange(0, 10, 0.1)
    x, y, yaw = circle(t, 10.0, 40.0)
    np.testing.assert_allclose(np.unwrap(L.yaw_from_path(t, x, y))[:-5], yaw[:-5], atol=0.02)
    lat, lon = 48.1 + t * 1e-5, 11.5 + t * 2e-5
    ecef = L.lla_to_ecef(lat, lon, 500.0)
    assert np.allclose(L.ecef_to_latlon(ecef[3]), (lat[3], lon[3]), atol=1e-9)
    ex, ny = L.latlon_to_xy(lat, lon)
    # 1e-6 deg of latitude ~ 0.111 m north; 2e-6 deg of longitude at 48.1 N ~ 0.149 m east.
    assert abs(ny[1] - 0.1112) < 2e-3 and abs(ex[1] - 2e-6 * 111_320 * np.cos(np.deg2rad(48.1))) < 2e-3
