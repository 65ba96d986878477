"""The driving task: what the engine needs to train on clip shards (see engine/task.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from exaflop.drive import metrics as M
from exaflop.drive import shards
from exaflop.drive.model import DriveModel
from exaflop.drive.source import ClipSource, collate
from exaflop.errors import UserError

DATASET_SUMMARY = "dataset.json"


class DriveTask:
    def __init__(self, cfg):
        self.cfg, self.mcfg, self.dcfg = cfg, cfg.model, cfg.data
        self._manifest: dict | None = None
        self._flops: float | None = None

    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            self._manifest = shards.load_manifest(self.dcfg.path, self.dcfg.storage_options)
            self._check_geometry(self._manifest)
        return self._manifest

    def _check_geometry(self, manifest: dict) -> None:
        """The model is built for one clip shape; data of another shape is a config error."""
        clip = manifest["clip"]
        for model_key, clip_key in (("frames", "frames"), ("height", "height"), ("width", "width"),
                                    ("waypoints", "waypoints")):
            if getattr(self.mcfg, model_key) != clip[clip_key]:
                raise UserError(f"model.{model_key}={getattr(self.mcfg, model_key)} but the clips in "
                                f"{self.dcfg.path} have {clip_key}={clip[clip_key]}; set "
                                f"--set model.{model_key}={clip[clip_key]} or re-import the data")

    def save_assets(self, run_dir: Path) -> None:
        """RUN/dataset.json: the manifest without its item lists (clip geometry, dt, label
        statistics, view), all the model and /v1/drive/predict need without the clips."""
        m = {k: v for k, v in self.manifest.items() if k not in ("splits", "skipped")}
        m["copied_from"] = str(self.dcfg.path)
        tmp = run_dir / f".{DATASET_SUMMARY}.tmp"
        tmp.write_text(json.dumps(m, indent=1, sort_keys=True))
        os.replace(tmp, run_dir / DATASET_SUMMARY)

    def load_assets(self, run_dir: Path) -> None:
        own = Path(run_dir) / DATASET_SUMMARY
        if own.is_file():
            self._manifest = json.loads(own.read_text())
            self._check_geometry(self._manifest)
        # else: an older run, read through data.path as before

    def use_data(self, path: str, what: str) -> None:
        """Point evaluation / rendering at a dataset (`--data PATH`, default data.path); the
        run itself holds no clips. A missing one is one line naming the flag."""
        try:
            manifest = shards.load_manifest(path, self.dcfg.storage_options)
        except UserError:
            raise UserError(f"{what} needs the clips as well as the run: no dataset manifest at {path} "
                            "(data.path in the run's config.toml); pass --data PATH to the imported "
                            "dataset (exaflop data drive ...)") from None
        self._check_geometry(manifest)
        self.dcfg.path = path
        if self._manifest is None:
            self._manifest = manifest

    @property
    def dt(self) -> float:
        return float(self.manifest["clip"]["dt"])

    def build_model(self) -> nn.Module:
        return DriveModel(self.mcfg, self.manifest.get("stats", {}), self.dt)

    def build_dataset(self, split: str) -> ClipSource:
        aug = None
        if split == "train" and self.dcfg.augment:
            aug = {"brightness": self.dcfg.brightness, "contrast": self.dcfg.contrast,
                   "mirror_prob": self.dcfg.mirror_prob}
        self.manifest  # noqa: B018  (validates geometry before workers start)
        source = ClipSource(self.dcfg.path, split, augment=aug, seed=self.cfg.run.seed,
                            storage_options=self.dcfg.storage_options)
        if len(source) == 0:
            raise UserError(f"{self.dcfg.path}: the {split} split has no clips; import more drives "
                            "or lower --val-fraction")
        return source

    def collate(self, samples: list[Any]) -> dict[str, Tensor]:
        return collate(samples)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        # Through model(...), not a method of it: DDP/FSDP wrappers only intercept forward().
        wp, steer = model(batch["video"], batch["speed"], batch["steering"], batch.get("photometric"))
        inner = getattr(model, "module", model)
        loss, wp_loss, steer_loss = inner.loss_terms(wp, steer, batch)
        with torch.no_grad():
            ade = (wp.float() - batch["waypoints"].float()).norm(dim=-1).mean()
        return loss, {"wp_loss": wp_loss.item(), "steer_loss": steer_loss.item(), "ade": ade.item()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[dict[str, Tensor]]) -> dict[str, float]:
        was_training = model.training
        model.eval()
        k = self.mcfg.waypoints
        meters = {name: M.TrajectoryMeter(k, self.dt) for name in ("val_", "val_cv_", "val_hold_")}
        device = next(model.parameters()).device
        for batch in batches:
            batch = {n: v.to(device) if isinstance(v, Tensor) else v for n, v in batch.items()}
            wp, steer = model(batch["video"], batch["speed"], batch["steering"])
            meters["val_"].add(wp, batch["waypoints"], steer, batch["future_steering"])
            for name, (b_wp, b_steer) in M.baselines(batch, k).items():
                meters[f"val_{name}_"].add(b_wp, batch["waypoints"], b_steer, batch["future_steering"])
        model.train(was_training)
        out: dict[str, float] = {}
        for prefix, meter in meters.items():
            out.update(meter.result(prefix))
        if out:  # < 1: the model beats the better of the two baselines on ADE
            best = min(out["val_cv_ade"], out["val_hold_ade"])
            out["val_ade_vs_best_baseline"] = out["val_ade"] / max(best, 1e-9)
        return out

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """Units for FSDP sharding and activation checkpointing (the CNN has none)."""
        return list(getattr(model.backbone, "blocks", []))

    def flops_per_sample(self) -> float:
        """Forward+backward FLOPs of one clip: 3x the forward multiply-adds x2, counted by hooks."""
        if self._flops is None:
            self._flops = count_flops(self.build_model(), self.mcfg)
        return self._flops


def count_flops(model: nn.Module, cfg) -> float:
    macs = 0

    def hook(mod, inp, out):
        nonlocal macs
        if isinstance(mod, nn.Linear):
            macs += inp[0].numel() // inp[0].shape[-1] * mod.in_features * mod.out_features
        elif isinstance(mod, nn.Conv2d | nn.Conv3d):
            macs += out.numel() * (mod.in_channels // mod.groups) * int(torch.tensor(mod.kernel_size).prod())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d | nn.Conv3d)]
    video = torch.zeros(1, cfg.frames, cfg.channels, cfg.height, cfg.width, dtype=torch.uint8)
    with torch.no_grad():
        model(video, torch.zeros(1, cfg.frames), torch.zeros(1, cfg.frames))
    for h in handles:
        h.remove()
    if cfg.arch == "vit":  # attention scores and weighted sum: 2 * N^2 * D MACs per layer
        n = cfg.n_tokens + 2
        macs += cfg.n_layer * 2 * n * n * cfg.d_model
    return 6.0 * macs  # 2 FLOPs per MAC, backward ~2x forward
