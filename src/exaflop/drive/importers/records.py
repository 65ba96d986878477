"""Records importer: what a serving fleet saw, labelled by the telemetry that arrives later.

    RECORDS/                               written by `exaflop serve --drive-record-dir RECORDS`
      drive-records-*.jsonl(.open)         one line per /v1/drive/predict request with drive_id + t
    TELEMETRY/                             (default RECORDS/telemetry; --telemetry DIR)
      DRIVE_ID.csv  or .json               the drive's telemetry, generic columns (t, steering,
                                           speed, optionally x/y/yaw), on the clock of the requests' t

Each drive_id with telemetry becomes one item: the frames the server was sent, placed on the
drive's clock (a request's last frame at its t, the others 1/fps apart, the newest copy of a
frame wins where requests overlap), then the same clip cutting and labelling as every other
importer — future waypoints from the telemetry's poses. A drive whose telemetry has not
arrived yet is skipped with that reason and picked up by the next run (skipped items are
retried on resume).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

from exaflop.drive.badinput import BadInput
from exaflop.drive.importers.clips import ImportOptions, Item, Recording, safe_id
from exaflop.drive.importers.generic import load_telemetry
from exaflop.drive.video import decode_clip

EXPECTED = ("expected drive-records-*.jsonl files written by `exaflop serve --drive-record-dir`, and each "
            "drive's telemetry as TELEMETRY/DRIVE_ID.csv (t, steering, speed columns)")


def _record_files(root: Path) -> list[Path]:
    return sorted([*root.glob("*.jsonl"), *root.glob("*.jsonl.open")])


def read_records(root: Path) -> dict[str, list[dict]]:
    """drive_id -> its records (a broken last line of a file being written is skipped)."""
    by_drive: dict[str, list[dict]] = {}
    for f in _record_files(root):
        for line in f.read_bytes().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict) and "drive_id" in r and "t" in r and "frames_mp4" in r:
                by_drive.setdefault(str(r["drive_id"]), []).append(r)
    return by_drive


def discover(root: Path, opts: ImportOptions) -> tuple[list[Item], list[dict]]:
    tel_dir = Path(opts.extra.get("telemetry_dir") or root / "telemetry")
    items, skipped = [], []
    for drive_id, recs in sorted(read_records(root).items()):
        item_id = safe_id(f"rec-{drive_id}")
        tel = next((tel_dir / f"{drive_id}{s}" for s in (".csv", ".json") if (tel_dir / f"{drive_id}{s}").is_file()),
                   None)
        if tel is None:
            skipped.append({"item": item_id, "reason": f"drive {drive_id}: {len(recs)} records, no telemetry yet "
                            f"(expected {tel_dir / (drive_id + '.csv')}); imported once it arrives", "pending": True})
            continue
        items.append(Item(item_id, group=f"rec-{drive_id}", paths={"records": str(root), "telemetry": str(tel),
                                                                     "drive_id": drive_id}))
    return items, skipped


def load(item: Item, opts: ImportOptions) -> Recording:
    recs = sorted(read_records(Path(item.paths["records"]))[item.paths["drive_id"]], key=lambda r: r["t"])
    frames: dict[int, np.ndarray] = {}
    fps = float(recs[0].get("fps") or opts.fps)
    for r in recs:  # later requests overwrite the frames they share with earlier ones
        clip = decode_clip(base64.b64decode(r["frames_mp4"]))
        if clip.shape[1:3] != (opts.height, opts.width):
            raise BadInput(f"drive {item.paths['drive_id']}: recorded frames are {clip.shape[2]}x{clip.shape[1]}, "
                           f"the import asks for {opts.width}x{opts.height}; pass --size "
                           f"{clip.shape[2]}x{clip.shape[1]}")
        last = int(round(float(r["t"]) * fps))
        for j, frame in enumerate(clip):
            frames[last - (len(clip) - 1 - j)] = frame
    ticks = np.asarray(sorted(frames))
    tel = load_telemetry(Path(item.paths["telemetry"]), opts)
    return Recording(np.stack([frames[k] for k in ticks]), ticks / fps, tel, len(ticks), view=recs[-1].get("view"))
