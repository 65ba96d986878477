"""The global-cursor sample stream: one integer of state, any world size.

The global order of epoch e is a permutation of sample ids seeded by (seed, e),
independent of the number of processes. Optimizer step k consumes global
positions [k*B, (k+1)*B); rank r of W takes the contiguous slice
[k*B + r*B/W, k*B + (r+1)*B/W), cut into gradient-accumulation micro-batches.
Resuming at step k on any W therefore continues at the exact next sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from exaflop.errors import UserError


class GlobalOrder:
    """Maps a global position to a sample id through per-epoch seeded permutations."""

    def __init__(self, n_samples: int, seed: int, shuffle: bool = True):
        if n_samples <= 0:
            raise UserError("data: the dataset has no samples (is the corpus empty or too short for seq_len?)")
        self.n, self.seed, self.shuffle = n_samples, seed, shuffle
        self._epoch, self._perm = -1, np.arange(n_samples)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm

    def sample_ids(self, start: int, count: int) -> list[int]:
        out = []
        for g in range(start, start + count):
            out.append(int(self._permutation(g // self.n)[g % self.n]))
        return out


@dataclass(frozen=True)
class StreamLayout:
    global_batch: int  # samples per optimizer step, all ranks
    micro_batch: int  # samples per forward/backward on one rank
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        per_rank, rem = divmod(self.global_batch, self.world)
        if rem:
            raise UserError(f"train.global_batch={self.global_batch} is not divisible by the "
                            f"{self.world} data-parallel ranks; pick a multiple of {self.world}")
        if per_rank % self.micro_batch:
            raise UserError(f"train.micro_batch={self.micro_batch} does not divide the per-rank batch "
                            f"{per_rank} (= global_batch {self.global_batch} / {self.world} ranks)")

    @property
    def accum_steps(self) -> int:
        return self.global_batch // self.world // self.micro_batch

    def positions(self, micro_index: int) -> range:
        """Global positions of micro-batch number `micro_index` (counted over all steps) on this rank."""
        step, a = divmod(micro_index, self.accum_steps)
        start = step * self.global_batch + self.rank * (self.global_batch // self.world) + a * self.micro_batch
        return range(start, start + self.micro_batch)


class _MicroBatches(Dataset):
    def __init__(self, source, order: GlobalOrder, layout: StreamLayout, collate: Callable):
        self.source, self.order, self.layout, self.collate = source, order, layout, collate

    def __len__(self) -> int:  # unbounded stream; DataLoader only needs this for len()
        return 1 << 62

    def __getitem__(self, micro_index: int) -> Any:
        pos = self.layout.positions(micro_index)
        ids = self.order.sample_ids(pos.start, len(pos))
        # A source may build the batch itself (drive decodes clips straight into one buffer);
        # it must equal collate([source[i] for i in ids]).
        read_batch = getattr(self.source, "read_batch", None)
        batch = read_batch(ids) if read_batch is not None else self.collate([self.source[i] for i in ids])
        batch["sample_ids"] = torch.tensor(ids, dtype=torch.long)
        return batch


class _FromIndex(Sampler[int]):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        i = self.start
        while True:
            yield i
            i += 1


def make_loader(source, collate: Callable, layout: StreamLayout, seed: int, start_step: int,
                num_workers: int = 0, shuffle: bool = True) -> Iterator[Any]:
    """Micro-batches for this rank from optimizer step `start_step` on, in order, forever."""
    order = GlobalOrder(len(source), seed, shuffle)
    ds = _MicroBatches(source, order, layout, collate)
    loader = DataLoader(ds, batch_size=None, sampler=_FromIndex(start_step * layout.accum_steps),
                        num_workers=num_workers, persistent_workers=False,
                        # Own generator: creating the iterator must not draw from the global
                        # RNG, or a resumed run's dropout masks would drift from the original.
                        generator=torch.Generator().manual_seed(seed),
                        prefetch_factor=4 if num_workers else None)
    return iter(loader)


def eval_batches(source, collate: Callable, micro_batch: int, n_batches: int, rank: int = 0,
                 world: int = 1) -> list[Any]:
    """A fixed, unshuffled slice of a validation source, split across ranks."""
    out = []
    n = len(source)
    for b in range(rank, n_batches, world):
        ids = [(b * micro_batch + j) % n for j in range(micro_batch)]
        batch = collate([source[i] for i in ids])
        batch["sample_ids"] = torch.tensor(ids, dtype=torch.long)
        out.append(batch)
    return out
