"""Fleet-scale data path: import on a Ray cluster vs the local pool, and training reads from
object storage vs local disk.

One run, one machine, the same drives throughout:
  1. import: the simulator's recorded episodes converted into clip shards by (a) the local
     process pool (`--workers 2`) and (b) Ray tasks on a two-node Ray cluster started here
     (`ray.cluster_utils.Cluster`, a head and a second node with one CPU each: the 2 cores
     this machine has). Both write to a local folder; clips/s of the whole import (discovery,
     conversion, manifest) and the ratio Ray / pool. The outputs are checked identical.
  2. loader: the engine's training stream (`make_loader`, W workers, augmentation on) over
     the dataset on local disk vs the same dataset in a local S3 server (moto's standalone
     server on 127.0.0.1, reached through s3fs: one ranged GET per clip); samples/s and the
     ratio (target >= 0.8). The S3 server shares the same cores as the loader workers.
Usage:
    python bench/import_scale.py [--episodes 16] [--seconds 30] [--workers 2] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def start_s3() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, **AWS}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto server did not start")


def timed_import(raw: Path, out: Path, opts, ray_address: str | None) -> tuple[float, dict]:
    from exaflop.drive.importers.run import run_import

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    m = run_import("generic", raw, out, opts, quiet=True, ray_address=ray_address)
    return m["counts"]["clips"] / (time.perf_counter() - t0), m


def loader_rate(source, workers: int, batch: int, seconds: float, server_pid: int | None = None
                ) -> tuple[float, float, float]:
    """(samples/s, samples per CPU-second of the loader workers, CPU-seconds of the S3 server
    per sample). The per-worker-CPU figure is the loader's cost on a training node, which
    the server sharing these cores cannot distort."""
    from video_loader import _cpu_seconds  # bench/ is on sys.path when run as a script

    from exaflop.data.stream import StreamLayout, make_loader
    from exaflop.drive.source import collate

    it = make_loader(source, collate, StreamLayout(batch, batch), seed=0, start_step=0, num_workers=workers)
    for _ in range(max(2, 2 * workers)):  # workers started, prefetch filled
        next(it)
    pids = it.worker_pids
    cpu0 = sum(_cpu_seconds(p) for p in pids)
    srv0 = _cpu_seconds(server_pid) if server_pid else 0.0
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(it)["video"].shape[0]
    rate = n / (time.perf_counter() - t0)
    cpu = sum(_cpu_seconds(p) for p in pids) - cpu0
    srv = (_cpu_seconds(server_pid) - srv0) if server_pid else 0.0
    del it
    return rate, n / max(cpu, 1e-9), srv / max(n, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each simulated episode")
    ap.add_argument("--workers", type=int, default=2, help="local pool processes and loader workers")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--measure", type=float, default=8.0, help="seconds per loader measurement")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved rounds; the best of each is kept")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long rehearsal (smoke test); numbers mean nothing")
    args = ap.parse_args()
    if args.tiny:
        args.episodes, args.seconds, args.batch, args.measure, args.repeat = 3, 8.0, 4, 0.5, 1
    os.environ.update(AWS)

    import ray
    import s3fs
    from ray.cluster_utils import Cluster

    from exaflop.drive.importers.sim import SimOptions, default_options, simulate
    from exaflop.drive.source import ClipSource

    work = Path(tempfile.mkdtemp(prefix="exaflop-bench-import-"))
    try:
        raw = work / "raw"
        simulate(raw, SimOptions(episodes=args.episodes, seconds=args.seconds), quiet=True)
        opts = default_options()
        opts.workers = args.workers
        print(f"drives: {args.episodes} simulated episodes of {args.seconds:g} s; cpu cores {os.cpu_count()}, "
              f"load average {os.getloadavg()[0]:.2f}")
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        pool = ray_rate = 0.0
        try:
            for _ in range(args.repeat):
                r, m_pool = timed_import(raw, work / "pool", opts, None)
                pool = max(pool, r)
                r, m_ray = timed_import(raw, work / "ray", opts, cluster.address)
                ray_rate = max(ray_rate, r)
        finally:
            ray.shutdown()
            cluster.shutdown()
        drop = ("created", "run")
        differ = sorted(k for k in set(m_pool) | set(m_ray) if k not in drop and m_pool.get(k) != m_ray.get(k))
        same = "yes" if not differ else f"NO, {', '.join(differ)} differ"
        clips = m_pool["counts"]["clips"]
        print(f"import of {clips:,} clips: local pool ({args.workers} processes) {pool:,.1f} clips/s; Ray, 2 nodes x "
              f"1 CPU {ray_rate:,.1f} clips/s -> Ray / pool {ray_rate / pool:.2f}x (outputs identical: {same})")

        proc, endpoint = start_s3()
        try:
            fs = s3fs.S3FileSystem(endpoint_url=endpoint)
            fs.mkdir("bench")
            fs.put(str(work / "pool") + "/", "bench/ds/", recursive=True)
            aug = {"brightness": 0.2, "contrast": 0.2, "mirror_prob": 0.5}
            disk_src = ClipSource(str(work / "pool"), "train", augment=aug)
            s3_src = ClipSource("s3://bench/ds", "train", augment=aug, storage_options={"endpoint_url": endpoint})
            disk, s3 = (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)
            for _ in range(args.repeat):
                disk = max(disk, loader_rate(disk_src, args.workers, args.batch, args.measure))
                s3 = max(s3, loader_rate(s3_src, args.workers, args.batch, args.measure, proc.pid))
        finally:
            proc.kill()
        result = {"clips": clips, "pool": pool, "ray": ray_rate, "disk": disk[0], "s3": s3[0],
                  "disk_per_worker_cpu_s": disk[1], "s3_per_worker_cpu_s": s3[1], "server_cpu_ms_per_get": 1e3 * s3[2]}
        print(json.dumps({k: round(v, 2) for k, v in result.items()}))
        print(f"loader cost per sample on the training node: {s3[1]:,.0f} samples per worker CPU-second from S3 vs "
              f"{disk[1]:,.0f} from disk ({s3[1] / disk[1]:.2f}x); the S3 server (moto, Python) spent "
              f"{1e3 * s3[2]:.1f} CPU-ms per ranged GET on these same cores")
        print(f"loader, {args.workers} workers, batch {args.batch}: local disk {disk[0]:,.1f} samples/s, local S3 "
              f"server {s3[0]:,.1f} samples/s -> S3 / local disk loader: {s3[0] / disk[0]:.2f}x (target >= 0.8)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
