"""Where a clip dataset lives: a local folder or any fsspec URL (s3://, gs://, memory://, ...).

One `Store` per dataset root. Writers put whole objects (a finished shard, then its index,
then the item's result marker, the manifest last), so a reader or a resumed import never
sees half an object: object stores make a PUT visible whole, and local files are written
to a temporary name and renamed. Readers take one ranged GET per clip (`read_range`),
retried with backoff before the failure is reported in one line naming the URL.

Credentials and endpoints come the usual way: the AWS environment variables and profiles
(`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, `AWS_ENDPOINT_URL`, ...) through botocore, plus
storage options (`--storage-option endpoint_url=http://...`, `data.storage_options`) passed
to the fsspec filesystem.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import fsspec

from exaflop.errors import UserError

MANIFEST = "manifest.json"
READ_ATTEMPTS = 4  # one try and three retries, 0.25 s, 0.5 s, 1 s apart

CREDENTIALS_HINT = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for a key "
                    "the bucket accepts")
ENDPOINT_HINT = ("check the endpoint: --storage-option endpoint_url=http://HOST:PORT (data.storage_options "
                 "in a config, or AWS_ENDPOINT_URL) for an S3-compatible store")


def parse_storage_options(items: list[str], flag: str = "--storage-option") -> dict[str, Any]:
    """KEY=VALUE strings -> fsspec keyword arguments (true/false/numbers typed)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} endpoint_url=http://127.0.0.1:9000")
        value: Any = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            for cast in (int, float):
                try:
                    value = cast(raw)
                    break
                except ValueError:
                    pass
        out[key.strip()] = value
    return out


def is_url(location: str | Path) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def storage_error(e: BaseException, url: str) -> UserError | None:
    """The one-line reason for a storage failure, or None when `e` is not one."""
    name = type(e).__name__
    text = str(e).splitlines()[0] if str(e) else name
    bucket = url.split("://", 1)[-1].split("/", 1)[0]
    if name == "NoCredentialsError":
        return UserError(f"{url}: no credentials found; {CREDENTIALS_HINT}")
    if isinstance(e, PermissionError) or name in ("ClientError", "NoAuthTokenError"):
        return UserError(f"{url}: access denied ({text}); {CREDENTIALS_HINT}")
    if isinstance(e, FileNotFoundError) and "bucket" in text.lower():
        return UserError(f"{url}: bucket {bucket!r} does not exist ({text}); create it "
                         f"(aws s3 mb s3://{bucket}) or fix the URL")
    if "EndpointConnectionError" in name or "ConnectTimeout" in name or "ConnectionError" in name \
            or isinstance(e, ConnectionError):
        return UserError(f"{url}: cannot reach the storage endpoint ({text}); {ENDPOINT_HINT}")
    if isinstance(e, ImportError):
        proto = url.split("://", 1)[0]
        extra = {"s3": "s3", "s3a": "s3"}.get(proto)
        hint = f"pip install 'exaflop[{extra}]'" if extra else f"install the fsspec backend for {proto}://"
        return UserError(f"{url}: no filesystem for {proto}:// ({text}); {hint}")
    return None


class Store:
    """A dataset root: a local directory or an fsspec URL, with its storage options."""

    def __init__(self, location: str | Path, options: dict[str, Any] | None = None):
        self.location = str(location)
        self.options = dict(options or {})
        self.local = not is_url(self.location)
        self.root = str(Path(self.location.removeprefix("file://"))) if self.local else self.location.rstrip("/")
        self._fs, self._pid = None, os.getpid()
        self._http: _PresignedReader | None | bool = False  # False: not decided yet

    # The filesystem is made lazily, dropped on pickling and remade after a fork: async
    # clients (s3fs) are not fork-safe, and workers (DataLoader, Ray tasks) build their own
    # from the URL and options.
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None, "_http": False}

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            self._pid, self._http = os.getpid(), False
            if self.local:
                self._fs = fsspec.filesystem("file")
            else:
                try:
                    self._fs, _ = fsspec.core.url_to_fs(self.root, **self.options)
                except Exception as e:  # noqa: BLE001  (unknown protocol, missing backend, bad option)
                    raise storage_error(e, self.root) or UserError(f"{self.root}: {e}") from None
        return self._fs

    def url(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _path(self, *parts: str) -> str:
        """The filesystem's own path (no protocol) for parts under the root."""
        return self.url(*parts) if self.local else self.fs._strip_protocol(self.url(*parts))

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001  (mapped to one line below, or re-raised)
            err = storage_error(e, what)
            if err is None:
                raise
            raise err from None

    # --- writing -------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Fail before any work if the output cannot be written (no bucket, no credentials,
        no endpoint): a probe object is written and removed."""
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)
            return
        probe = self._path(".exaflop-write-probe")
        self._call(self.root, self.fs.pipe_file, probe, b"")
        self._call(self.root, self.fs.rm_file, probe)

    def put_file(self, local: Path, *parts: str) -> None:
        """Move a finished local file to parts under the root (whole, never partial)."""
        if self.local:
            dest = Path(self._path(*parts))
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(local, dest)
            return
        self._call(self.url(*parts), self.fs.put_file, str(local), self._path(*parts))
        os.unlink(local)

    def write_json(self, obj: Any, *parts: str) -> None:
        data = json.dumps(obj, indent=1 if parts[-1] == MANIFEST else None).encode()
        if self.local:
            dest = Path(self._path(*parts))
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, dest)  # a crash leaves the old file, never half a new one
            return
        self._call(self.url(*parts), self.fs.pipe_file, self._path(*parts), data)

    def list_names(self, *parts: str) -> set[str]:
        """File names directly under parts (empty when the folder does not exist)."""
        if self.local:
            d = Path(self._path(*parts))
            return {p.name for p in d.iterdir()} if d.is_dir() else set()
        try:
            found = self._call(self.url(*parts), self.fs.ls, self._path(*parts), detail=False, refresh=True)
        except FileNotFoundError:
            return set()
        return {p.rstrip("/").rsplit("/", 1)[-1] for p in found}

    # --- reading -------------------------------------------------------------------------
    def read_bytes(self, *parts: str) -> bytes:
        if self.local:
            return Path(self._path(*parts)).read_bytes()
        return self._call(self.url(*parts), self.fs.cat_file, self._path(*parts))

    def read_json(self, *parts: str, what: str) -> Any:
        url = self.url(*parts)
        try:
            return json.loads(self.read_bytes(*parts))
        except FileNotFoundError:
            raise UserError(f"{url}: no {what} here; write the dataset first with `exaflop data drive ...` "
                            "or set data.path") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{url}: {what} is not valid JSON ({e}); re-run the import") from None

    def read_ranges(self, requests: list[tuple[str, int, int, str]]) -> list[bytes]:
        """Many (rel, offset, length, key) byte ranges at once: one ranged GET each, all in
        flight together (a batch of clips costs one round-trip of latency, not one per clip);
        any that fails is retried alone by `read_range`."""
        if len(requests) <= 1 or not hasattr(self.fs, "cat_ranges"):
            return [self.read_range(*r) for r in requests]
        http = self._presigned()
        if http is not None:
            got = http.get_many([(self._path(r[0]), r[1], r[2]) for r in requests])
            return [g if isinstance(g, bytes) else self.read_range(*r) for g, r in zip(got, requests, strict=True)]
        try:
            got = self.fs.cat_ranges([self._path(r[0]) for r in requests], [r[1] for r in requests],
                                     [r[1] + r[2] for r in requests], on_error="return")
        except Exception:  # noqa: BLE001  (the whole call failed: every range is retried alone)
            got = [None] * len(requests)
        return [g if isinstance(g, bytes) and len(g) == r[2] else self.read_range(*r)
                for g, r in zip(got, requests, strict=True)]

    def read_range(self, rel: str, offset: int, length: int, key: str = "") -> bytes:
        """Bytes [offset, offset + length) of an object under the root: one ranged GET,
        retried with backoff; the final failure names the URL and the clip key."""
        path = self._path(rel)
        http = self._presigned()
        for attempt in range(READ_ATTEMPTS):
            try:
                data = (http.get(path, offset, length) if http is not None
                        else self.fs.cat_file(path, start=offset, end=offset + length))
                if len(data) == length:
                    return data
                err: BaseException = OSError(f"short read: {len(data)} of {length} bytes")
            except FileNotFoundError as e:  # not transient: no retry
                raise UserError(f"{self.url(rel)}: missing (reading clip {key!r}: {e}); re-import the "
                                "dataset or check data.path") from None
            except Exception as e:  # noqa: BLE001  (network, throttling, 5xx: retried)
                err = e
            if attempt + 1 < READ_ATTEMPTS:
                time.sleep(0.25 * 2 ** attempt)
        one = storage_error(err, self.url(rel))
        reason = str(one).split(": ", 1)[1] if one else f"{type(err).__name__}: {err}"
        raise UserError(f"{self.url(rel)}: reading clip {key!r} failed after {READ_ATTEMPTS} attempts "
                        f"({reason})")

    def _presigned(self) -> _PresignedReader | None:
        """The plain-HTTP reader for S3 objects, made once per process (None: use fsspec)."""
        fs = self.fs  # (re)made after a fork, which also resets the reader
        if self._http is False:
            self._http = _PresignedReader.make(fs)
        return self._http or None


class _PresignedReader:
    """Ranged GETs of S3 objects over plain HTTP with presigned URLs: one URL per shard,
    signed once and reused for all its clips, instead of a signed botocore call per clip:
    ~0.7 client CPU-ms per GET instead of ~2.4 through s3fs's `cat_ranges`, and the loader
    went from 289 to 499 samples per worker CPU-second (disk: 772; bench/import_scale.py,
    docs/benchmarks.md). Used
    only for s3fs stores with no HTTP proxy configured; `EXAFLOP_S3_PRESIGNED=0` turns it
    off (e.g. for SSE-C objects, whose key must travel in headers)."""

    TTL = 3600  # seconds a URL is signed for; renewed at 80% of it, or after a 403

    def __init__(self, fs):
        from concurrent.futures import ThreadPoolExecutor

        import urllib3

        # A sibling filesystem that signs with SigV4: botocore presigns S3 with SigV2 by
        # default, which regions opened since 2014 refuse.
        opts = dict(fs.storage_options)
        opts["config_kwargs"] = {**opts.get("config_kwargs", {}), "signature_version": "s3v4"}
        self.fs = type(fs)(**opts)
        self.urls: dict[str, tuple[str, float]] = {}
        self.http = urllib3.PoolManager(maxsize=16, retries=False, timeout=urllib3.Timeout(connect=5.0, read=60.0))
        self.pool = ThreadPoolExecutor(16, thread_name_prefix="exaflop-s3")

    @classmethod
    def make(cls, fs) -> _PresignedReader | None:
        if type(fs).__name__ != "S3FileSystem" or os.environ.get("EXAFLOP_S3_PRESIGNED", "1") == "0":
            return None
        import urllib.request

        if any(k in urllib.request.getproxies() for k in ("http", "https")):
            return None  # botocore knows the proxy rules; keep to it
        try:
            import urllib3  # noqa: F401  (a botocore dependency: present with s3fs)
        except ImportError:
            return None
        return cls(fs)

    def _url(self, path: str, fresh: bool = False) -> str:
        url, signed = self.urls.get(path, ("", 0.0))
        if fresh or not url or time.monotonic() - signed > 0.8 * self.TTL:
            url = self.fs.url(path, expires=self.TTL)
            self.urls[path] = (url, time.monotonic())
        return url

    def get(self, path: str, offset: int, length: int) -> bytes:
        import urllib3

        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        try:
            r = self.http.request("GET", self._url(path), headers=headers)
            if r.status == 403:  # expired or revoked: sign again once
                r = self.http.request("GET", self._url(path, fresh=True), headers=headers)
        except urllib3.exceptions.HTTPError as e:
            raise ConnectionError(str(e)) from None
        if r.status == 206:
            return r.data
        if r.status == 200:  # a server that ignores Range: still correct, just more bytes
            return r.data[offset:offset + length]
        code = _s3_code(r.data)
        if r.status == 403:
            raise PermissionError(f"HTTP 403 {code}")
        if r.status == 404:
            raise FileNotFoundError(f"HTTP 404 {code}")
        raise OSError(f"HTTP {r.status} {code}")

    def get_many(self, requests: list[tuple[str, int, int]]) -> list[bytes | BaseException]:
        def one(req: tuple[str, int, int]) -> bytes | BaseException:
            try:
                return self.get(*req)
            except Exception as e:  # noqa: BLE001  (returned: the caller retries that one alone)
                return e

        return list(self.pool.map(one, requests))


def _s3_code(body: bytes) -> str:
    """The <Code> of an S3 XML error body, for the one-line message."""
    text = body[:2000].decode("utf-8", "replace")
    start = text.find("<Code>")
    return text[start + 6:text.find("</Code>")] if start >= 0 else ""
