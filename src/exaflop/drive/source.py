"""Random access to clips: byte-range reads through the shard index, PyAV decode, augmentation.

`ClipSource` is what the engine's global-cursor stream indexes. It is pickled
into DataLoader workers, so it holds only the (small) index; each worker opens
the shard files itself, once, through fsspec (local paths and any URL).
Augmentation is a pure function of (seed, sample id): a resumed run sees
bit-identical batches.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
import numpy as np
import torch

from exaflop.drive import shards
from exaflop.drive.video import decode_clip
from exaflop.errors import UserError


class ClipSource:
    def __init__(self, root: str, split: str, augment: dict | None = None, seed: int = 0):
        self.root, self.split, self.augment, self.seed = str(root), split, augment, seed
        self.manifest = shards.load_manifest(self.root)
        if split not in self.manifest.get("splits", {}):
            raise UserError(f"{self.root}/manifest.json: no split {split!r} (has {list(self.manifest['splits'])})")
        self.view = self.manifest.get("view", {})
        self.urls: list[str] = []
        keys, rows = [], []
        for shard in self.manifest["splits"][split]["shards"]:
            index = shards.read_json(shards.join(self.root, shard["index"]), "shard index")
            for entry in index["clips"]:
                keys.append(entry[0])
                rows.append([len(self.urls), *entry[1:9]])
            self.urls.append(shards.join(self.root, shard["file"]))
        self.keys = keys
        # One int64 row per clip: shard number, byte start, length, then member offsets/sizes.
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1, 9)
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"] = {}  # file handles never cross a process boundary
        return state

    def _file(self, shard: int):
        if self._pid != os.getpid():  # forked worker: the parent's handles share offsets, reopen
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = fsspec.open(self.urls[shard], "rb").open()
        return f

    def read(self, sample_id: int, channels_first: bool = False) -> tuple[np.ndarray, dict, dict]:
        """(frames (T,H,W,3) or (T,3,H,W) uint8, telemetry, labels) of one clip, unaugmented."""
        row = self.rows[sample_id]
        f = self._file(int(row[0]))
        f.seek(int(row[1]))
        blob = f.read(int(row[2]))
        entry = [None, 0, 0, *row[3:9].tolist()]
        mp4, telemetry, labels = shards.decode_record(blob, entry)
        return decode_clip(mp4, channels_first), telemetry, labels

    def __getitem__(self, sample_id: int) -> dict[str, np.ndarray]:
        frames, tel, lab = self.read(sample_id, channels_first=True)
        sample = {
            "video": frames,  # (T, C, H, W) uint8
            "speed": np.asarray(tel["speed"], np.float32),
            "steering": np.asarray(tel["steering"], np.float32),
            "waypoints": np.asarray(lab["waypoints"], np.float32),
            "future_steering": np.asarray(lab["steering"], np.float32),
            "vehicle": np.asarray([lab["wheelbase"], lab["steer_ratio"], lab["dt"]], np.float32),
        }
        if self.augment:
            augment(sample, np.random.default_rng([self.seed, sample_id]), self.augment,
                    self.view.get("mirror_axis", "width"))
        return sample


def augment(sample: dict, rng: np.random.Generator, cfg: dict, mirror_axis: str) -> None:
    """Draw the photometric jitter (applied on the device by the model: it is free there, and
    per-pixel float work here would cost the worker ~15% of its decode rate) and apply the
    label-consistent mirror."""
    b = 1.0 + rng.uniform(-cfg["brightness"], cfg["brightness"])
    c = 1.0 + rng.uniform(-cfg["contrast"], cfg["contrast"])
    sample["photometric"] = np.asarray([b, c], np.float32)
    if rng.uniform() < cfg["mirror_prob"]:
        # Mirroring the world across the ego's forward axis: left becomes right, so lateral
        # positions and steering change sign. Which image axis that is depends on the camera.
        video = sample["video"]  # (T, C, H, W)
        sample["video"] = np.ascontiguousarray(video[..., ::-1] if mirror_axis == "width" else video[..., ::-1, :])
        sample["waypoints"][:, 1] *= -1
        sample["steering"] *= -1
        sample["future_steering"] *= -1


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack samples; video stays uint8 (B, T, C, H, W) and becomes float on the device."""
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}
