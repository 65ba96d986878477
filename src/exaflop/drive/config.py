"""Config sections of the driving task (torch-free: the planner and CLI read them).

The clip geometry (frames, size, waypoints) lives in the dataset manifest; the
model repeats it here so a checkpoint is self-describing, and the task checks
that both agree before training (a mismatch names the field to change).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from exaflop.schema import Strict


class ModelConfig(Strict):
    # ego-mlp: the ego-status-only baseline (past speed and steering, no camera; AD-MLP,
    # arXiv 2305.10430): same head and loss, so it shows how much the video adds.
    arch: Literal["vit", "pilotnet", "ego-mlp"] = "vit"
    frames: int = Field(8, ge=1)  # T, frames per clip
    height: int = Field(64, ge=8)
    width: int = Field(64, ge=8)
    channels: int = Field(3, ge=1)
    waypoints: int = Field(6, ge=1)  # K future (x, y) points
    # Video transformer: tubelets of tubelet_t frames x patch x patch pixels.
    tubelet_t: int = Field(2, ge=1)
    patch: int = Field(16, ge=2)
    n_layer: int = Field(4, ge=1)
    d_model: int = Field(128, ge=8)
    n_head: int = Field(4, ge=1)
    n_kv_head: int = Field(0, ge=0)  # 0: same as n_head
    d_ff: int = Field(0, ge=0)  # 0: ~8/3 d_model rounded to 64 (SwiGLU)
    norm_eps: float = 1e-5
    dropout: float = Field(0.0, ge=0, lt=1)
    # PilotNet-style CNN: conv channel widths; frames are stacked on channels.
    cnn_channels: list[int] = [24, 36, 48, 64, 64]
    # Past speed/steering enter as one extra token (vit) or MLP input (pilotnet).
    # The baselines use the same past telemetry, so the comparison is like for like.
    use_ego_state: bool = True
    steer_weight: float = Field(0.5, ge=0)  # weight of the steering loss beside waypoints
    init_std: float = 0.02

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.n_kv_head == 0:
            self.__dict__["n_kv_head"] = self.n_head
        if self.d_ff == 0:
            self.__dict__["d_ff"] = ((8 * self.d_model // 3) + 63) // 64 * 64
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.arch == "ego-mlp" and not self.use_ego_state:
            raise ValueError("arch='ego-mlp' sees only the ego state: it needs use_ego_state = true")
        if self.arch == "vit":
            if self.frames % self.tubelet_t:
                raise ValueError(f"frames={self.frames} is not divisible by tubelet_t={self.tubelet_t}")
            if self.height % self.patch or self.width % self.patch:
                raise ValueError(f"height={self.height} and width={self.width} must be multiples of patch={self.patch}")
        return self

    @property
    def n_tokens(self) -> int:
        return (self.frames // self.tubelet_t) * (self.height // self.patch) * (self.width // self.patch)


class DataConfig(Strict):
    # Directory written by `exaflop data drive ...` (train/ and val/ shards + manifest.json),
    # or an fsspec URL to one (e.g. s3://bucket/drive-sim).
    path: str = "data/drive-sim"
    # fsspec options of the store at `path`, e.g. {endpoint_url = "http://127.0.0.1:9000"} for an
    # S3-compatible server; credentials come from the AWS environment variables or profiles.
    storage_options: dict[str, str | int | float | bool] = {}
    num_workers: int = Field(2, ge=0)  # DataLoader worker processes decoding clips
    augment: bool = True  # photometric jitter + label-consistent mirror on the train split
    brightness: float = Field(0.2, ge=0, lt=1)  # max relative brightness change
    contrast: float = Field(0.2, ge=0, lt=1)
    mirror_prob: float = Field(0.5, ge=0, le=1)  # mirror left/right and negate y, yaw, steering
