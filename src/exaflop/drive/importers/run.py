"""Run an import: discover drives, convert them (a local process pool or Ray tasks across a
cluster), write the manifest — to a local folder or straight to object storage (any fsspec URL).

Every importer module (generic, comma2k19, udacity) provides
`discover(root, opts) -> (items, skipped)` (cheap, in this process) and
`load(item, opts) -> Recording` (decoding, in a worker). Output layout:

    OUT/train/ITEM-000.tar + .idx.json   shards (see shards.py)
    OUT/val/...
    OUT/items/ITEM.json                  per-drive result, written after its shards: resume marker
    OUT/manifest.json                    provenance, counts, checksums, skipped items, stats

Resuming skips every item with a result file; items skipped as bad are retried. The same
input and options give the same shards, checksums and manifest whichever executor ran them.
"""

from __future__ import annotations

import hashlib
import importlib
import multiprocessing as mp
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from exaflop.drive import shards
from exaflop.drive.badinput import BadInput
from exaflop.drive.importers.clips import DASHCAM_VIEW, ImportOptions, Item, make_clips
from exaflop.drive.store import Store
from exaflop.drive.video import encode_clip
from exaflop.engine.faults import slow_item
from exaflop.errors import UserError

FORMAT = "exaflop-drive-clips/1"


def assign_splits(items: list[Item], val_fraction: float, pinned: dict[str, str] | None = None) -> None:
    """Whole groups (drives/episodes) go to val, chosen by a hash of their name: deterministic,
    independent of worker count, and no clip of a val drive ever lands in train.

    `pinned`: group -> split from an earlier import into the same output. Those groups keep
    their split, so adding drives never moves one between train and val (a val set that
    changes under a model makes its scores incomparable). New groups then go to val by their
    own hash alone (sha256 below val_fraction of the range), independent of the others."""
    if pinned:
        for it in items:
            if it.group in pinned:
                it.split = pinned[it.group]
            else:
                h = int(hashlib.sha256(it.group.encode()).hexdigest(), 16) / 16**64
                it.split = "val" if h < val_fraction else "train"
        return
    groups = sorted({it.group for it in items}, key=lambda g: hashlib.sha256(g.encode()).hexdigest())
    n_val = int(round(val_fraction * len(groups))) if len(groups) > 1 else 0
    n_val = min(max(n_val, 1 if val_fraction > 0 and len(groups) > 1 else 0), len(groups) - 1)
    val = set(groups[:n_val])
    for it in items:
        it.split = "val" if it.group in val else "train"


def pinned_splits(store: Store, items: list[Item]) -> dict[str, str]:
    """group -> split of the drives an earlier, finished import listed in this output's
    manifest ({} for a fresh output). From the manifest, not the per-item markers: an
    interrupted first import has no manifest and is assigned afresh, as it would have been."""
    if shards.MANIFEST not in store.list_names():
        return {}
    manifest = store.read_json(shards.MANIFEST, what="dataset manifest")
    split_of = {item: split for split, v in manifest.get("splits", {}).items() for item in v.get("items", [])}
    return {it.group: split_of[it.item_id] for it in items if it.item_id in split_of}


def write_clips(store: Store, split: str, item_id: str, clips, fps: float, waypoints: int, dt: float,
                per_shard: int) -> tuple[list[dict], int, dict]:
    """Encode (start, frames, telemetry, labels) clips into `split/ITEM-NNN.tar` shards of
    `per_shard` clips: (shard records, clip count, the item's normalisation sums — pooled
    over items by `_finish_stats`; the model predicts the residual over constant velocity).
    An error mid-shard drops the local temporary: nothing half-written reaches the store."""
    written, writer, n = [], None, 0
    stats = {"n": 0, "speed": [0.0, 0.0], "steering": [0.0, 0.0]}
    resid = np.zeros((2, waypoints, 2))
    t_k = dt * np.arange(1, waypoints + 1)
    try:
        for start, frames, telemetry, labels in clips:
            if writer is None:
                writer = shards.ShardWriter(f"{split}/{item_id}-{len(written):03d}.tar", store)
            writer.add(f"{item_id}_{start:06d}", encode_clip(frames, fps), telemetry, labels)
            n += 1
            v = telemetry["speed"][-1]
            r = np.asarray(labels["waypoints"]) - np.stack([v * t_k, np.zeros_like(t_k)], -1)
            resid += np.stack([r, r * r])
            steer = telemetry["steering"]
            stats["n"] += 1
            stats["speed"][0] += v
            stats["speed"][1] += v * v
            stats["steering"][0] += sum(steer) / len(steer)
            stats["steering"][1] += sum(s * s for s in steer) / len(steer)
            if len(writer.clips) >= per_shard:
                written.append(writer.close())
                writer = None
        if writer is not None:
            written.append(writer.close())
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    stats["resid"] = resid.tolist()
    return written, n, stats


def convert_item(importer: str, item: Item, opts: ImportOptions, out: str,
                 storage_options: dict | None = None) -> dict:
    """Worker: one drive -> shards + result record, written under `out` (a folder or URL).
    Bad input comes back as {"skipped": reason}. Deterministic: a retried item rewrites the
    same shard names with the same bytes, so a retry never duplicates a clip."""
    slow_item()  # drills only (engine/faults.py)
    mod = importlib.import_module(f"exaflop.drive.importers.{importer}")
    store = Store(out, storage_options)
    try:
        rec = mod.load(item, opts)
        clips = make_clips(item.telemetry_name, rec, opts)
        first = next(clips)  # raises BadInput before any shard is opened
    except BadInput as e:
        return {"item": item.item_id, "skipped": str(e)}
    written, n, stats = write_clips(store, item.split, item.item_id, _chain(first, clips), opts.fps,
                                    opts.waypoints, opts.dt, opts.clips_per_shard)
    source = first[3]["source"]
    result = {"item": item.item_id, "group": item.group, "split": item.split, "clips": n,
              "shards": written, "labels_from": source, "sources": item.paths, "stats": stats,
              "view": (rec.view or opts.extra.get("view") or DASHCAM_VIEW)}
    store.write_json(result, "items", f"{item.item_id}.json")
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
               provenance: dict | None = None, quiet: bool = False,
               storage_options: dict | None = None, ray_address: str | None = None) -> dict:
    """Convert everything under `root` into clip shards under `out` (a folder or an fsspec URL
    such as s3://bucket/prefix); returns the manifest. With `ray_address` the drives are
    converted as Ray tasks across a cluster ("auto": the running one, "local": start one
    here), otherwise by the local process pool. Both write the same bytes."""
    mod = importlib.import_module(f"exaflop.drive.importers.{importer}")
    root = Path(root)
    store = Store(out, storage_options)
    if not root.exists():
        raise UserError(f"{root}: input folder does not exist")
    items, skipped = mod.discover(root, opts)
    if not items and not skipped:
        raise UserError(f"{root}: nothing to import; {mod.EXPECTED}")
    store.check_writable()
    assign_splits(items, opts.val_fraction, pinned_splits(store, items))
    results, total = [], len(items) + len(skipped)
    todo = []
    done = store.list_names("items")  # one listing, not a request per item
    for it in items:
        prev = (store.read_json("items", f"{it.item_id}.json", what="item result")
                if f"{it.item_id}.json" in done else None)
        if prev is not None and prev.get("split") == it.split:
            results.append(prev)
        else:
            todo.append(it)
    t0 = time.time()
    run = {"executor": f"ray ({ray_address})" if ray_address else f"local pool ({opts.workers} workers)",
           "resumed_items": len(results), "retries": []}

    def check_bad() -> None:
        # Items waiting for data (a drive whose telemetry has not arrived) are not bad ones.
        if sum(not s.get("pending") for s in skipped) > opts.max_bad_fraction * total:
            _write_manifest(store, importer, root, opts, results, skipped, provenance, "stopped", run)
            first = "; ".join(s["reason"] for s in skipped[:3])
            raise UserError(f"import stopped: {len(skipped)} of {total} items are bad (more than "
                            f"--max-bad-fraction {opts.max_bad_fraction:g}); first: {first} "
                            f"(all listed in {store.url(shards.MANIFEST)})")

    check_bad()
    name = store.root.rstrip("/").rsplit("/", 1)[-1]
    with _progress(quiet) as progress:
        task = progress.add_task(f"{importer} -> {name}", total=len(items), completed=len(results))
        if ray_address:
            results_iter = _map_ray(importer, todo, opts, store, ray_address, run["retries"])
        else:
            results_iter = _map(importer, todo, opts, store)
        for res in results_iter:
            if "skipped" in res:
                skipped.append({"item": res["item"], "reason": res["skipped"]})
                check_bad()
            else:
                results.append(res)
            progress.update(task, advance=1)
    run["seconds"] = round(time.time() - t0, 2)
    return _write_manifest(store, importer, root, opts, results, skipped, provenance, "complete", run)


def _map(importer: str, todo: list[Item], opts: ImportOptions, store: Store):
    """Results as they finish. workers=0 runs inline (tests, debugging)."""
    if opts.workers == 0 or len(todo) <= 1:
        for it in todo:
            yield convert_item(importer, it, opts, store.location, store.options)
        return
    # spawn, not fork: the parent may hold torch / rich threads that do not survive a fork.
    with ProcessPoolExecutor(opts.workers, mp_context=mp.get_context("spawn")) as pool:
        pending: set[Future] = {pool.submit(convert_item, importer, it, opts, store.location, store.options)
                                for it in todo}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()
        finally:
            for f in pending:
                f.cancel()


RAY_ATTEMPTS = 4  # per drive: a lost node or worker costs one attempt


def _map_ray(importer: str, todo: list[Item], opts: ImportOptions, store: Store, address: str,
             retries: list[dict]):
    """Results as they finish, one Ray task per drive, spread over the cluster's nodes.

    Tasks are retried here rather than by Ray's own max_retries so every retry is counted
    and reported (item, attempt, reason): a task on a node that dies raises NodeDiedError
    and is resubmitted to the nodes left. Conversion is deterministic and writes whole
    objects, so a retry rewrites the same shard names with the same bytes — nothing is
    duplicated. Errors of the input or the storage (UserError) are not retried."""
    ray = _ray(address, store)
    convert = ray.remote(num_cpus=1, max_retries=0, scheduling_strategy="SPREAD")(convert_item)
    window = max(4, 2 * int(ray.cluster_resources().get("CPU", 1)))  # bounded in flight
    queue = [(it, 1) for it in reversed(todo)]
    running: dict[Any, tuple[Item, int]] = {}
    try:
        while queue or running:
            while queue and len(running) < window:
                it, attempt = queue.pop()
                running[convert.remote(importer, it, opts, store.location, store.options)] = (it, attempt)
            ready, _ = ray.wait(list(running), num_returns=1)
            it, attempt = running.pop(ready[0])
            try:
                yield ray.get(ready[0])
            except ray.exceptions.RayError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, UserError):
                    raise cause from None
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                if attempt >= RAY_ATTEMPTS:
                    raise UserError(f"{it.item_id}: failed {attempt} times on the Ray cluster; last: {reason}") from None
                retries.append({"item": it.item_id, "attempt": attempt, "reason": reason})
                queue.append((it, attempt + 1))
    finally:
        for ref in running:
            ray.cancel(ref, force=True)


def _ray(address: str, store: Store):
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'exaflop[ray]'") from None
    if not ray.is_initialized():
        # Workers get this process's AWS settings, so credentials given the usual way reach
        # every node's tasks (a real cluster may instead give its nodes an instance role).
        env = {k: v for k, v in os.environ.items() if k.startswith("AWS_") or k == "EXAFLOP_IMPORT_FAULT"}
        try:
            ray.init(address=None if address == "local" else address, runtime_env={"env_vars": env},
                     include_dashboard=False, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"--ray {address}: cannot connect to a Ray cluster ({str(e).splitlines()[0]}); "
                            "start one (ray start --head) and pass its address, or use --ray local") from None
    if not store.local or store.location.startswith("file://"):
        return ray
    # A local output folder is only shared by the nodes of this machine: refuse a cluster
    # with other hosts rather than scatter the shards over their disks.
    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    if len(hosts) > 1:
        raise UserError(f"--out {store.location}: a local folder, but the Ray cluster spans {len(hosts)} "
                        "hosts; write to object storage (--out s3://BUCKET/PREFIX) or a shared filesystem path "
                        "given as file://")
    return ray


def _progress(quiet: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), disable=quiet, transient=False)


def _write_manifest(store: Store, importer: str, root: Path, opts: ImportOptions, results: list[dict],
                    skipped: list[dict], provenance: dict | None, status: str, run: dict) -> dict:
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
    # How many workers ran is not a property of the data: the same input and options give
    # the same manifest whatever executed them.
    options["extra"] = {k: v for k, v in opts.extra.items() if k != "view"}
    if "explicit" in options["extra"]:
        options["extra"]["explicit"] = [f for f in options["extra"]["explicit"] if f != "workers"]
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
        "run": run,  # how this import ran (executor, retries, time): not part of the data
    }
    store.write_json(manifest, shards.MANIFEST)
    return manifest
