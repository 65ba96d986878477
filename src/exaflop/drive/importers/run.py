"""Run an import: discover drives, convert them in a process pool, write the manifest.

Every importer module (generic, comma2k19, udacity) provides
`discover(root, opts) -> (items, skipped)` (cheap, in this process) and
`load(item, opts) -> Recording` (decoding, in a worker). Output layout:

    OUT/train/ITEM-000.tar + .idx.json   shards (see shards.py)
    OUT/val/...
    OUT/items/ITEM.json                  per-drive result, written after its shards: resume marker
    OUT/manifest.json                    provenance, counts, checksums, skipped items, stats

Resuming skips every item with a result file; items skipped as bad are retried.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import multiprocessing as mp
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

import numpy as np

from exaflop.drive import shards
from exaflop.drive.badinput import BadInput
from exaflop.drive.importers.clips import DASHCAM_VIEW, ImportOptions, Item, make_clips
from exaflop.drive.video import encode_clip
from exaflop.errors import UserError

FORMAT = "exaflop-drive-clips/1"


def assign_splits(items: list[Item], val_fraction: float) -> None:
    """Whole groups (drives/episodes) go to val, chosen by a hash of their name: deterministic,
    independent of worker count, and no clip of a val drive ever lands in train."""
    groups = sorted({it.group for it in items}, key=lambda g: hashlib.sha256(g.encode()).hexdigest())
    n_val = int(round(val_fraction * len(groups))) if len(groups) > 1 else 0
    n_val = min(max(n_val, 1 if val_fraction > 0 and len(groups) > 1 else 0), len(groups) - 1)
    val = set(groups[:n_val])
    for it in items:
        it.split = "val" if it.group in val else "train"


def _stats_init(k: int) -> dict:
    return {"n": 0, "speed": [0.0, 0.0], "steering": [0.0, 0.0], "resid": np.zeros((2, k, 2)).tolist()}


def convert_item(importer: str, item: Item, opts: ImportOptions, out: str) -> dict:
    """Worker: one drive -> shards + result record. Bad input comes back as {"skipped": reason}."""
    mod = importlib.import_module(f"exaflop.drive.importers.{importer}")
    out_dir = Path(out)
    try:
        rec = mod.load(item, opts)
        clips = make_clips(item.telemetry_name, rec, opts)
        first = next(clips)  # raises BadInput before any shard is opened
    except BadInput as e:
        return {"item": item.item_id, "skipped": str(e)}
    split_dir = out_dir / item.split
    split_dir.mkdir(parents=True, exist_ok=True)
    written, writer, n, source = [], None, 0, first[3]["source"]
    stats = _stats_init(opts.waypoints)
    resid = np.zeros((2, opts.waypoints, 2))
    t_k = opts.dt * np.arange(1, opts.waypoints + 1)
    for start, frames, telemetry, labels in _chain(first, clips):
        if writer is None:
            writer = shards.ShardWriter(split_dir / f"{item.item_id}-{len(written):03d}.tar")
        writer.add(f"{item.item_id}_{start:06d}", encode_clip(frames, opts.fps), telemetry, labels)
        n += 1
        # Normalisation statistics: the model predicts the residual over constant velocity.
        v = telemetry["speed"][-1]
        r = np.asarray(labels["waypoints"]) - np.stack([v * t_k, np.zeros_like(t_k)], -1)
        resid += np.stack([r, r * r])
        stats["n"] += 1
        stats["speed"][0] += v
        stats["speed"][1] += v * v
        stats["steering"][0] += sum(telemetry["steering"]) / len(telemetry["steering"])
        stats["steering"][1] += sum(s * s for s in telemetry["steering"]) / len(telemetry["steering"])
        if len(writer.clips) >= opts.clips_per_shard:
            written.append(writer.close())
            writer = None
    if writer is not None:
        written.append(writer.close())
    stats["resid"] = resid.tolist()
    result = {"item": item.item_id, "group": item.group, "split": item.split, "clips": n,
              "shards": written, "labels_from": source, "sources": item.paths, "stats": stats,
              "view": (rec.view or opts.extra.get("view") or DASHCAM_VIEW)}
    (out_dir / "items").mkdir(exist_ok=True)
    shards.write_json(out_dir / "items" / f"{item.item_id}.json", result)
    return result


def _chain(first, rest):
    yield first
    yield from rest


def _finish_stats(results: list[dict], k: int) -> dict:
    """Pool per-item sums into mean/std used to normalise model inputs and targets."""
    n = sum(r["stats"]["n"] for r in results)
    if n == 0:
        return {}
    sp = np.sum([r["stats"]["speed"] for r in results], axis=0) / n
    st = np.sum([r["stats"]["steering"] for r in results], axis=0) / n
    rs = np.sum([r["stats"]["resid"] for r in results], axis=0) / n
    std = lambda m: float(np.sqrt(max(m[1] - m[0] ** 2, 1e-6)))  # noqa: E731
    resid_std = np.sqrt(np.maximum(rs[1] - rs[0] ** 2, 1e-4))
    return {"clips": n, "speed_mean": float(sp[0]), "speed_std": std(sp),
            "steering_std": std(st), "steering_rms": float(np.sqrt(st[1])),
            "residual_std": np.round(resid_std, 4).tolist()}


def run_import(importer: str, root: str | Path, out: str | Path, opts: ImportOptions,
               provenance: dict | None = None, quiet: bool = False) -> dict:
    """Convert everything under `root` into clip shards under `out`; returns the manifest."""
    mod = importlib.import_module(f"exaflop.drive.importers.{importer}")
    root, out = Path(root), Path(out)
    if not root.exists():
        raise UserError(f"{root}: input folder does not exist")
    items, skipped = mod.discover(root, opts)
    if not items and not skipped:
        raise UserError(f"{root}: nothing to import; {mod.EXPECTED}")
    assign_splits(items, opts.val_fraction)
    out.mkdir(parents=True, exist_ok=True)
    results, total = [], len(items) + len(skipped)
    todo = []
    for it in items:
        done = out / "items" / f"{it.item_id}.json"
        if done.exists() and json.loads(done.read_text()).get("split") == it.split:
            results.append(json.loads(done.read_text()))
        else:
            todo.append(it)
    t0 = time.time()

    def check_bad() -> None:
        if len(skipped) > opts.max_bad_fraction * total:
            _write_manifest(out, importer, root, opts, results, skipped, provenance, "stopped")
            first = "; ".join(s["reason"] for s in skipped[:3])
            raise UserError(f"import stopped: {len(skipped)} of {total} items are bad (more than "
                            f"--max-bad-fraction {opts.max_bad_fraction:g}); first: {first} "
                            f"(all listed in {out / shards.MANIFEST})")

    check_bad()
    with _progress(quiet) as progress:
        task = progress.add_task(f"{importer} -> {out.name}", total=len(items), completed=len(results))
        for res in _map(importer, todo, opts, out):
            if "skipped" in res:
                skipped.append({"item": res["item"], "reason": res["skipped"]})
                check_bad()
            else:
                results.append(res)
            progress.update(task, advance=1)
    manifest = _write_manifest(out, importer, root, opts, results, skipped, provenance, "complete")
    manifest["seconds"] = round(time.time() - t0, 2)
    return manifest


def _map(importer: str, todo: list[Item], opts: ImportOptions, out: Path):
    """Results as they finish. workers=0 runs inline (tests, debugging)."""
    if opts.workers == 0 or len(todo) <= 1:
        for it in todo:
            yield convert_item(importer, it, opts, str(out))
        return
    # spawn, not fork: the parent may hold torch / rich threads that do not survive a fork.
    with ProcessPoolExecutor(opts.workers, mp_context=mp.get_context("spawn")) as pool:
        pending: set[Future] = {pool.submit(convert_item, importer, it, opts, str(out)) for it in todo}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()
        finally:
            for f in pending:
                f.cancel()


def _progress(quiet: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), disable=quiet, transient=False)


def _write_manifest(out: Path, importer: str, root: Path, opts: ImportOptions, results: list[dict],
                    skipped: list[dict], provenance: dict | None, status: str) -> dict:
    results = sorted(results, key=lambda r: r["item"])
    splits = {}
    for split in ("train", "val"):
        rs = [r for r in results if r["split"] == split]
        splits[split] = {"items": [r["item"] for r in rs], "clips": sum(r["clips"] for r in rs),
                         "shards": [{**s, "file": f"{split}/{s['file']}", "index": f"{split}/{s['index']}"}
                                    for r in rs for s in r["shards"]]}
    label_sources: dict[str, int] = {}
    for r in results:
        label_sources[r["labels_from"]] = label_sources.get(r["labels_from"], 0) + 1
    options = {k: v for k, v in asdict(opts).items() if k not in ("extra", "workers")}
    options["extra"] = {k: v for k, v in opts.extra.items() if k != "view"}
    manifest = {
        "format": FORMAT, "status": status, "importer": importer, "source": str(root),
        "provenance": provenance or {}, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "clip": opts.clip_spec(), "options": options,
        "vehicle": {"wheelbase": opts.wheelbase, "steer_ratio": opts.steer_ratio},
        "view": results[0]["view"] if results else DASHCAM_VIEW,
        "labels_from": label_sources,
        "labels_note": ("future waypoints in the ego frame of each clip's last frame (x forward, y left, m); "
                        "items labelled by 'bicycle model (speed + steering)' had no poses, their "
                        "trajectories are integrated from speed and steering"),
        "counts": {"items_found": len(results) + len(skipped), "items_ok": len(results),
                   "items_skipped": len(skipped), "clips": sum(r["clips"] for r in results),
                   **{f"clips_{s}": splits[s]["clips"] for s in splits}},
        "splits": splits, "skipped": skipped,
        "stats": _finish_stats([r for r in results if r["split"] == "train"] or results, opts.waypoints),
    }
    shards.write_json(out / shards.MANIFEST, manifest)
    return manifest
