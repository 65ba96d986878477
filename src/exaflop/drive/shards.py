"""Clip shards: WebDataset-compatible tars, a byte-offset index per shard, and the manifest.

A shard `NAME.tar` holds, per clip with key K, the members `K.mp4`,
`K.telemetry.json` and `K.labels.json`, written back to back, so `tar -tf`
and WebDataset readers both work. `NAME.idx.json` records for every clip the
byte range covering its three members (one range read per clip, local or any
fsspec URL, no tar scan). The index is written after the tar is complete and
renamed into place, so an index on disk means a finished shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import fsspec

from exaflop.errors import UserError

MEMBERS = ("mp4", "telemetry.json", "labels.json")
MANIFEST = "manifest.json"


class ShardWriter:
    """Append clips to one tar; `close()` finalises the tar and then its index."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.clips: list[list[Any]] = []

    def add(self, key: str, mp4: bytes, telemetry: dict, labels: dict) -> None:
        if "." in key:
            raise ValueError(f"clip key {key!r} must not contain '.' (WebDataset splits on it)")
        blobs = (mp4, json.dumps(telemetry).encode(), json.dumps(labels).encode())
        ranges = []
        for ext, blob in zip(MEMBERS, blobs, strict=True):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(blob), 0o644, 0  # mtime 0: byte-reproducible shards
            self.tar.addfile(info, io.BytesIO(blob))
            # addfile leaves tar.offset after the member's data padded to 512-byte blocks.
            padded = -(-len(blob) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            ranges.append((self.tar.offset - padded, len(blob)))
        start = ranges[0][0]
        end = ranges[-1][0] + ranges[-1][1]
        # [key, start, length, then (offset-from-start, size) for each member]
        self.clips.append([key, start, end - start] + [v for off, size in ranges for v in (off - start, size)])

    def close(self) -> dict:
        self.tar.close()
        digest = hashlib.sha256(self.tmp.read_bytes()).hexdigest()
        os.replace(self.tmp, self.path)
        index = {"shard": self.path.name, "bytes": self.path.stat().st_size, "sha256": digest,
                 "members": list(MEMBERS), "clips": self.clips}
        write_json(index_path(self.path), index)
        return {"file": self.path.name, "index": index_path(self.path).name, "clips": len(self.clips),
                "bytes": index["bytes"], "sha256": digest}


def index_path(shard: Path) -> Path:
    return shard.with_name(shard.name.removesuffix(".tar") + ".idx.json")


def write_json(path: Path, obj: Any) -> None:
    """Atomic write: readers never see half a file, a crash leaves the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1 if path.name == MANIFEST else None))
    os.replace(tmp, path)


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def read_json(url: str, what: str) -> Any:
    try:
        with fsspec.open(url, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise UserError(f"{url}: no {what} here; write the dataset first with `exaflop data drive ...` "
                        "or set data.path") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{url}: {what} is not valid JSON ({e}); re-run the import") from None


def load_manifest(root: str) -> dict:
    return read_json(join(root, MANIFEST), "dataset manifest")


def decode_record(blob: bytes, entry: list) -> tuple[bytes, dict, dict]:
    """Split one clip's byte range into (mp4 bytes, telemetry, labels)."""
    (mo, ms, to, ts, lo, ls) = entry[3:9]
    return blob[mo:mo + ms], json.loads(blob[to:to + ts]), json.loads(blob[lo:lo + ls])


def read_clip(fileobj, entry: list) -> tuple[bytes, dict, dict]:
    fileobj.seek(entry[1])
    return decode_record(fileobj.read(entry[2]), entry)
