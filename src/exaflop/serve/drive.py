"""/v1/drive/predict: camera frames in, future waypoints and steering out, from a driving run.

Two request forms:
- multipart/form-data: `model`, `video` (an MP4/H.264 clip; its last T frames are used,
  resized to the model's input), optional `speed` and `steering` (JSON arrays of T
  past values, m/s and degrees; zeros when absent);
- application/json: {"model", "frames": [T][H][W][3] uint8, "speed"?, "steering"?}
  with T, H, W exactly the model's.

The answer: {"waypoints": [[x, y] × K] (metres, ego frame: x forward, y left),
"steering": [K] (degrees), "dt": seconds between waypoints, "checkpoint_step"}.
A server started without a driving run answers 404 in the OpenAI error shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from exaflop.drive.promote import promoted
from exaflop.engine.checkpoint import load_for_inference, read_latest
from exaflop.serve.protocol import APIError, validation_message
from exaflop.serve.threads import in_fresh_thread

log = logging.getLogger("exaflop.serve")


DRIVE_ID = r"^[A-Za-z0-9_.:-]{1,128}$"


class DriveJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=256)
    frames: list = Field(min_length=1, max_length=256)  # shape/range checked against the model
    speed: list[float] | None = Field(None, max_length=256)
    steering: list[float] | None = Field(None, max_length=256)
    # Which drive and when (seconds on the drive's telemetry clock, of the last frame): with a
    # recording server, the request becomes a training clip once that drive's telemetry arrives.
    drive_id: str | None = Field(None, pattern=DRIVE_ID)
    t: float | None = Field(None, allow_inf_nan=False)


class DriveRecorder:
    """Requests with a drive_id and t, and the predictions made for them, appended to
    rotating JSONL files in a directory the operator names (`serve --drive-record-dir`).

    One line per request: drive_id, t, model, checkpoint_step, fps, the frames as an H.264
    clip (base64: ~3 KB for 8 frames of 64x64), past speed/steering, and the prediction. The
    file being written is `*.jsonl.open`; it is renamed to `*.jsonl` when it reaches
    `max_bytes` or the server stops, so a reader can take the closed files only. Lines are
    written whole and flushed: a crash loses at most the line being written (readers skip a
    broken last line). `exaflop data drive records DIR` turns them into clips."""

    def __init__(self, directory: Path, max_bytes: int = 64 << 20):
        import os
        import threading

        self.dir, self.max_bytes = Path(directory), max_bytes
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = None
        self._path: Path | None = None
        self._n = 0
        self._prefix = f"drive-records-{int(time.time())}-{os.getpid()}"

    def write(self, record: dict) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._file is None:
                self._path = self.dir / f"{self._prefix}-{self._n:04d}.jsonl.open"
                self._file = open(self._path, "ab")  # noqa: SIM115  (kept open across requests)
            self._file.write(line)
            self._file.flush()
            if self._file.tell() >= self.max_bytes:
                self._close_locked()

    def _close_locked(self) -> None:
        if self._file is not None:
            self._file.close()
            self._path.rename(self._path.with_suffix(""))  # .jsonl.open -> .jsonl
            self._file, self._n = None, self._n + 1

    def close(self) -> None:
        with self._lock:
            self._close_locked()


_PREDICT = ThreadPoolExecutor(max_workers=1, thread_name_prefix="exaflop-drive")


class DrivePredictor:
    """One driving run: its newest checkpoint, reloaded like the language models."""

    def __init__(self, name: str, path: Path, watch: bool, device: torch.device,
                 autocast: torch.dtype | None = None, recorder: DriveRecorder | None = None, threads: int = 0):
        self.name, self.path, self.watch, self.device = name, path, watch, device
        self.threads = threads  # torch threads of each prediction's thread (0: the default)
        self.recorder = recorder
        self.autocast = autocast  # bf16 where the device runs it fast (serve --dtype), else fp32
        self.model = None
        self.cfg = None
        self.step = -1
        self.ckpt = ""  # the checkpoint directory being served
        self._failed: set[str] = set()

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def poll(self) -> None:
        if self.watch:  # the promoted checkpoint when one is named, else the newest
            ckpt = promoted(self.path) or read_latest(self.path / "checkpoints")[0]
        else:
            ckpt = None if self.loaded else self.path
        if ckpt is None or str(ckpt) in self._failed:
            return
        if str(ckpt) == self.ckpt:
            return
        try:
            step = json.loads((ckpt / "meta.json").read_text()).get("step", -1)
            cfg, _task, model = load_for_inference(ckpt, self.device)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: B036 — DCP raises CheckpointException (a BaseException)
            self._failed.add(str(ckpt))
            log.warning("%s: could not load %s (%s); keeping step %d", self.name, ckpt, e, self.step)
            return
        # One assignment each: readers see old or new. Promotion may go back to an older step.
        self.cfg, self.model, self.step, self.ckpt = cfg, model, step, str(ckpt)
        log.info("%s: serving driving model %s (step %d)", self.name, ckpt.name, step)

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "exaflop", "task": "drive",
                "checkpoint_step": self.step if self.loaded else None}

    def predict(self, frames: np.ndarray, speed: np.ndarray, steering: np.ndarray) -> dict:
        model, cfg, step = self.model, self.cfg, self.step
        video = torch.from_numpy(frames).permute(0, 3, 1, 2)[None].to(self.device)  # (1, T, C, H, W)
        amp = torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None)
        with torch.inference_mode(), amp:
            wp, steer = model(video, torch.from_numpy(speed)[None].to(self.device),
                              torch.from_numpy(steering)[None].to(self.device))
        dt = float(model.t_future[0]) if hasattr(model, "t_future") else None
        return {"object": "drive.prediction", "model": self.name, "checkpoint_step": step,
                "waypoints": wp[0].float().cpu().tolist(), "steering": steer[0].float().cpu().tolist(),
                "dt": dt, "frames": cfg.model.frames}

    def record(self, drive_id: str, t: float, frames: np.ndarray, speed: np.ndarray, steering: np.ndarray,
               answer: dict) -> None:
        import base64

        from exaflop.drive.video import encode_clip

        dataset = self._dataset
        fps = float(dataset.get("clip", {}).get("fps", 10.0))
        self.recorder.write({
            "drive_id": drive_id, "t": t, "received": time.time(), "model": self.name,
            "checkpoint_step": answer["checkpoint_step"], "fps": fps, "view": dataset.get("view"),
            "size": [int(frames.shape[2]), int(frames.shape[1])],
            "frames_mp4": base64.b64encode(encode_clip(frames, fps)).decode(),
            "speed": speed.tolist(), "steering": steering.tolist(),
            "prediction": {"waypoints": answer["waypoints"], "steering": answer["steering"], "dt": answer["dt"]}})

    @property
    def _dataset(self) -> dict:
        """RUN/dataset.json (clip rate, view) of the served run, for the recording."""
        run = self.path if self.watch else self.path.parent.parent
        try:
            return json.loads((run / "dataset.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}


def _past(values, name: str, t: int) -> np.ndarray:
    if values is None:
        return np.zeros(t, np.float32)
    if len(values) != t:
        raise APIError(400, f"{name}: give {t} past values (one per frame), got {len(values)}", param=name)
    arr = np.asarray(values, np.float32)
    if not np.isfinite(arr).all():
        raise APIError(400, f"{name}: values must be finite numbers", param=name)
    return arr


def _decode_upload(data: bytes, cfg) -> np.ndarray:
    from exaflop.drive.video import decode_video

    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(data)
        f.flush()
        try:
            frames, _, _ = decode_video(f.name, cfg.width, cfg.height)
        except Exception as e:  # BadInput and anything else from a hostile file
            raise APIError(400, f"video: cannot decode the upload ({e})".replace(f.name, "upload"),
                           param="video") from None
    if len(frames) < cfg.frames:
        raise APIError(400, f"video: the model needs {cfg.frames} frames, the clip has {len(frames)}", param="video")
    return np.ascontiguousarray(frames[-cfg.frames:])


async def predict(server, request: Request) -> dict:
    ctype = request.headers.get("content-type", "")
    form = None
    if ctype.startswith("multipart/form-data"):
        try:
            form = await request.form()
        except Exception as e:
            raise APIError(400, f"request body: not valid multipart form data ({e})") from None
        name = form.get("model")
    else:
        try:
            body = DriveJSON.model_validate_json(await request.body())
        except ValidationError as e:
            message, param = validation_message(list(e.errors()))
            raise APIError(400, message, param=param) from None
        name = body.model
    if not isinstance(name, str) or not name:
        raise APIError(400, "Missing required parameter: model", param="model")
    drive = server.drive.get(name)
    if drive is None:
        what = "is a language model; /v1/drive/predict needs a driving run" if name in server.models \
            else "does not exist" if server.drive else "does not exist (no driving run is served here)"
        raise APIError(404, f"The model `{name}` {what}", param="model", code="model_not_found")
    if not drive.loaded:
        raise APIError(503, f"model `{name}` is still loading; retry shortly", type="server_error",
                       code="model_loading", retry_after=5)
    cfg = drive.cfg.model
    if form is not None:
        upload = form.get("video")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "video: attach the clip as a file field named 'video'", param="video")
        frames = await asyncio.to_thread(_decode_upload, await upload.read(), cfg)
        speed, steering = (_past(_json_list(form.get(k), k), k, cfg.frames) for k in ("speed", "steering"))
    else:
        frames = _frames(body.frames, cfg)
        speed, steering = _past(body.speed, "speed", cfg.frames), _past(body.steering, "steering", cfg.frames)
    drive_id, t = _where(form, body if form is None else None)
    # One prediction at a time (two cores gain nothing from two), each in a thread that ends
    # with it, so only the engine thread keeps an OpenMP team (serve/threads.py).
    job = partial(in_fresh_thread, drive.predict, frames, speed, steering, threads=drive.threads)
    answer = await asyncio.get_running_loop().run_in_executor(_PREDICT, job)
    if drive.recorder is not None and drive_id is not None and t is not None:
        await asyncio.to_thread(drive.record, drive_id, t, frames, speed, steering, answer)
    return answer


def _where(form, body: DriveJSON | None) -> tuple[str | None, float | None]:
    """(drive_id, t) of a request: JSON fields, or form fields of an upload (validated alike)."""
    import math
    import re

    if body is not None:
        return body.drive_id, body.t
    drive_id, t = form.get("drive_id"), form.get("t")
    if drive_id is not None and (not isinstance(drive_id, str) or not re.match(DRIVE_ID, drive_id)):
        raise APIError(400, "drive_id: 1-128 characters of A-Z a-z 0-9 _ . : -", param="drive_id")
    if t is not None:
        try:
            t = float(t)
        except (TypeError, ValueError):
            t = math.nan
        if not math.isfinite(t):
            raise APIError(400, "t: a finite number of seconds", param="t")
    return drive_id, t


def _json_list(value, name: str):
    if value is None:
        return None
    try:
        out = json.loads(value) if isinstance(value, str) else None
    except json.JSONDecodeError:
        out = None
    if not isinstance(out, list) or not all(isinstance(v, (int, float)) for v in out):
        raise APIError(400, f"{name}: a JSON array of numbers", param=name)
    return out


def _frames(frames: list, cfg) -> np.ndarray:
    want = (cfg.frames, cfg.height, cfg.width, 3)
    try:
        arr = np.asarray(frames)
    except ValueError:  # ragged nesting
        arr = None
    if arr is None or arr.shape != want or arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > 255:
        raise APIError(400, f"frames: need uint8 pixels shaped {list(want)} (frames, height, width, RGB)",
                       param="frames")
    return arr.astype(np.uint8)
