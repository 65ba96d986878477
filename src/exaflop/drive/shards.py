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
import tempfile
from pathlib import Path
from typing import Any

from exaflop.drive.store import MANIFEST, Store

MEMBERS = ("mp4", "telemetry.json", "labels.json")


class ShardWriter:
    """Append clips to one tar; `close()` finalises the tar and then its index.

    The tar is written to a local temporary file and handed to the store whole when
    closed (renamed into place locally, one upload to object storage); the index follows,
    so an index that exists always describes a finished shard."""

    def __init__(self, path: Path | str, store: Store | None = None):
        self.store = store or Store(Path(path).parent)
        self.name = Path(path).name if store is None else str(path)  # relative to the store
        local_dir = Path(self.store.url(*Path(self.name).parent.parts)) if self.store.local else None
        if local_dir is not None:
            local_dir.mkdir(parents=True, exist_ok=True)
            self.tmp = local_dir / (Path(self.name).name + ".tmp")
        else:
            fd, tmp = tempfile.mkstemp(prefix="exaflop-shard-", suffix=".tar")
            os.close(fd)
            self.tmp = Path(tmp)
        self.path = self.store.url(self.name)
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
        size = self.tmp.stat().st_size
        self.store.put_file(self.tmp, self.name)
        shard = Path(self.name).name
        index = {"shard": shard, "bytes": size, "sha256": digest, "members": list(MEMBERS), "clips": self.clips}
        idx = index_name(self.name)
        self.store.write_json(index, idx)
        return {"file": shard, "index": Path(idx).name, "clips": len(self.clips), "bytes": size, "sha256": digest}

    def abort(self) -> None:
        """Drop the unfinished shard (nothing reaches the store)."""
        self.tar.close()
        self.tmp.unlink(missing_ok=True)


def index_name(shard: str) -> str:
    return shard.removesuffix(".tar") + ".idx.json"


def write_json(path: Path, obj: Any) -> None:
    """Atomic write of a local JSON file: readers never see half a file, a crash leaves the old one."""
    Store(path.parent).write_json(obj, path.name)


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def load_manifest(root: str, storage_options: dict | None = None) -> dict:
    return Store(root, storage_options).read_json(MANIFEST, what="dataset manifest")


def decode_record(blob: bytes, entry: list) -> tuple[bytes, dict, dict]:
    """Split one clip's byte range into (mp4 bytes, telemetry, labels)."""
    (mo, ms, to, ts, lo, ls) = entry[3:9]
    return blob[mo:mo + ms], json.loads(blob[to:to + ts]), json.loads(blob[lo:lo + ls])


def read_clip(fileobj, entry: list) -> tuple[bytes, dict, dict]:
    fileobj.seek(entry[1])
    return decode_record(fileobj.read(entry[2]), entry)
