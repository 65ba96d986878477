"""Video I/O with PyAV: decode source videos to small RGB frames, encode/decode clip MP4s.

Frames are uint8 (N, H, W, 3) RGB everywhere. Sources are center-cropped to the
target aspect ratio and then scaled, so nothing is stretched.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from exaflop.drive.badinput import BadInput

SUPPORTED_CODECS = ("h264", "hevc", "mpeg4", "vp9", "av1")
RAW_FORMATS = {".h264": "h264", ".264": "h264", ".hevc": "hevc", ".h265": "hevc", ".265": "hevc"}
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", *RAW_FORMATS)

# One reformatter per process keeps its swscale context between frames; a fresh one per
# frame (what frame.to_ndarray(format=...) does) costs ~3x the H.264 decode of a small clip.
# Keyed by pid: a context inherited through fork (DataLoader workers) can hold swscale's
# worker threads, which do not exist in the child, and the first frame deadlocks.
_REFORMATTERS: dict[int, VideoReformatter] = {}


def to_rgb(frame: av.VideoFrame, width: int | None = None, height: int | None = None) -> np.ndarray:
    pid = os.getpid()
    if pid not in _REFORMATTERS:
        _REFORMATTERS.clear()
        _REFORMATTERS[pid] = VideoReformatter()
    return _REFORMATTERS[pid].reformat(frame, width=width, height=height, format="rgb24").to_ndarray()


def fit_frame(frame: av.VideoFrame, width: int, height: int) -> np.ndarray:
    """Scale so the target box is covered, then center-crop to exactly (height, width)."""
    scale = max(width / frame.width, height / frame.height)
    sw, sh = max(width, math.ceil(frame.width * scale)), max(height, math.ceil(frame.height * scale))
    rgb = to_rgb(frame, sw, sh)
    top, left = (sh - height) // 2, (sw - width) // 2
    return rgb[top:top + height, left:left + width]


def decode_video(path: str | Path, width: int, height: int, codecs: Iterable[str] = SUPPORTED_CODECS,
                 ) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
    """All frames of a video, resized; their presentation times in seconds from the first
    frame, or None for raw elementary streams (.h264/.hevc), which carry no timing; and the
    source (width, height)."""
    path = Path(path)
    raw = RAW_FORMATS.get(path.suffix.lower())
    try:
        container = av.open(str(path), format=raw)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or e
        raise BadInput(f"{path}: cannot open video ({why}); the file is corrupt, truncated or not a video") from None
    frames, times = [], []
    with container:
        if not container.streams.video:
            raise BadInput(f"{path}: has no video stream")
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        if codec not in codecs:
            raise BadInput(f"{path}: unsupported codec {codec!r} (supported: {', '.join(codecs)}); "
                           "re-encode to H.264 (ffmpeg -i IN -c:v libx264 OUT.mp4) or pass --codecs")
        src_size = (stream.codec_context.width, stream.codec_context.height)
        stream.thread_type = "AUTO"  # whole-drive decode: frame threads pay off here
        try:
            for frame in container.decode(stream):
                frames.append(fit_frame(frame, width, height))
                times.append(frame.time)
        except av.error.FFmpegError as e:
            why = getattr(e, "strerror", None) or e
            raise BadInput(f"{path}: video is corrupt or truncated after frame {len(frames)} ({why})") from None
    if not frames:
        raise BadInput(f"{path}: no decodable video frames (corrupt, truncated or empty file)")
    if raw or any(t is None for t in times):
        return np.stack(frames), None, src_size
    t = np.asarray(times, dtype=np.float64)
    return np.stack(frames), t - t[0], src_size


def read_image(path: str | Path, width: int, height: int) -> np.ndarray:
    """One still image (jpg/png) as (height, width, 3) RGB."""
    try:
        with av.open(str(path)) as c:
            frame = next(c.decode(video=0))
    except (av.error.FFmpegError, OSError, StopIteration) as e:
        raise BadInput(f"{path}: cannot read image ({e})") from None
    return fit_frame(frame, width, height)


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float, codec: str = "libx264",
                crf: int = 20) -> None:
    """Encode frames to a file; .h264/.hevc suffixes give a raw elementary stream (no container)."""
    path = Path(path)
    raw = RAW_FORMATS.get(path.suffix.lower())
    with av.open(str(path), "w", format=raw) as out:
        _encode(out, frames, fps, codec, crf)


def encode_clip(frames: np.ndarray, fps: float, crf: int = 18) -> bytes:
    """One clip as an H.264 MP4 in memory, the same bytes for the same frames on any worker of
    any size (an import's checksums match whichever executor ran it). No B-frames (x264's
    own `bframes=0`: the generic "bframes" key is not an x264 option and was silently
    ignored): with them, x264's frame-type decisions differed between processes for the
    same frames, found comparing a Ray import's checksums with a local one's; clips are short
    and decode faster without. One encoder thread: x264's output depends on its thread
    count, and parallelism comes from the workers anyway."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        _encode(out, frames, fps, "libx264", crf, threads=1)
    return buf.getvalue()


def _encode(out, frames: Iterable[np.ndarray], fps: float, codec: str, crf: int, threads: int = 0) -> None:
    stream = None
    for f in frames:
        if stream is None:
            stream = out.add_stream(codec, rate=_rate(fps))
            stream.thread_count = threads  # 0: the encoder's own choice
            stream.height, stream.width = f.shape[:2]
            stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": str(crf), "preset": "veryfast", "x264-params": "bframes=0"}
            elif codec in ("libx265", "hevc"):
                stream.options = {"crf": str(crf), "preset": "veryfast", "x265-params": "log-level=error"}
        if f.shape[0] % 2 == 0 and f.shape[1] % 2 == 0:
            frame = av.VideoFrame.from_ndarray(rgb_to_yuv420(f), format="yuv420p")
        else:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
        for packet in stream.encode(frame):
            out.mux(packet)
    if stream is not None:
        for packet in stream.encode():
            out.mux(packet)


def _rate(fps: float):
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001)


def rgb_to_yuv420(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> yuv420p planes (H*3/2, W), BT.601 limited range in integer
    arithmetic (the inverse of `yuv420_to_rgb`), chroma from each 2x2 block's mean.

    numpy integer arithmetic, not swscale: exact and the same on every CPU (swscale picks
    its SIMD paths by CPU), so a drive converted on any node of a cluster gives the same clip
    bytes; and no swscale threads in processes that may later fork."""
    h, w = rgb.shape[:2]
    c = rgb.astype(np.int32)
    r, g, b = c[..., 0], c[..., 1], c[..., 2]
    out = np.empty((h * 3 // 2, w), np.uint8)
    out[:h] = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16
    quad = c.reshape(h // 2, 2, w // 2, 2, 3).sum((1, 3))  # 4x the block mean
    r4, g4, b4 = quad[..., 0], quad[..., 1], quad[..., 2]
    u = ((-38 * r4 - 74 * g4 + 112 * b4 + 512) >> 10) + 128
    v = ((112 * r4 - 94 * g4 - 18 * b4 + 512) >> 10) + 128
    # yuv420p as one (H*3/2, W) array: the U then V planes, each (H/2, W/2), row-major.
    out[h:] = np.concatenate([u.ravel(), v.ravel()]).reshape(h // 2, w)
    return out


def yuv420_to_rgb(planes: np.ndarray, channels_first: bool = False, out: np.ndarray | None = None,
                  flip: str | None = None) -> np.ndarray:
    """Stacked yuv420p planes (..., H*3/2, W) -> RGB uint8 (..., H, W, 3), or (..., 3, H, W)
    with channels_first; BT.601 limited range (what libx264 gets from rgb24 by default).

    numpy, not swscale: swscale keeps process-global threads that a forked DataLoader worker
    does not inherit, and then waits for them forever. Leading dims (a clip's frames) are
    converted in one pass: for small frames the per-call cost of numpy is most of the work.
    out: write into this array (a clip's slot in a batch) instead of a new one.
    flip: "width" or "height" mirrors the images along that axis while writing them.
    """
    lead, (h, w) = planes.shape[:-2], (planes.shape[-2] * 2 // 3, planes.shape[-1])
    y = planes[..., :h, :].astype(np.float32)
    y -= 16.0
    y *= 255.0 / 219.0
    chroma = planes[..., h:, :].reshape(*lead, 2, h // 2, w // 2).astype(np.float32)
    chroma -= 128.0
    chroma *= 255.0 / 224.0
    chroma = chroma.repeat(2, -2).repeat(2, -1)
    u, v = chroma[..., 0, :, :], chroma[..., 1, :, :]
    axis = len(lead) if channels_first else -1
    rgb = np.stack([y + 1.402 * v, y - 0.344136 * u - 0.714136 * v, y + 1.772 * u], axis=axis)
    rgb += 0.5
    np.clip(rgb, 0, 255, out=rgb)
    if out is None:
        out = np.empty(rgb.shape, np.uint8)
    dst = out
    if flip is not None:  # image axes: (H, W) are -2, -1 channels first, else -3, -2
        ax = (-1 if flip == "width" else -2) - (0 if channels_first else 1)
        dst = np.flip(out, ax)
    np.copyto(dst, rgb, casting="unsafe")  # truncation after +0.5: rounding
    return out


def decode_clip(data: bytes, channels_first: bool = False, out: np.ndarray | None = None,
                flip: str | None = None) -> np.ndarray:
    """An MP4 clip's frames as uint8 (T, H, W, 3), or (T, 3, H, W) with channels_first (the
    batch layout, produced directly: no transpose copy afterwards).

    out: decode into this (T, ...) uint8 array — a clip's slot in a batch — instead of a new
    one; the clip must have exactly T frames. flip: mirror every frame ("width"/"height").
    """
    with av.open(io.BytesIO(data), format="mp4") as c:
        stream = c.streams.video[0]
        # One decoder thread: parallelism comes from the loader's worker processes, and for
        # clip-sized videos FFmpeg's default thread pool (started per container, i.e. per
        # clip) costs more than it saves — measured 2x slower on 64x64 clips.
        stream.thread_count = 1
        frames = list(c.decode(stream))
    if out is not None and len(frames) != len(out):
        raise ValueError(f"clip has {len(frames)} frames, expected {len(out)}")
    if frames and all(f.format.name == "yuv420p" and f.width % 2 == 0 and f.height % 2 == 0 for f in frames):
        return yuv420_to_rgb(np.stack([f.to_ndarray() for f in frames]), channels_first, out, flip)
    rgb = np.stack([to_rgb(f) for f in frames])  # (T, H, W, 3)
    if flip is not None:
        rgb = np.flip(rgb, -2 if flip == "width" else -3)
    if channels_first:
        rgb = rgb.transpose(0, 3, 1, 2)
    if out is None:
        return np.ascontiguousarray(rgb)
    out[...] = rgb
    return out
