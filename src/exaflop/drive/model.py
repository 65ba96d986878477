"""Driving models: a video transformer, a PilotNet-style CNN and the ego-status-only MLP
baseline, sharing one planning head.

Shapes: B batch, T frames, C channels, H x W pixels, N tokens, D model width,
K waypoints.

Both predict *residuals* over the baselines, scaled by dataset statistics:
waypoints over constant velocity, future steering over holding the current
steering. The head starts at zero, so an untrained model is exactly the
baselines and training only has to learn what they miss (the reason a tiny
model trained for minutes on a CPU beats them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exaflop.drive.config import ModelConfig
from exaflop.nn.layers import Block, RMSNorm

# Pixel normalisation: roughly zero-mean, unit-variance for natural and rendered frames.
PIXEL_MEAN, PIXEL_STD = 0.45, 0.25


class VideoTransformer(nn.Module):
    """Tubelet embedding -> [plan, ego, video tokens] -> non-causal blocks -> plan token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = nn.Conv3d(cfg.channels, cfg.d_model, kernel_size=(cfg.tubelet_t, cfg.patch, cfg.patch),
                               stride=(cfg.tubelet_t, cfg.patch, cfg.patch))
        self.pos = nn.Parameter(torch.zeros(1, cfg.n_tokens, cfg.d_model))
        self.plan = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.ego = nn.Linear(2 * cfg.frames, cfg.d_model) if cfg.use_ego_state else None
        self.blocks = nn.ModuleList(
            Block(cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.d_ff, causal=False,
                  norm_eps=cfg.norm_eps, dropout=cfg.dropout) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.out_dim = cfg.d_model
        nn.init.normal_(self.pos, std=cfg.init_std)
        nn.init.normal_(self.plan, std=cfg.init_std)

    def forward(self, video: Tensor, ego: Tensor) -> Tensor:
        x = self.embed(video.transpose(1, 2))  # (B, T, C, H, W) -> (B, D, T', H', W')
        x = x.flatten(2).transpose(1, 2) + self.pos  # (B, N, D)
        extra = [self.plan.expand(x.shape[0], -1, -1)]
        if self.ego is not None:
            extra.append(self.ego(ego)[:, None])
        x = torch.cat([*extra, x], dim=1)
        for block in self.blocks:
            x = block(x)  # no RoPE: tokens carry learned space-time positions
        return self.norm(x[:, 0])


class PilotNet(nn.Module):
    """NVIDIA PilotNet's shape (5 convs, then 100-50 MLP) with the frames stacked on channels,
    so it sees motion; the ego state joins at the MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        layers, c_in = [], cfg.channels * cfg.frames
        for i, c_out in enumerate(cfg.cnn_channels):
            k, s = (5, 2) if i < 3 else (3, 1)
            layers += [nn.Conv2d(c_in, c_out, k, stride=s, padding=k // 2), nn.ELU()]
            c_in = c_out
        self.convs = nn.Sequential(*layers, nn.AdaptiveAvgPool2d((4, 4)), nn.Flatten())
        ego_dim = 2 * cfg.frames if cfg.use_ego_state else 0
        self.use_ego = cfg.use_ego_state
        self.mlp = nn.Sequential(nn.Linear(16 * c_in + ego_dim, 100), nn.ELU(), nn.Linear(100, 50), nn.ELU())
        self.out_dim = 50

    def forward(self, video: Tensor, ego: Tensor) -> Tensor:
        x = self.convs(video.flatten(1, 2))  # (B, T*C, H, W) -> (B, 16*C')
        if self.use_ego:
            x = torch.cat([x, ego.to(x.dtype)], dim=-1)
        return self.mlp(x)


class EgoMLP(nn.Module):
    """The ego-status-only baseline: past speed and steering through an MLP, the video
    ignored (AD-MLP, arXiv 2305.10430, reached strong open-loop scores this way)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * cfg.frames, cfg.d_model), nn.GELU(),
                                 nn.Linear(cfg.d_model, cfg.d_model), nn.GELU())
        self.out_dim = cfg.d_model

    def forward(self, video: Tensor, ego: Tensor) -> Tensor:
        return self.mlp(ego.to(torch.float32))


class DriveModel(nn.Module):
    def __init__(self, cfg: ModelConfig, stats: dict, dt: float):
        super().__init__()
        self.cfg, self.k = cfg, cfg.waypoints
        self.backbone = {"vit": VideoTransformer, "pilotnet": PilotNet, "ego-mlp": EgoMLP}[cfg.arch](cfg)
        self.head = nn.Linear(self.backbone.out_dim, 3 * cfg.waypoints)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        # How much of the current steering each future step keeps: 1 = hold it (the baseline).
        # Learned directly, because on straight roads steering decays to 0 within a second,
        # which the residual head would otherwise have to learn through the whole backbone.
        self.steer_hold = nn.Parameter(torch.ones(cfg.waypoints))
        # Dataset statistics travel with the checkpoint as buffers.
        k = cfg.waypoints
        resid = torch.tensor(stats.get("residual_std", [[1.0, 1.0]] * k), dtype=torch.float32)
        if resid.shape != (k, 2):
            resid = torch.ones(k, 2)
        self.register_buffer("resid_std", resid)
        self.register_buffer("speed_mean", torch.tensor(float(stats.get("speed_mean", 0.0))))
        self.register_buffer("speed_std", torch.tensor(float(stats.get("speed_std", 1.0))))
        self.register_buffer("steer_std", torch.tensor(max(float(stats.get("steering_rms", 1.0)), 1e-3)))
        self.register_buffer("t_future", torch.arange(1, k + 1, dtype=torch.float32) * dt)

    def forward(self, video: Tensor, speed: Tensor, steering: Tensor,
                photometric: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """uint8 video (B,T,C,H,W), past speed/steering (B,T) -> waypoints (B,K,2) m, steering (B,K) deg.

        photometric: (B, 2) brightness and contrast factors drawn by the loader (training only).
        """
        x = video.float() / 255.0
        if photometric is not None:
            b, c = (photometric[:, i, None, None, None, None].float() for i in range(2))
            mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
            x = ((x - mean) * c + mean * b).clamp(0.0, 1.0)
        x = (x - PIXEL_MEAN) / PIXEL_STD
        speed, steering = speed.float(), steering.float()
        ego = torch.cat([(speed - self.speed_mean) / self.speed_std, steering / self.steer_std], dim=-1)
        feat = self.backbone(x, ego)
        out = self.head(feat).float().view(-1, self.k, 3)  # normalised residuals
        v = speed[:, -1:]
        prior = torch.stack([v * self.t_future, torch.zeros_like(v * self.t_future)], dim=-1)
        waypoints = prior + out[..., :2] * self.resid_std
        future_steering = steering[:, -1:] * self.steer_hold + out[..., 2] * self.steer_std
        return waypoints, future_steering

    def loss_terms(self, wp: Tensor, steer: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Huber loss on errors in units of the per-horizon residual spread, so near and far
        waypoints and steering all count; returns (total, waypoint part, steering part)."""
        wp_loss = F.smooth_l1_loss(wp / self.resid_std, batch["waypoints"].float() / self.resid_std)
        # Near-L1 for steering: it is mostly ~0 with short spikes, and the MAE we report is
        # minimised by the median, which a squared loss would trade for the mean.
        steer_loss = F.smooth_l1_loss(steer / self.steer_std, batch["future_steering"].float() / self.steer_std,
                                      beta=0.1)
        return wp_loss + self.cfg.steer_weight * steer_loss, wp_loss, steer_loss
