"""`exaflop plan data`: the fleet-import sizing from a rate measured on this machine."""

import json

import numpy as np
import pytest

from exaflop.cli import main
from tests.drive import synth


def test_plan_data_sizes_an_import_from_a_measured_rate(capsys, tmp_path):
    """`exaflop plan data` imports one drive for real to measure its rate, then scales it;
    with --sample it measures one of the user's own recordings."""
    video, _ = synth.write_generic(tmp_path, "drive00", seconds=4.0)
    args = ["plan", "data", "--hours", "1000", "--cameras", "2", "--fps", "20", "--resolution", "320x240",
            "--codec", "h264", "--clip-size", "32x32", "--frames", "4", "--stride", "2", "--clips-per-shard", "100",
            "--wall-hours", "10", "--cores-per-node", "16", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    m, p = out["measured"], out["plan"]
    assert m["core_seconds_per_video_second"] > 0 and m["bytes_per_clip"] > 1500  # an mp4 + 3 tar headers
    assert m["clips_per_video_second"] == 10.0 / 2
    assert p["clips"] == 1000 * 3600 * 2 * 5.0 and p["shards"] == p["clips"] / 100
    assert p["bytes"] == pytest.approx(p["clips"] * m["bytes_per_clip"])
    core_hours = 1000 * 2 * m["core_seconds_per_video_second"]
    assert p["core_hours"] == pytest.approx(core_hours)
    assert p["nodes"] == int(np.ceil(core_hours / (10 * 16 * 0.9))) and p["wall_hours_on_nodes"] <= 10
    assert main([*args[:-1], "--sample", str(video), "--json"]) == 0
    assert "drive00.mp4 (a real recording)" in json.loads(capsys.readouterr().out)["measured"]["source"]
    assert main(["plan", "data", "--hours", "10", "--resolution", "1164"]) == 2
    assert "--resolution '1164': expected WIDTHxHEIGHT" in capsys.readouterr().err
