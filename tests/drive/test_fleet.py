"""Fleet scale for real: imports written straight to a real S3-protocol server (moto's
standalone server on 127.0.0.1, through s3fs), the same import run as Ray tasks on a real
two-node Ray cluster that loses a node and its driver, training streamed from the bucket
with exact resume, and storage mistakes answered in one line."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from exaflop.cli import main
from exaflop.drive.source import ClipSource
from exaflop.errors import UserError

from . import synth

s3fs = pytest.importorskip("s3fs", reason="the s3 extra is not installed: pip install 'exaflop[s3]'")
pytest.importorskip("moto.server", reason="moto[server] (test extra) is not installed")

AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "fleet"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3(log: Path | None = None, enforce_auth: bool = False) -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process; `log` gets one access-log line per request."""
    port = _free_port()
    env = {**os.environ, **AWS}
    if enforce_auth:  # every request must carry a key moto knows: ours do not
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115  (the server owns it)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=out, stderr=out)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    saved = {k: os.environ.get(k) for k in AWS}
    os.environ.update(AWS)
    log = tmp_path_factory.mktemp("s3log") / "access.log"
    proc, endpoint = start_s3(log)
    s3fs.S3FileSystem(endpoint_url=endpoint).mkdir(BUCKET)
    yield endpoint, log
    proc.kill()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


CLIP = ["--size", "32x32", "--frames", "4", "--stride", "2", "--waypoints", "4", "--dt", "0.5",
        "--val-fraction", "0.25", "--clips-per-shard", "16", "--quiet"]


def import_args(raw: Path, out: str, *extra: str) -> list[str]:
    return ["data", "drive", "generic", str(raw), "--out", out, *CLIP, *extra]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Ten recorded drives and their import by the local path, in this process: the reference."""
    root = tmp_path_factory.mktemp("fleet")
    for i in range(10):
        synth.write_generic(root / "raw", f"drive{i:02d}", seed=i, seconds=9.0)
    assert main(import_args(root / "raw", str(root / "local"), "--workers", "0")) == 0
    return root, json.loads((root / "local" / "manifest.json").read_text())


def _to_s3(root: Path, endpoint: str, prefix: str = "pool") -> str:
    url = f"s3://{BUCKET}/{prefix}"
    if not _fs(endpoint).exists(f"{BUCKET}/{prefix}/manifest.json"):
        assert main(import_args(root / "raw", url, "--workers", "2", "--storage-option",
                                f"endpoint_url={endpoint}")) == 0
    return url


def same_data(a: dict, b: dict) -> None:
    """Two manifests describe the same dataset: everything but when and how it ran."""
    drop = ("created", "run")
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


def _fs(endpoint: str):
    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True, use_listings_cache=False)


def test_import_straight_to_object_storage_equals_local(s3, fleet):
    endpoint, log = s3
    root, ref = fleet
    _to_s3(root, endpoint)
    m = json.loads(_fs(endpoint).cat_file(f"{BUCKET}/pool/manifest.json"))
    same_data(m, ref)
    assert m["run"]["executor"] == "local pool (2 workers)" and ref["run"]["executor"].startswith("local pool (0")
    assert m["counts"]["clips"] > 100 and len(m["splits"]["val"]["items"]) >= 2
    fs = _fs(endpoint)
    for shard in ref["splits"]["train"]["shards"]:  # byte-identical shards
        assert fs.cat_file(f"{BUCKET}/pool/{shard['file']}") == (root / "local" / shard["file"]).read_bytes()
    assert not [p for p in fs.find(f"{BUCKET}/pool") if p.endswith(".tmp") or "probe" in p]


@pytest.mark.parametrize("presigned", ["1", "0"])
def test_loader_reads_each_clip_with_one_ranged_get(s3, fleet, presigned, monkeypatch):
    """Plain HTTP with a presigned URL per shard (the default for S3), and s3fs's own ranged
    reads (EXAFLOP_S3_PRESIGNED=0): either way one 206 per clip, never the whole tar."""
    monkeypatch.setenv("EXAFLOP_S3_PRESIGNED", presigned)
    endpoint, log = s3
    root, ref = fleet
    url = _to_s3(root, endpoint)
    remote = ClipSource(url, "train", storage_options={"endpoint_url": endpoint})
    local = ClipSource(str(root / "local"), "train")
    assert len(remote) == len(local)
    tar_gets = re.compile(r"GET /fleet/pool/\S+\.tar[ ?]")
    before = len(tar_gets.findall(log.read_text()))
    ids = [0, len(local) // 3, len(local) - 1, 5, 17]
    for i in ids:
        a, b = local[i], remote[i]
        assert all(np.array_equal(a[k], b[k]) for k in a)
    time.sleep(0.3)  # the server flushes its access log line after answering
    gets = [ln for ln in log.read_text().splitlines() if tar_gets.search(ln)][before:]
    assert len(gets) == len(ids) and all(" 206 " in ln for ln in gets), gets
    assert all(("X-Amz-Algorithm=AWS4-HMAC-SHA256" in ln) == (presigned == "1") for ln in gets), gets
    batch = remote.read_batch(ids)  # a batch: the same GETs, in flight together
    assert all(np.array_equal(batch["video"][j].numpy(), local[i]["video"]) for j, i in enumerate(ids))


def test_a_failed_read_is_retried_then_named(s3, fleet, tmp_path):
    root, _ = fleet
    proc, endpoint = start_s3()
    fs = _fs(endpoint)
    fs.mkdir("gone")
    fs.put(str(root / "local") + "/", "gone/ds/", recursive=True)
    quick = {"endpoint_url": endpoint, "config_kwargs": {"retries": {"max_attempts": 1}}}
    src = ClipSource("s3://gone/ds", "train", storage_options=quick)
    src[0]
    proc.kill()
    proc.wait()
    t0 = time.time()
    with pytest.raises(UserError) as e:
        src[3]
    msg = str(e.value)
    assert "\n" not in msg and "s3://gone/ds/train/" in msg and repr(src.keys[3]) in msg, msg
    assert "after 4 attempts" in msg and "endpoint" in msg and time.time() - t0 > 1.5  # backed off


def test_storage_mistakes_are_one_line_and_write_nothing(s3, fleet, capsys):
    endpoint, _ = s3
    root, _ = fleet
    base = ["data", "drive", "generic", str(root / "raw"), "--quiet", "--size", "32x32", "--frames", "4"]
    auth_proc, auth_endpoint = start_s3(enforce_auth=True)
    try:
        cases = {
            "does not exist": ["--out=s3://no-such-bucket/x", f"--storage-option=endpoint_url={endpoint}"],
            "access denied": [f"--out=s3://{BUCKET}/denied", f"--storage-option=endpoint_url={auth_endpoint}"],
            "cannot reach": [f"--out=s3://{BUCKET}/x", "--storage-option=endpoint_url=http://127.0.0.1:9"],
        }
        for want, extra in cases.items():
            code = main([*base, *extra])
            err = capsys.readouterr().err.strip()
            assert code == 2 and want in err and "\n" not in err, (want, err)
            assert extra[0].removeprefix("--out=") in err
            assert ("AWS_ACCESS_KEY_ID" in err) == (want == "access denied")
            assert ("endpoint_url" in err) == (want == "cannot reach")
    finally:
        auth_proc.kill()
    assert not _fs(endpoint).exists(f"{BUCKET}/x/manifest.json")
    assert main([*base, "--out", f"s3://{BUCKET}/bad", "--storage-option", "endpoint_url"]) == 2
    assert "--storage-option 'endpoint_url': expected KEY=VALUE" in capsys.readouterr().err


def _items(fs, prefix: str) -> int:
    try:
        return len(fs.ls(f"{BUCKET}/{prefix}/items", refresh=True))
    except FileNotFoundError:
        return 0


def _wait_items(fs, prefix: str, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while _items(fs, prefix) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no progress on the Ray cluster"
        time.sleep(0.05)


def _lose_node(cluster, node) -> None:
    """The node is gone at once, as when its machine dies: its raylet and every worker process
    under it are SIGKILLed. (Ray's remove_node kills the raylet; a worker busy in a task lives on
    until it notices, and may finish the task and hand back a small result directly to its
    owner: then nothing fails, which is not what a lost machine does.)"""
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    for pid in _descendants(raylet):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cluster.remove_node(node, allow_graceful=False)


def _descendants(pid: int) -> list[int]:
    """Every process under `pid`, from /proc (Linux)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:  # the field after the parenthesised command is the state, then the parent pid
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [pid]
    while todo:
        here = todo.pop()
        kids = [c for c, p in parent.items() if p == here]
        out += kids
        todo += kids
    return out


def _settled_items(fs, prefix: str, quiet: float, timeout: float = 60) -> int:
    """The item count once it has not changed for `quiet` seconds."""
    deadline = time.time() + timeout
    n, since = _items(fs, prefix), time.time()
    while time.time() - since < quiet:
        assert time.time() < deadline, "items kept landing after the driver was killed"
        time.sleep(0.1)
        now = _items(fs, prefix)
        if now != n:
            n, since = now, time.time()
    return n


def test_ray_import_survives_a_killed_driver_and_a_lost_node(s3, fleet):
    """A head and a second node with one CPU each. The first driver is killed mid-import; the
    rerun skips the finished drives, loses the second node while its tasks run, retries them
    on the head, and the result equals the local import: nothing missing, nothing twice."""
    ray_cluster = pytest.importorskip("ray.cluster_utils", reason="the ray extra is not installed")
    endpoint, _ = s3
    root, ref = fleet
    cluster = ray_cluster.Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        fs, prefix = _fs(endpoint), "ray"
        cmd = [sys.executable, "-m", "exaflop", *import_args(root / "raw", f"s3://{BUCKET}/{prefix}",
               "--storage-option", f"endpoint_url={endpoint}", "--ray", cluster.address)]
        # Every item held 1.5 s (a drill, engine/faults.py): a node removed while the rerun runs
        # is surely executing one. Without it a CI run lost the race: the second node was still
        # starting its worker, Ray quietly moved the pending task, and nothing was retried.
        env = {**os.environ, "EXAFLOP_IMPORT_FAULT": "slow:1.5"}
        first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        # Killed after its first item: most of the work is left for the rerun, so both nodes are
        # busy when the second node goes.
        _wait_items(fs, prefix, 1, first)
        first.send_signal(signal.SIGKILL)
        first.wait()
        # The dead driver's tasks may still finish an item or two: wait until nothing new lands,
        # so the rerun's own items (not these) say when both nodes are at work.
        kept = _settled_items(fs, prefix, quiet=3.0)
        assert kept < 10 and not fs.exists(f"{BUCKET}/{prefix}/manifest.json")
        second = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        # Two more items: both nodes have started workers. They finish in step (same start, same
        # 1.5 s hold), so wait half an item more: the node goes in the middle of its next one,
        # not in the instant between two (where Ray moves the pending task without an error).
        _wait_items(fs, prefix, kept + 2, second)
        time.sleep(0.8)
        at_removal = _items(fs, prefix)
        _lose_node(cluster, worker)
        _, err = second.communicate(timeout=240)
        assert second.returncode == 0, err
        m = json.loads(fs.cat_file(f"{BUCKET}/{prefix}/manifest.json"))
        same_data(m, ref)  # same clips, splits, shard checksums and counts as the local import
        assert m["run"]["resumed_items"] >= 1
        retried = m["run"]["retries"]
        assert retried, f"nothing retried: kept {kept}, {at_removal} items at the removal, run {m['run']}"
        assert all("NodeDied" in r["reason"] or "Worker" in r["reason"] for r in retried), retried
        # Nothing twice: exactly the reference's shard objects, no leftovers.
        files = sorted(p.split(f"{prefix}/", 1)[1] for p in fs.find(f"{BUCKET}/{prefix}") if p.endswith(".tar"))
        assert files == sorted(s["file"] for sp in ("train", "val") for s in ref["splits"][sp]["shards"])
    finally:
        cluster.shutdown()


def test_training_streams_from_object_storage_with_exact_resume(s3, fleet, tmp_path):
    from exaflop.config import load_config
    from exaflop.engine.telemetry import read_metrics
    from exaflop.engine.trainer import train

    endpoint, _ = s3
    root, _ = fleet
    url = _to_s3(root, endpoint)
    common = ["model.frames=4", "model.height=32", "model.width=32", "model.waypoints=4", "model.n_layer=1",
              "model.d_model=32", "model.n_head=2", "train.steps=6", "eval.every=0", "checkpoint.every=3",
              "run.tensorboard=false", "train.log_every=1", "train.global_batch=8", "train.micro_batch=8", "data.num_workers=1",
              f"run.out_dir={tmp_path}"]

    def losses(name: str) -> list[float]:
        return [r["loss"] for r in read_metrics(tmp_path / name) if r["kind"] == "train"]

    def samples(name: str) -> list[dict]:
        return [json.loads(x) for x in (tmp_path / name / "samples_rank0.jsonl").read_text().splitlines()]

    train(load_config("drive-tiny", [*common, f"data.path={root / 'local'}", "run.name=disk"]), quiet=True,
          record_samples=True)
    s3_set = [*common, f"data.path={url}", f"data.storage_options.endpoint_url={endpoint}", "run.name=s3"]
    first = train(load_config("drive-tiny", [*s3_set, "train.stop_after=3"]), quiet=True, record_samples=True)
    assert first["step"] == 3 and first["stopped_early"]
    train(load_config("drive-tiny", s3_set), resume=True, quiet=True, record_samples=True)
    # The same samples in the same order, across the resume: exactly.
    assert [r["step"] for r in samples("s3")] == list(range(6)) and samples("s3") == samples("disk")
    # And the same training. The losses equal to fp32 rounding, not bit for bit: the two runs are
    # separate model instances (one reloaded from a checkpoint), and CPU GEMM kernels may round a
    # reduction differently with their buffers' addresses (CI once saw step 5 differ by one ulp:
    # 131.00360 vs 131.00362).
    assert len(losses("disk")) == 6
    assert losses("s3") == pytest.approx(losses("disk"), rel=1e-5, abs=0)

