"""The global-cursor sample stream: one integer of state, any world size.

The global order of epoch e is a permutation of sample ids seeded by (seed, e),
independent of the number of processes. Optimizer step k consumes global
positions [k*B, (k+1)*B); rank r of W takes the contiguous slice
[k*B + r*B/W, k*B + (r+1)*B/W), cut into gradient-accumulation micro-batches.
Resuming at step k on any W therefore continues at the exact next sample.
"""

from __future__ import annotations

import gc
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
    def __init__(self, source, order: GlobalOrder, layout: StreamLayout, collate: Callable,
                 pool: BatchPool | None = None):
        self.source, self.order, self.layout, self.collate, self.pool = source, order, layout, collate, pool

    def __len__(self) -> int:  # unbounded stream; DataLoader only needs this for len()
        return 1 << 62

    def __getitem__(self, micro_index: int) -> Any:
        pos = self.layout.positions(micro_index)
        ids = self.order.sample_ids(pos.start, len(pos))
        # A source may build the batch itself (drive decodes clips straight into one buffer);
        # it must equal collate([source[i] for i in ids]).
        read_batch = getattr(self.source, "read_batch", None)
        if read_batch is None:
            batch = self.collate([self.source[i] for i in ids])
        else:
            worker = torch.utils.data.get_worker_info()
            slot = self.pool.acquire(worker.id) if self.pool is not None and worker is not None else None
            if slot is not None:
                batch = read_batch(ids, out=self.pool.views(slot))
                # The slot's fields stay in shared memory; the rest (small) travel by value.
                small = {k: v.numpy() for k, v in batch.items() if k not in self.pool.buffers}
                return {**small, "sample_ids": np.asarray(ids, dtype=np.int64), "_pool_slot": slot}
            batch = read_batch(ids)
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


PREFETCH = 4  # batches in flight per DataLoader worker


def make_loader(source, collate: Callable, layout: StreamLayout, seed: int, start_step: int,
                num_workers: int = 0, shuffle: bool = True) -> Iterator[Any]:
    """Micro-batches for this rank from optimizer step `start_step` on, in order, forever."""
    order = GlobalOrder(len(source), seed, shuffle)
    spec = source.batch_spec(layout.micro_batch) if num_workers and hasattr(source, "batch_spec") else None
    pool = BatchPool(spec, num_workers, PREFETCH + 2) if spec else None
    ds = _MicroBatches(source, order, layout, collate, pool)
    loader = DataLoader(ds, batch_size=None, sampler=_FromIndex(start_step * layout.accum_steps),
                        num_workers=num_workers, persistent_workers=False,
                        # Own generator: creating the iterator must not draw from the global
                        # RNG, or a resumed run's dropout masks would drift from the original.
                        generator=torch.Generator().manual_seed(seed),
                        # Batches are built by _MicroBatches; no conversion (the default would
                        # turn the pooled path's by-value numpy fields into shared-memory tensors).
                        collate_fn=_as_is, worker_init_fn=_worker_init,
                        prefetch_factor=PREFETCH if num_workers else None)
    return _Batches(iter(loader), pool)


def _as_is(batch: Any) -> Any:
    return batch


def _worker_init(worker_id: int) -> None:
    # Everything the worker inherited from the trainer (modules, model, tensors' Python
    # objects) goes to the GC's permanent generation: collections in the worker then walk
    # only what the worker itself allocates, instead of every inherited object (which also
    # copies each page they live on: copy-on-write after fork).
    gc.freeze()


class BatchPool:
    """Reused batch buffers in shared memory for sources that build batches in place.

    Without it every batch a DataLoader worker returns is fresh shared memory: one shm
    segment per tensor, created, page-faulted and handed over by file descriptor, each
    batch (measured on the drive loader: with the pool, decoding went from 71% to 79% of a
    worker's CPU time, the rest being everything else). Here each worker
    owns `slots` buffers (allocated once, before the workers start), fills a free one, and
    returns only its number plus the small fields by value; the main process copies the
    batch out and frees the slot at once. A worker has at most PREFETCH batches in flight,
    so with PREFETCH + 2 slots it always finds one free; if not, it falls back to a fresh
    batch rather than wait.
    """

    def __init__(self, spec: dict[str, tuple[tuple[int, ...], torch.dtype]], workers: int, slots: int):
        self.slots = slots
        self.buffers = {k: torch.empty((workers * slots, *shape), dtype=dtype).share_memory_()
                        for k, (shape, dtype) in spec.items()}
        self.busy = torch.zeros(workers * slots, dtype=torch.int32).share_memory_()

    def acquire(self, worker: int) -> int | None:
        """A free slot of this worker, now marked busy (worker side)."""
        busy = self.busy.numpy()  # element access through numpy: ~50x cheaper than a tensor's
        for slot in range(worker * self.slots, (worker + 1) * self.slots):
            if not busy[slot]:
                busy[slot] = 1
                return slot
        return None

    def views(self, slot: int) -> dict[str, torch.Tensor]:
        return {k: b[slot] for k, b in self.buffers.items()}

    def take(self, slot: int) -> dict[str, torch.Tensor]:
        """The slot's batch as tensors of its own, then the slot is free (main process)."""
        # numpy's copy: one thread. torch's clone would spread a memcpy over the intra-op
        # threads, i.e. onto the cores the workers are decoding on.
        out = {k: torch.from_numpy(b[slot].numpy().copy()) for k, b in self.buffers.items()}
        self.busy.numpy()[slot] = 0
        return out


class _Batches:
    """The DataLoader's iterator, with pooled batches copied out of their slots."""

    def __init__(self, it, pool: BatchPool | None):
        self._it, self._pool = it, pool
        self.pooled = 0  # batches that came through the pool (the rest: fresh shared memory)

    def __iter__(self) -> _Batches:
        return self

    def __next__(self) -> Any:
        batch = next(self._it)
        if isinstance(batch, dict) and "_pool_slot" in batch:
            slot = batch.pop("_pool_slot")
            self.pooled += 1
            batch = {**{k: torch.from_numpy(v) for k, v in batch.items()}, **self._pool.take(slot)}
        return batch

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in getattr(self._it, "_workers", [])]


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
