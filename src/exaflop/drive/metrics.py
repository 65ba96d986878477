"""Trajectory and steering metrics, and the two baselines every eval reports.

Two definitions of "L2 at N seconds" are in use in the planning literature, and
numbers computed one way are routinely compared with the other. Both are here,
named so they cannot be confused:

  l2_at_Ns       error of the single waypoint N seconds ahead (nuScenes/UniAD-style "at")
  l2_mean_to_Ns  mean error over all waypoints up to N seconds (ST-P3-style "average")

ADE is the mean error over all K waypoints, FDE the error of the last one.
Steering MAE is in degrees of the dataset's steering signal, averaged over the
K future steps.

Baselines, computed from the same past telemetry the model sees:
  cv    constant velocity: straight ahead at the current speed (steering 0)
  hold  hold-last-steering: the current steering and speed held, rolled out with
        the kinematic bicycle model (a constant-radius arc)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SECONDS = (1, 2, 3)


def constant_velocity(speed: Tensor, k: int, dt: Tensor | float) -> Tensor:
    """(B,) current speed -> (B, K, 2) waypoints straight ahead."""
    t = torch.arange(1, k + 1, device=speed.device, dtype=torch.float32) * dt  # (K,) or (B, K)
    x = speed[:, None].float() * t
    return torch.stack([x, torch.zeros_like(x)], dim=-1)


def hold_steering(speed: Tensor, steering_deg: Tensor, wheelbase: Tensor, steer_ratio: Tensor,
                  k: int, dt: Tensor | float) -> Tensor:
    """(B,) each -> (B, K, 2) waypoints on the arc of constant speed and steering."""
    t = torch.arange(1, k + 1, device=speed.device, dtype=torch.float32) * dt
    wheel = torch.deg2rad(steering_deg.float() / steer_ratio)
    curvature = torch.tan(wheel) / wheelbase  # (B,) 1/m, signed (left positive)
    s = speed[:, None].float() * t  # arc length (B, K)
    theta = curvature[:, None] * s
    straight = curvature.abs()[:, None] < 1e-6
    safe_c = torch.where(straight, torch.ones_like(theta), curvature[:, None].expand_as(theta))
    x = torch.where(straight, s, torch.sin(theta) / safe_c)
    y = torch.where(straight, torch.zeros_like(s), (1 - torch.cos(theta)) / safe_c)
    return torch.stack([x, y], dim=-1)


def baselines(batch: dict[str, Tensor], k: int) -> dict[str, tuple[Tensor, Tensor]]:
    """{"cv": (waypoints, steering), "hold": (...)} for a batch of clips."""
    v = batch["speed"][:, -1]
    steer = batch["steering"][:, -1]
    wheelbase, ratio, dt = (batch["vehicle"][:, i] for i in range(3))
    dt = dt[:, None]
    return {
        "cv": (constant_velocity(v, k, dt), torch.zeros_like(batch["future_steering"])),
        "hold": (hold_steering(v, steer, wheelbase, ratio, k, dt), steer[:, None].expand(-1, k).float()),
    }


class TrajectoryMeter:
    """Accumulates per-horizon error sums over batches; `result()` gives the named metrics."""

    def __init__(self, k: int, dt: float):
        self.k, self.dt = k, dt
        self.err_sum = torch.zeros(k, dtype=torch.float64)
        self.steer_sum = torch.zeros(k, dtype=torch.float64)
        self.n = 0

    def add(self, pred_wp: Tensor, gt_wp: Tensor, pred_steer: Tensor, gt_steer: Tensor) -> None:
        err = (pred_wp.float() - gt_wp.float()).norm(dim=-1)  # (B, K) metres
        self.err_sum += err.sum(0).double().cpu()
        self.steer_sum += (pred_steer.float() - gt_steer.float()).abs().sum(0).double().cpu()
        self.n += err.shape[0]

    def result(self, prefix: str = "") -> dict[str, float]:
        if self.n == 0:
            return {}
        per_k = self.err_sum / self.n
        out = {"ade": per_k.mean(), "fde": per_k[-1]}
        for s in SECONDS:
            idx = round(s / self.dt)
            if math.isclose(idx * self.dt, s, rel_tol=1e-6) and 1 <= idx <= self.k:
                out[f"l2_at_{s}s"] = per_k[idx - 1]
                out[f"l2_mean_to_{s}s"] = per_k[:idx].mean()
        out["steer_mae_deg"] = (self.steer_sum / self.n).mean()
        return {f"{prefix}{name}": float(v) for name, v in out.items()}
