"""The global-cursor stream (data/stream.py) against values worked out by hand: which global
sample ids each rank's micro-batches hold, at any step, with and without loader workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exaflop.data.stream import BatchPool, GlobalOrder, StreamLayout, eval_batches, make_loader
from exaflop.errors import UserError


class Numbers:
    """Sample i is the number i (a tensor), so a batch shows which ids it holds."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i)])


class InPlaceNumbers(Numbers):
    """A source that builds batches itself into given buffers (as the drive loader does)."""

    def batch_spec(self, micro_batch: int) -> dict:
        return {"x": ((micro_batch, 1), torch.float32)}

    def read_batch(self, ids: list[int], out: dict | None = None) -> dict:
        x = torch.tensor([[float(i)] for i in ids])
        if out is None:
            return {"x": x, "n": torch.tensor(len(ids))}
        out["x"].copy_(x)
        return {"x": out["x"], "n": torch.tensor(len(ids))}


class BatchNumbers(Numbers):
    """Builds its batches itself but offers no buffers to build them in (no batch_spec)."""

    def read_batch(self, ids: list[int]) -> dict:
        return {"x": torch.tensor([[float(i)] for i in ids])}


def collate(samples: list[torch.Tensor]) -> dict:
    return {"x": torch.stack(samples)}


def perm(seed: int, epoch: int, n: int) -> list[int]:
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def test_global_order_is_one_seeded_permutation_per_epoch():
    order = GlobalOrder(5, seed=7)
    # Positions 3..11 cross from epoch 0 into 1 and 2: each epoch its own (seed, epoch) permutation.
    want = perm(7, 0, 5)[3:] + perm(7, 1, 5) + perm(7, 2, 5)[:2]
    assert order.sample_ids(3, 9) == want
    assert perm(7, 0, 5) != perm(7, 1, 5)
    # Asked again, or by a fresh object, out of order: the same ids (no hidden state).
    assert GlobalOrder(5, seed=7).sample_ids(8, 4) == want[5:9]
    assert order.sample_ids(0, 2) == perm(7, 0, 5)[:2]
    assert GlobalOrder(5, seed=7, shuffle=False).sample_ids(3, 4) == [3, 4, 0, 1]


@pytest.mark.parametrize("n", [0, -1])
def test_an_empty_dataset_is_a_one_line_error(n):
    with pytest.raises(UserError, match=r"^data: the dataset has no samples \(is the corpus empty"):
        GlobalOrder(n, seed=0)
    assert GlobalOrder(1, seed=0).sample_ids(0, 3) == [0, 0, 0]


def test_layout_positions_by_hand():
    # Global batch 12 over 3 ranks: 4 per rank, in micro-batches of 2 (2 accumulation steps).
    lay = StreamLayout(12, 2, rank=1, world=3)
    assert lay.accum_steps == 2
    # Step 0: rank 1 owns positions 4..7; step 1: 16..19.
    assert [lay.positions(i) for i in range(4)] == [range(4, 6), range(6, 8), range(16, 18), range(18, 20)]
    assert StreamLayout(12, 2, rank=2, world=3).positions(3) == range(22, 24)


def test_layouts_that_do_not_divide_are_refused_naming_the_fields():
    with pytest.raises(UserError, match=r"^train.global_batch=10 is not divisible by the 3 data-parallel ranks; "
                                        r"pick a multiple of 3$"):
        StreamLayout(10, 1, world=3)
    with pytest.raises(UserError, match=r"^train.micro_batch=3 does not divide the per-rank batch 4 "
                                        r"\(= global_batch 8 / 2 ranks\)$"):
        StreamLayout(8, 3, world=2)


@pytest.mark.parametrize("source", [Numbers(10), BatchNumbers(10), InPlaceNumbers(10)],
                         ids=["collate", "read-batch", "in-place"])
@pytest.mark.parametrize("workers", [0, 2])
def test_loader_yields_this_ranks_slice_from_any_step(source, workers):
    # World 2, global batch 4, micro 1: rank 1 takes positions 4k+2, 4k+3. From step 3 on:
    # positions 14, 15 (epoch 1: 14 - 10 = 4, 5), 18, 19, 22, 23 (epoch 2).
    lay = StreamLayout(4, 1, rank=1, world=2)
    it = make_loader(source, collate, lay, seed=3, start_step=3, num_workers=workers)
    got = [next(it) for _ in range(6)]
    e1, e2 = perm(3, 1, 10), perm(3, 2, 10)
    want = [e1[4], e1[5], e1[8], e1[9], e2[2], e2[3]]
    assert [int(b["sample_ids"][0]) for b in got] == want
    assert [float(b["x"].flatten()[0]) for b in got] == want  # the data is those samples
    if workers and isinstance(source, InPlaceNumbers):
        assert it.pooled == 6  # through the shared-memory slots, not fresh segments
        assert [int(b["n"]) for b in got] == [1] * 6  # the small fields travel too
    else:
        assert it.pooled == 0


def test_loader_unshuffled_and_the_default_shuffles():
    lay = StreamLayout(2, 2)
    plain = make_loader(Numbers(6), collate, lay, seed=0, start_step=1, shuffle=False)
    assert next(plain)["sample_ids"].tolist() == [2, 3]
    shuffled = make_loader(Numbers(6), collate, lay, seed=0, start_step=1)
    assert next(shuffled)["sample_ids"].tolist() == perm(0, 0, 6)[2:4]


def test_making_a_loader_draws_nothing_from_the_global_rng():
    torch.manual_seed(0)
    want = torch.rand(1)
    torch.manual_seed(0)
    next(make_loader(Numbers(6), collate, StreamLayout(2, 1), seed=0, start_step=0, num_workers=2))
    assert torch.equal(torch.rand(1), want)  # a resumed run's dropout masks do not drift


def test_eval_batches_are_a_fixed_slice_split_over_ranks():
    # 5 batches of 3 from 7 samples, wrapping around; rank 1 of 2 takes batches 1 and 3.
    got = eval_batches(Numbers(7), collate, 3, 5, rank=1, world=2)
    assert [b["sample_ids"].tolist() for b in got] == [[3, 4, 5], [2, 3, 4]]
    assert got[0]["sample_ids"].dtype == torch.long
    assert [b["x"].flatten().tolist() for b in got] == [[3.0, 4.0, 5.0], [2.0, 3.0, 4.0]]
    alone = eval_batches(Numbers(7), collate, 3, 2)
    assert [b["sample_ids"].tolist() for b in alone] == [[0, 1, 2], [3, 4, 5]]


def test_batch_pool_slots_are_taken_and_given_back():
    pool = BatchPool({"x": ((2, 1), torch.float32)}, workers=2, slots=2)
    assert pool.busy.dtype == torch.int32
    assert [pool.acquire(1), pool.acquire(1), pool.acquire(1)] == [2, 3, None]  # worker 1 owns 2, 3
    pool.views(3)["x"].fill_(5.0)
    out = pool.take(3)
    assert out["x"].tolist() == [[5.0], [5.0]]
    pool.views(3)["x"].fill_(0.0)  # the copy is the batch's own
    assert out["x"].tolist() == [[5.0], [5.0]]
    assert pool.acquire(1) == 3 and pool.busy.tolist() == [0, 0, 1, 1]
