"""Shard -> index -> random read round-trip, fsspec URLs, and exact loader resume."""

import json
import pickle
import tarfile

import fsspec
import numpy as np
import pytest
import torch

from exaflop.data.stream import StreamLayout, make_loader
from exaflop.drive import shards
from exaflop.drive.importers.run import run_import
from exaflop.drive.source import ClipSource, collate
from exaflop.drive.video import decode_clip, encode_clip

from . import synth


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from exaflop.drive.importers.clips import ImportOptions

    root = tmp_path_factory.mktemp("ds")
    for i in range(4):
        synth.write_generic(root / "raw", f"drive{i}", seed=i, seconds=7.0)
    opts = ImportOptions(frames=4, fps=10.0, width=32, height=32, stride=2, waypoints=4, dt=0.5,
                         workers=0, val_fraction=0.25, clips_per_shard=7)
    run_import("generic", root / "raw", root / "out", opts, quiet=True)
    return root / "out"


def test_shard_index_random_read_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    clips = []
    writer = shards.ShardWriter(tmp_path / "s-000.tar")
    for i in range(12):
        frames = synth.frames(4, 32, 32, seed=i)
        tel, lab = {"speed": [float(i)] * 4}, {"waypoints": rng.normal(size=(3, 2)).round(3).tolist()}
        writer.add(f"clip_{i:03d}", encode_clip(frames, 10.0), tel, lab)
        clips.append((frames, tel, lab))
    info = writer.close()
    assert info["clips"] == 12 and not (tmp_path / "s-000.tar.tmp").exists()
    index = json.loads((tmp_path / shards.index_name("s-000.tar")).read_text())
    # A plain tar, members grouped by key the WebDataset way.
    with tarfile.open(tmp_path / "s-000.tar") as tf:
        names = tf.getnames()
    assert names[:3] == ["clip_000.mp4", "clip_000.telemetry.json", "clip_000.labels.json"]
    with open(tmp_path / "s-000.tar", "rb") as f:
        for i in rng.permutation(12):
            mp4, tel, lab = shards.read_clip(f, index["clips"][i])
            frames = decode_clip(mp4)
            assert (tel, lab) == clips[i][1:]
            # Lossy (4:2:0 chroma), but unmistakably this clip and no other.
            diffs = [np.abs(frames.astype(int) - c[0]).mean() for c in clips]
            assert int(np.argmin(diffs)) == i and diffs[i] < 6


def test_source_reads_through_fsspec_urls_and_pickles(dataset):
    local = ClipSource(str(dataset), "train")
    mem = fsspec.filesystem("memory")
    for path in dataset.rglob("*"):
        if path.is_file() and path.suffix in (".tar", ".json"):
            mem.pipe(f"/ds/{path.relative_to(dataset)}", path.read_bytes())
    remote = ClipSource("memory://ds", "train")
    assert len(remote) == len(local) > 7  # several shards (clips_per_shard=7)
    for i in (0, len(local) // 2, len(local) - 1):
        a, b = local[i], remote[i]
        assert all(np.array_equal(a[k], b[k]) for k in a)
    local[0]  # opens a file handle ...
    clone = pickle.loads(pickle.dumps(local))  # ... which does not travel to workers
    assert clone._files == {} and np.array_equal(clone[3]["video"], local[3]["video"])


def test_val_split_holds_whole_drives(dataset):
    train, val = ClipSource(str(dataset), "train"), ClipSource(str(dataset), "val")
    drives = lambda src: {k.rsplit("_", 1)[0] for k in src.keys}  # noqa: E731
    assert len(drives(val)) == 1 and drives(train).isdisjoint(drives(val))


def test_collate_keeps_uint8_video_btchw(dataset):
    src = ClipSource(str(dataset), "train")
    batch = collate([src[i] for i in range(3)])
    assert batch["video"].dtype == torch.uint8 and batch["video"].shape == (3, 4, 3, 32, 32)
    assert batch["waypoints"].shape == (3, 4, 2) and batch["vehicle"].shape == (3, 3)


def test_augmentation_mirrors_labels_and_is_a_function_of_the_sample_id(dataset):
    plain = ClipSource(str(dataset), "train")
    aug = ClipSource(str(dataset), "train", augment={"brightness": 0.2, "contrast": 0.2, "mirror_prob": 1.0})
    a, p = aug[5], plain[5]
    assert np.allclose(a["waypoints"][:, 1], -p["waypoints"][:, 1]) and np.allclose(a["steering"], -p["steering"])
    assert np.array_equal(a["video"], p["video"][..., ::-1])  # dashcam view: mirror the width axis
    assert a["photometric"].shape == (2,) and not np.allclose(a["photometric"], 1.0)
    assert all(np.array_equal(a[k], aug[5][k]) for k in a)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resume_is_exact(dataset, workers):
    src = ClipSource(str(dataset), "train", augment={"brightness": 0.2, "contrast": 0.2, "mirror_prob": 0.5})
    layout = StreamLayout(global_batch=8, micro_batch=4)
    steps = 2 * len(src) // 8 + 2  # past an epoch boundary

    def take(start, n):
        it = make_loader(src, collate, layout, seed=7, start_step=start, num_workers=workers)
        return [next(it) for _ in range(n * layout.accum_steps)]

    full = take(0, steps)
    resumed = take(steps - 3, 3)
    for a, b in zip(full[-6:], resumed, strict=True):
        assert torch.equal(a["sample_ids"], b["sample_ids"])
        assert all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.cat([b["sample_ids"] for b in full[: 2 * (len(src) // 8)]])
    assert len(set(ids.tolist())) == min(len(ids), len(src))  # an epoch visits distinct clips


def test_read_batch_equals_collate_of_samples(dataset):
    src = ClipSource(str(dataset), "train", augment={"brightness": 0.2, "contrast": 0.2, "mirror_prob": 0.5})
    ids = list(range(len(src)))
    want = collate([src[i] for i in ids])
    assert not torch.equal(want["video"], collate([ClipSource(str(dataset), "train")[i] for i in ids])["video"])
    out = {"video": torch.full(src.batch_spec(len(ids))["video"][0], 7, dtype=torch.uint8)}
    for got in (src.read_batch(ids), src.read_batch(ids, out)):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_pooled_worker_batches_are_the_samples_and_survive_slot_reuse(dataset):
    """With workers, video travels through reused shared-memory slots; every batch the
    consumer keeps must stay intact after its slot has been refilled many times."""
    src = ClipSource(str(dataset), "train", augment={"brightness": 0.2, "contrast": 0.2, "mirror_prob": 0.5})
    it = make_loader(src, collate, StreamLayout(global_batch=4, micro_batch=4), seed=3, start_step=0, num_workers=2)
    kept = [next(it) for _ in range(40)]  # 20 per worker: each worker's 6 slots reused 3+ times
    for b in kept:
        want = collate([src[i] for i in b["sample_ids"].tolist()])
        assert all(torch.equal(b[k], want[k]) for k in want)
    from exaflop.data.stream import PREFETCH

    assert it.pooled == 40  # no worker ever found its slots all taken
    assert int(it._pool.busy.sum()) <= 2 * PREFETCH  # only batches still in flight hold a slot


def test_batch_pool_slots_are_per_worker_and_run_out_cleanly():
    from exaflop.data.stream import BatchPool

    pool = BatchPool({"x": ((2, 3), torch.uint8)}, workers=2, slots=2)
    assert [pool.acquire(1), pool.acquire(1), pool.acquire(1)] == [2, 3, None]  # None: caller allocates
    assert pool.acquire(0) == 0
    pool.views(2)["x"].fill_(5)
    got = pool.take(2)
    pool.views(2)["x"].fill_(9)  # the slot is free again and refilled; the taken batch is a copy
    assert torch.equal(got["x"], torch.full((2, 3), 5, dtype=torch.uint8)) and pool.acquire(1) == 2


def test_shard_checksums_in_manifest_match(dataset):
    m = json.loads((dataset / "manifest.json").read_text())
    import hashlib

    for split in ("train", "val"):
        for s in m["splits"][split]["shards"]:
            data = (dataset / s["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]


def test_rgb_to_yuv420_inverts_the_decoders_conversion():
    """The encoder's own BT.601 conversion (exact integers, no swscale) and the loader's
    inverse agree: flat 2x2 blocks come back within rounding."""
    from exaflop.drive.video import rgb_to_yuv420, yuv420_to_rgb

    rng = np.random.default_rng(0)
    blocks = rng.integers(16, 236, size=(8, 8, 3), dtype=np.uint8)
    rgb = blocks.repeat(2, 0).repeat(2, 1)  # chroma is shared per 2x2 block: make it exact there
    yuv = rgb_to_yuv420(rgb)
    assert yuv.shape == (24, 16) and yuv.dtype == np.uint8
    assert np.abs(yuv420_to_rgb(yuv).astype(int) - rgb).max() <= 3
    assert np.array_equal(rgb_to_yuv420(np.ascontiguousarray(rgb[::-1][::-1])), yuv)
