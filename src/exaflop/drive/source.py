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

    def _record(self, sample_id: int) -> tuple[bytes, dict, dict]:
        """(mp4 bytes, telemetry, labels) of one clip: one byte-range read through the index."""
        row = self.rows[sample_id]
        f = self._file(int(row[0]))
        f.seek(int(row[1]))
        blob = f.read(int(row[2]))
        return shards.decode_record(blob, [None, 0, 0, *row[3:9].tolist()])

    def read(self, sample_id: int, channels_first: bool = False) -> tuple[np.ndarray, dict, dict]:
        """(frames (T,H,W,3) or (T,3,H,W) uint8, telemetry, labels) of one clip, unaugmented."""
        mp4, telemetry, labels = self._record(sample_id)
        return decode_clip(mp4, channels_first), telemetry, labels

    def _sample(self, sample_id: int, video_out: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """One training sample; with video_out, the frames are decoded straight into it."""
        mp4, tel, lab = self._record(sample_id)
        photometric, mirror = draw_augment(self.seed, sample_id, self.augment)
        flip = self.view.get("mirror_axis", "width") if mirror else None
        try:
            video = decode_clip(mp4, channels_first=True, out=video_out, flip=flip)
        except ValueError as e:  # a clip whose frame count/size is not the manifest's
            raise UserError(f"{self.root}: clip {self.keys[sample_id]!r}: {e}; re-import the dataset") from e
        sign = -1.0 if mirror else 1.0  # mirroring the world flips lateral positions and steering
        sample = {
            "video": video,  # (T, C, H, W) uint8
            "speed": np.asarray(tel["speed"], np.float32),
            "steering": np.asarray(tel["steering"], np.float32) * sign,
            "waypoints": np.asarray(lab["waypoints"], np.float32) * np.asarray([1.0, sign], np.float32),
            "future_steering": np.asarray(lab["steering"], np.float32) * sign,
            "vehicle": np.asarray([lab["wheelbase"], lab["steer_ratio"], lab["dt"]], np.float32),
        }
        if photometric is not None:
            sample["photometric"] = photometric
        return sample

    def __getitem__(self, sample_id: int) -> dict[str, np.ndarray]:
        return self._sample(sample_id)

    def read_batch(self, ids: list[int]) -> dict[str, torch.Tensor]:
        """`collate([self[i] for i in ids])`, built in place: each clip decodes straight into
        its slot of one (B, T, C, H, W) uint8 tensor, which inside a DataLoader worker lives
        in shared memory, so neither stacking nor handing the batch to the trainer copies it."""
        clip = self.manifest["clip"]
        video = torch.empty((len(ids), clip["frames"], 3, clip["height"], clip["width"]), dtype=torch.uint8)
        if torch.utils.data.get_worker_info() is not None:
            video.share_memory_()
        slots = video.numpy()
        samples = [self._sample(i, slots[j]) for j, i in enumerate(ids)]
        batch = {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0] if k != "video"}
        return {"video": video, **batch}


def draw_augment(seed: int, sample_id: int, cfg: dict | None) -> tuple[np.ndarray | None, bool]:
    """(photometric (brightness, contrast) factors, mirror?) of one sample: a pure function of
    (seed, sample id), so a resumed run sees the same batches. The photometric jitter is only
    drawn here and applied on the device by the model: it is free there, while per-pixel float
    work here would cost the worker ~15% of its decode rate. The mirror is applied here, to the
    frames and labels together."""
    if not cfg:
        return None, False
    rng = np.random.default_rng([seed, sample_id])
    b = 1.0 + rng.uniform(-cfg["brightness"], cfg["brightness"])
    c = 1.0 + rng.uniform(-cfg["contrast"], cfg["contrast"])
    return np.asarray([b, c], np.float32), bool(rng.uniform() < cfg["mirror_prob"])


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack samples; video stays uint8 (B, T, C, H, W) and becomes float on the device."""
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}
