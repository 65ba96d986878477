"""/v1/drive/predict against a (tiny) trained driving run, served beside a language model."""

from __future__ import annotations

import csv
import json
import time

import httpx
import numpy as np
import pytest
import torch

http = httpx.Client(timeout=120)  # generous: CI machines can be busy

FRAMES, SIZE, K = 4, 32, 4


def _drive(root, name: str, seconds: float = 5.0, fps: float = 20.0, speed: float = 8.0) -> None:
    from exaflop.drive.video import write_video

    n = int(seconds * fps)
    u = np.arange(64)[None, :]
    frames = np.zeros((n, 48, 64, 3), np.uint8)
    for i in range(n):  # a moving gradient: compresses well, frames differ
        frames[i, :, :, 0] = (60 + (u + 3 * i) % 80).astype(np.uint8)
        frames[i, :, :, 1:] = 90
    root.mkdir(parents=True, exist_ok=True)
    write_video(root / f"{name}.mp4", frames, fps)
    t = np.arange(0, seconds + 1e-9, 0.02)
    with open(root / f"{name}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", "steering", "speed", "x", "y", "yaw"])
        for ti in t:
            w.writerow([f"{ti:.4f}", "0", f"{speed}", f"{speed * ti:.4f}", "0", "0"])


@pytest.fixture(scope="module")
def drive_run(tmp_path_factory):
    from exaflop.config import load_config
    from exaflop.drive.importers.clips import ImportOptions
    from exaflop.drive.importers.run import run_import
    from exaflop.engine.trainer import train

    root = tmp_path_factory.mktemp("drive")
    for i in range(3):
        _drive(root / "raw", f"d{i}")
    opts = ImportOptions(frames=FRAMES, fps=10.0, width=SIZE, height=SIZE, stride=2, waypoints=K, dt=0.5,
                         workers=0, val_fraction=0.34, clips_per_shard=8)
    run_import("generic", root / "raw", root / "data", opts, quiet=True)
    cfg = load_config("drive-tiny", [
        f"data.path={root / 'data'}", f"run.out_dir={root / 'runs'}", "run.name=pilot", "train.steps=2",
        f"model.frames={FRAMES}", f"model.height={SIZE}", f"model.width={SIZE}", f"model.waypoints={K}",
        "model.n_layer=1", "model.d_model=32", "model.n_head=2", "train.global_batch=4", "train.micro_batch=4",
        "checkpoint.every=2", "eval.every=1000", "eval.batches=1", "data.num_workers=0",
        "run.tensorboard=false", "run.dtype=fp32"])
    train(cfg, quiet=True)
    return root


@pytest.fixture(scope="module")
def both(drive_run, run_dir, start_server):
    return start_server([run_dir, drive_run / "runs" / "pilot"])


def test_models_list_both(both):
    data = http.get(both.url + "/v1/models").json()["data"]
    assert {m["id"] for m in data} == {"m", "pilot"}
    assert http.get(both.url + "/v1/models/pilot").json()["task"] == "drive"


def test_predict_from_json_frames(both):
    frames = np.random.default_rng(0).integers(0, 256, (FRAMES, SIZE, SIZE, 3)).tolist()
    r = http.post(both.url + "/v1/drive/predict", json={"model": "pilot", "frames": frames,
                                                         "speed": [8.0] * FRAMES})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["waypoints"]) == K and all(len(p) == 2 for p in body["waypoints"])
    assert len(body["steering"]) == K and body["checkpoint_step"] == 2


def test_predict_equals_the_model_in_process(both, drive_run):
    # The served answer is the model's own output, axis for axis: x forward, y left.
    from exaflop.engine.checkpoint import load_for_inference

    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    speed, steering = [7.0, 7.5, 8.0, 8.5], [10.0, 12.0, 14.0, 16.0]  # turning left: y clearly non-zero
    r = http.post(both.url + "/v1/drive/predict", json={"model": "pilot", "frames": frames.tolist(),
                                                         "speed": speed, "steering": steering})
    assert r.status_code == 200, r.text
    _, _, model = load_for_inference(drive_run / "runs" / "pilot")
    with torch.inference_mode():
        wp, steer = model(torch.from_numpy(frames).permute(0, 3, 1, 2)[None], torch.tensor([speed]),
                          torch.tensor([steering]))
    got = r.json()
    assert np.allclose(got["waypoints"], wp[0].numpy(), rtol=1e-5, atol=1e-5), (got["waypoints"], wp[0])
    assert np.allclose(got["steering"], steer[0].numpy(), rtol=1e-5, atol=1e-5)
    xs, ys = zip(*got["waypoints"], strict=True)
    assert abs(xs[-1] - ys[-1]) > 0.5  # so the comparison above would see a swap of the axes


def test_predict_from_mp4_upload(both, drive_run):
    clip = (drive_run / "raw" / "d0.mp4").read_bytes()
    r = http.post(both.url + "/v1/drive/predict", data={"model": "pilot", "speed": json.dumps([8.0] * FRAMES)},
                   files={"video": ("clip.mp4", clip, "video/mp4")})
    assert r.status_code == 200, r.text
    assert len(r.json()["waypoints"]) == K


@pytest.mark.parametrize("body", [
    {"model": "pilot", "frames": [[[[0, 0, 0]]]]},  # wrong shape
    {"model": "pilot", "frames": np.full((FRAMES, SIZE, SIZE, 3), 300).tolist()},  # not uint8
    {"model": "pilot", "frames": np.zeros((FRAMES, SIZE, SIZE, 3), int).tolist(), "speed": [1.0]},
    {"model": "pilot", "frames": [[1], 2]},  # ragged
    {"model": "pilot", "frame": []},  # unknown field
])
def test_bad_drive_requests_are_400(both, body):
    r = http.post(both.url + "/v1/drive/predict", json=body)
    assert r.status_code == 400 and r.json()["error"]["message"], r.text


def test_garbage_upload_and_wrong_model(both):
    r = http.post(both.url + "/v1/drive/predict", data={"model": "pilot"},
                   files={"video": ("clip.mp4", b"\0not a video" * 50, "video/mp4")})
    assert r.status_code == 400 and "video" in r.json()["error"]["message"]
    r = http.post(both.url + "/v1/drive/predict", json={"model": "m", "frames": [[[[0, 0, 0]]]]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_no_driving_run_is_404(server):
    r = http.post(server.url + "/v1/drive/predict", json={"model": "pilot", "frames": [[[[0, 0, 0]]]]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_drive_card_and_errors_by_value(both, drive_run):
    assert http.get(both.url + "/v1/models/pilot").json()["checkpoint_step"] == 2
    r = http.post(both.url + "/v1/drive/predict", json={"model": "m", "frames": [[[[0, 0, 0]]]]})
    err = r.json()["error"]
    assert err["param"] == "model" and "is a language model" in err["message"]
    r = http.post(both.url + "/v1/drive/predict", data={"model": ""},
                  files={"video": ("clip.mp4", b"x", "video/mp4")})
    assert r.status_code == 400 and r.json()["error"] == {
        "message": "Missing required parameter: model", "type": "invalid_request_error", "param": "model",
        "code": None}
    clip = (drive_run / "raw" / "d0.mp4").read_bytes()
    r = http.post(both.url + "/v1/drive/predict", data={"model": "pilot", "speed": "fast"},
                  files={"video": ("clip.mp4", clip, "video/mp4")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "speed"


def test_upload_uses_the_given_speed(both, drive_run):
    clip = (drive_run / "raw" / "d0.mp4").read_bytes()

    def ask(**fields) -> list:
        r = http.post(both.url + "/v1/drive/predict", data={"model": "pilot", **fields},
                      files={"video": ("clip.mp4", clip, "video/mp4")})
        assert r.status_code == 200, r.text
        return r.json()["waypoints"]
    speed = json.dumps([7.0, 7.5, 8.0, 8.5])
    plain = ask(speed=speed)
    assert ask(speed=json.dumps([2.0] * FRAMES)) != plain


def test_the_promoted_checkpoint_is_served_not_the_newest(drive_run, start_server):
    """RUN/promoted.json picks what a server watching the run serves: promoting the older
    checkpoint swaps it in within one poll, with every request answered during the swap."""
    import shutil
    import threading

    from exaflop.cli import main

    run = drive_run / "promo"
    shutil.copytree(drive_run / "runs" / "pilot", run)
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1
    older = run / "checkpoints" / "step_0000001"
    shutil.copytree(ckpts[0], older)  # a second, older checkpoint (same weights, another step)
    meta = json.loads((older / "meta.json").read_text())
    (older / "meta.json").write_text(json.dumps({**meta, "step": 1}))
    base = start_server([run], "--reload-interval", "0.2").url
    frames = np.zeros((FRAMES, SIZE, SIZE, 3), np.uint8).tolist()

    def step() -> int:
        r = http.post(f"{base}/v1/drive/predict", json={"model": "promo", "frames": frames})
        assert r.status_code == 200, r.text
        return r.json()["checkpoint_step"]

    assert step() == meta["step"]  # the newest, before any promotion
    failures, stop = [], threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                step()
            except AssertionError as e:  # any non-200 during the swap
                failures.append(str(e))

    t = threading.Thread(target=hammer)
    t.start()
    assert main(["drive", "promote", str(run), "step_0000001"]) == 0
    deadline = time.time() + 10
    while step() != 1:
        assert time.time() < deadline, "the promoted checkpoint was not picked up"
        time.sleep(0.05)
    stop.set()
    t.join()
    assert not failures, failures[:3]
    assert main(["drive", "promote", str(run), "step_0000099"]) == 2  # no such checkpoint


def test_recorded_requests_become_clips_once_telemetry_arrives(drive_run, start_server, tmp_path):
    """serve --drive-record-dir keeps requests that name a drive and a time, with the
    predictions; `exaflop data drive records` turns them into clips labelled by telemetry
    that arrives later, and skips (for now) a drive whose telemetry has not."""
    from exaflop.cli import main
    from exaflop.drive.source import ClipSource

    rec_dir = tmp_path / "records"
    server = start_server([drive_run / "runs" / "pilot"], "--drive-record-dir", str(rec_dir))
    from tests.drive.synth import frames as moving

    video = moving(40, width=SIZE, height=SIZE)  # 4 s at 10 fps, every frame different
    for k in range(FRAMES - 1, 31):  # one request per frame, the last T frames each time
        for drive in ("morning", "evening"):
            r = http.post(server.url + "/v1/drive/predict", json={
                "model": "pilot", "frames": video[k - FRAMES + 1:k + 1].tolist(), "speed": [8.0] * FRAMES,
                "drive_id": drive, "t": k / 10})
            assert r.status_code == 200, r.text
    r = http.post(server.url + "/v1/drive/predict", json={"model": "pilot", "frames": video[:FRAMES].tolist()})
    assert r.status_code == 200  # no drive_id: answered, not recorded
    bad = http.post(server.url + "/v1/drive/predict", json={"model": "pilot", "frames": video[:FRAMES].tolist(),
                                                             "drive_id": "../etc", "t": 1.0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "drive_id"
    server.stop()
    files = sorted(rec_dir.glob("*.jsonl"))
    assert len(files) == 1 and not list(rec_dir.glob("*.open"))  # closed at shutdown
    lines = [json.loads(x) for x in files[0].read_text().splitlines()]
    assert len(lines) == 2 * 28 and {x["drive_id"] for x in lines} == {"morning", "evening"}
    assert lines[0]["fps"] == 10.0 and len(lines[0]["prediction"]["waypoints"]) == K
    (rec_dir / "telemetry").mkdir()
    t = np.arange(0, 6.01, 0.05)
    (rec_dir / "telemetry" / "morning.csv").write_text(
        "t,steering,speed,x,y,yaw\n" + "".join(f"{x:.2f},0,8,{8 * x:.3f},0,0\n" for x in t))
    out = tmp_path / "clips"
    args = ["data", "drive", "records", str(rec_dir), "--out", str(out), "--size", f"{SIZE}x{SIZE}",
            "--frames", str(FRAMES), "--waypoints", str(K), "--dt", "0.5", "--stride", "2", "--val-fraction", "0",
            "--workers", "0", "--quiet"]
    assert main(args) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["items_ok"] == 1 and m["skipped"][0]["item"] == "rec-evening"
    assert "no telemetry yet" in m["skipped"][0]["reason"]
    src = ClipSource(str(out), "train")
    assert len(src) == 14  # frames 0..30 at stride 2, each with 2 s of future telemetry
    frames, tel, lab = src.read(3)
    for j, f in enumerate(frames):  # the frames the server was sent, in order (lossy, but these and no others)
        assert int(np.argmin([np.abs(f.astype(int) - v).mean() for v in video])) == 6 + j
    assert np.allclose(np.asarray(lab["waypoints"])[:, 0], 8 * 0.5 * np.arange(1, K + 1), atol=1e-3)
