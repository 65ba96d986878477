"""Video loader throughput: raw PyAV decode vs the training loader, and loader vs model.

One run, one machine, the same clips throughout:
  1. raw decode: the clips' MP4 bytes, already in memory, decoded to RGB uint8 arrays by
     PyAV in this one process (exaflop's decode_clip: PyAV decode + BT.601 conversion).
     For reference also PyAV's stock `frame.to_ndarray(format="rgb24")` path.
  2. loader: the engine's global-cursor stream (`make_loader`) over the shard index,
     with W DataLoader workers: byte-range read, decode, augmentation, collate, IPC.
     Reported per worker; target >= 0.9x the raw decode rate.
  3. model: drive-small's training step (forward + backward + AdamW) on this CPU, in
     clips/s, beside the loader's delivered clips/s (the loader must not be the bottleneck),
     and both together: training fed by the loader.
Usage:
    python bench/video_loader.py [--data data/drive-sim] [--workers 1 2] [--seconds 4] [--repeat 3]
If --data has no manifest, a small simulated dataset is made first.
"""

from __future__ import annotations

import argparse
import io
import os
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def ensure_data(path: Path, episodes: int = 8, seconds: float = 30) -> None:
    if (path / "manifest.json").is_file():
        return
    from exaflop.drive.importers.sim import SimOptions, run_sim_import

    print(f"no dataset at {path}: simulating {episodes} episodes")
    run_sim_import(path, SimOptions(episodes=episodes, seconds=seconds), quiet=True)


def clip_bytes(source, n_clips: int, seed: int) -> list[bytes]:
    """The MP4 bytes of the first clips in the loader's own (shuffled) order, read up front."""
    from exaflop.data.stream import GlobalOrder

    blobs = []
    for i in GlobalOrder(len(source), seed).sample_ids(0, min(n_clips, len(source))):
        blobs.append(source._record(i)[0])
    return blobs


def raw_decode(blobs: list[bytes], stock: bool) -> tuple[float, float]:
    """(frames/s, frames per CPU-second) of PyAV decoding in-memory clips to RGB, one process."""
    import av
    import numpy as np

    from exaflop.drive.video import decode_clip

    def stock_decode(data: bytes):
        with av.open(io.BytesIO(data), format="mp4") as c:
            return np.stack([fr.to_ndarray(format="rgb24") for fr in c.decode(c.streams.video[0])])

    fn = stock_decode if stock else decode_clip
    fn(blobs[0])
    frames, t0, c0 = 0, time.perf_counter(), time.process_time()
    for b in blobs:
        frames += len(fn(b))
    return frames / (time.perf_counter() - t0), frames / max(time.process_time() - c0, 1e-9)


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc (Linux); 0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def loader_rate(source, collate, workers: int, batch: int, seconds: float) -> tuple[float, float]:
    """(frames/s delivered, frames per CPU-second spent in the worker processes) by the
    engine's stream with `workers` processes, after warm-up. The CPU-time figure is what
    other processes on the same cores cannot distort."""
    from exaflop.data.stream import StreamLayout, make_loader

    it = make_loader(source, collate, StreamLayout(batch, batch), seed=0, start_step=0, num_workers=workers)
    for _ in range(max(2, 2 * workers)):  # workers started, prefetch queues filled once
        next(it)
    pids = it.worker_pids
    cpu0 = sum(_cpu_seconds(p) for p in pids) if pids else time.process_time()
    frames, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        frames += b["video"].shape[0] * b["video"].shape[1]
    wall = time.perf_counter() - t0
    # Workers run ahead by the prefetch queue; over a few seconds that is a small bias.
    cpu = (sum(_cpu_seconds(p) for p in pids) if pids else time.process_time()) - cpu0
    del it
    return frames / wall, frames / max(cpu, 1e-9)


def model_rate(cfg, task, batches: list, seconds: float, loader=None) -> float:
    """drive-small clips/s: fwd + bwd + AdamW step, bf16 autocast like training."""
    import torch

    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    clips, t0, i = 0, None, 0
    while True:
        batch = next(loader) if loader is not None else batches[i % len(batches)]
        i += 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = task.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if t0 is None:  # first step: allocation and kernel selection
            t0 = time.perf_counter()
            continue
        clips += batch["video"].shape[0]
        if time.perf_counter() - t0 > seconds:
            return clips / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="data/drive-sim")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--clips", type=int, default=400, help="clips for the raw decode measurement")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=4.0, help="per loader / model measurement")
    ap.add_argument("--model", default="drive-small")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the best of each is kept")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long rehearsal (smoke test); numbers mean nothing")
    args = ap.parse_args()
    if args.tiny:
        args.workers, args.clips, args.batch, args.seconds, args.model, args.repeat = [1], 8, 4, 0.3, "drive-tiny", 1

    import torch

    from exaflop.config import load_config
    from exaflop.data.stream import StreamLayout, make_loader
    from exaflop.drive.source import ClipSource, collate
    from exaflop.engine.task import build_task

    data = Path(args.data)
    ensure_data(data, *((3, 12) if args.tiny else ()))
    source = ClipSource(str(data), "train")
    clip = source.manifest["clip"]
    print(f"clips: {data} train split, {len(source)} clips of {clip['frames']} frames "
          f"{clip['width']}x{clip['height']}; cpu cores {os.cpu_count()}, load average "
          f"{os.getloadavg()[0]:.2f}, torch threads {torch.get_num_threads()}")

    # Other processes share these cores: interleave the measurements and keep each one's best.
    blobs = clip_bytes(source, args.clips, seed=0)
    aug = {"brightness": 0.2, "contrast": 0.2, "mirror_prob": 0.5}
    train_src = ClipSource(str(data), "train", augment=aug)
    raw, stock, loader = (0.0, 0.0), (0.0, 0.0), {w: (0.0, 0.0) for w in args.workers}
    best = lambda a, b: (max(a[0], b[0]), max(a[1], b[1]))  # noqa: E731
    for _ in range(args.repeat):
        raw = best(raw, raw_decode(blobs, stock=False))
        stock = best(stock, raw_decode(blobs, stock=True))
        for w in args.workers:
            loader[w] = best(loader[w], loader_rate(train_src, collate, w, args.batch, args.seconds))
    print(f"raw PyAV decode (1 process, {len(blobs)} clips in the loader's order, bytes in memory): "
          f"{raw[0]:,.0f} frames/s wall, {raw[1]:,.0f} frames per CPU-second "
          f"(PyAV's to_ndarray(rgb24) instead: {stock[0]:,.0f} / {stock[1]:,.0f})")
    for w in args.workers:
        (fps, per_cpu) = loader[w]
        print(f"loader, {w} worker(s): {fps:,.0f} frames/s wall = {fps / w:,.0f} per worker "
              f"({fps / w / raw[0]:.2f}x raw); {per_cpu:,.0f} frames per worker CPU-second "
              f"({per_cpu / raw[1]:.2f}x raw; target >= 0.9)")

    cfg = load_config(args.model, [f"data.path={data}"])
    task = build_task(cfg)
    batches = [collate([train_src[i] for i in range(j, j + args.batch)]) for j in range(0, 4 * args.batch, args.batch)]
    torch.set_num_threads(max(1, cfg.run.threads or torch.get_num_threads()))
    alone = model_rate(cfg, task, batches, args.seconds)
    w = cfg.data.num_workers
    delivered = loader[w][0] if w in loader else loader_rate(train_src, collate, w, args.batch, args.seconds)[0]
    loader_clips = delivered / clip["frames"]
    print(f"{args.model} training step alone: {alone:,.1f} clips/s; loader ({w} workers) alone: "
          f"{loader_clips:,.1f} clips/s -> loader/model {loader_clips / alone:.1f}x (must be > 1)")
    it = make_loader(train_src, collate, StreamLayout(args.batch, args.batch), seed=0, start_step=0, num_workers=w)
    fed = model_rate(cfg, task, batches, args.seconds, loader=it)
    print(f"{args.model} fed by the loader ({w} workers, same cores): {fed:,.1f} clips/s "
          f"= {fed / alone:.2f}x the model alone")


if __name__ == "__main__":
    main()
