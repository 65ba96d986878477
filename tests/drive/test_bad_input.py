"""Bad input is skipped, counted and listed; past --max-bad-fraction the import stops."""

import json

import av
import numpy as np
import pytest

from exaflop.drive.importers.run import run_import
from exaflop.errors import UserError

from . import synth


def _csv_rows(path, mutate):
    lines = path.read_text().splitlines()
    path.write_text("\n".join(mutate(lines)) + "\n")


@pytest.fixture
def bad_folder(tmp_path):
    raw = tmp_path / "raw"
    synth.write_generic(raw, "good")
    # corrupt: not a video at all
    _, tel = synth.write_generic(raw, "corrupt")
    (raw / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    # truncated: the MP4 index (moov) is cut off
    video, _ = synth.write_generic(raw, "truncated")
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 2])
    # unsupported codec: Motion-JPEG in Matroska
    synth.write_generic(raw, "mjpeg")
    (raw / "mjpeg.mp4").unlink()
    with av.open(str(raw / "mjpeg.mkv"), "w") as c:
        s = c.add_stream("mjpeg", rate=20)
        s.width, s.height, s.pix_fmt = 64, 48, "yuvj420p"
        for f in synth.frames(60):
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    # too short for one clip (0.5 s of video)
    synth.write_generic(raw, "short", seconds=0.5)
    # telemetry problems
    _, tel = synth.write_generic(raw, "gap")
    _csv_rows(tel, lambda ls: ls[:100] + ls[200:])  # 2 s hole
    _, tel = synth.write_generic(raw, "nan")
    _csv_rows(tel, lambda ls: ls[:50] + [ls[50].replace(ls[50].split(",")[2], "nan")] + ls[51:])
    _, tel = synth.write_generic(raw, "backwards")
    _csv_rows(tel, lambda ls: ls[:60] + [ls[61], ls[60]] + ls[62:])
    # telemetry on another clock: 100 s after the video
    _, tel = synth.write_generic(raw, "nooverlap")
    _csv_rows(tel, lambda ls: [ls[0]] + [f"{float(r.split(',')[0]) + 100:.6f}," + r.split(",", 1)[1] for r in ls[1:]])
    # a video without telemetry
    synth.write_generic(raw, "orphan")
    (raw / "orphan.csv").unlink()
    return raw


EXPECT = {
    "corrupt": "cannot open video",
    "truncated": "cannot open video",
    "mjpeg": "unsupported codec 'mjpeg'",
    "short": "one clip needs",
    "gap": "gap.csv: telemetry gap of 2.02 s",
    "nan": "nan.csv: telemetry column 'speed': NaN/inf at row 49",
    "backwards": "not increasing at row 60",
    "nooverlap": "do not overlap in time",
    "orphan": "no telemetry; expected orphan.csv",
}


def test_each_bad_input_is_skipped_with_a_reason(bad_folder, tmp_path, opts):
    opts.max_bad_fraction = 1.0
    m = run_import("generic", bad_folder, tmp_path / "out", opts, quiet=True)
    assert m["counts"]["items_ok"] == 1 and m["counts"]["items_skipped"] == len(EXPECT)
    reasons = {s["item"]: s["reason"] for s in m["skipped"]}
    for item, text in EXPECT.items():
        assert text in reasons[item], (item, reasons[item])
    assert "mjpeg.mkv" in reasons["mjpeg"]  # names the file and the codec
    saved = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert saved["status"] == "complete" and len(saved["skipped"]) == len(EXPECT)


def test_too_many_bad_items_stop_the_import_with_a_summary(bad_folder, tmp_path, opts):
    opts.max_bad_fraction = 0.3
    with pytest.raises(UserError, match=r"import stopped: \d+ of 10 items are bad .*--max-bad-fraction 0.3"):
        run_import("generic", bad_folder, tmp_path / "out", opts, quiet=True)
    saved = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert saved["status"] == "stopped" and saved["skipped"]


def test_incomplete_comma_segment_lists_missing_files(tmp_path, opts):
    chunk = tmp_path / "Chunk_2"
    synth.write_comma_segment(chunk, "aaaa|2018-01-01--00-00-00", 1)
    seg = synth.write_comma_segment(chunk, "bbbb|2018-01-01--00-00-00", 2)
    (seg / "processed_log" / "CAN" / "speed" / "value").unlink()
    (seg / "global_pose" / "frame_times").write_bytes(b"not numpy")
    opts.max_bad_fraction = 1.0
    m = run_import("comma2k19", tmp_path, tmp_path / "out", opts, quiet=True)
    (reason,) = [s["reason"] for s in m["skipped"]]
    assert "missing processed_log/CAN/speed/value" in reason and "expected video.hevc" in reason
    seg2 = synth.write_comma_segment(chunk, "cccc|2018-01-01--00-00-00", 3)
    (seg2 / "global_pose" / "frame_times").write_bytes(b"not numpy")
    m = run_import("comma2k19", tmp_path, tmp_path / "out2", opts, quiet=True)
    assert any("frame_times: not a readable NumPy array" in s["reason"] for s in m["skipped"])
