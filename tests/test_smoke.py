"""The main job and every benchmark run end to end at a tiny size (numbers are not checked:
benchmarks measure speed, tests do not; what must hold is that each script still runs and
prints its comparison)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = sorted((ROOT / "bench").glob("*.py"))
# The line each benchmark ends with: the ratio against its peer or the machine's limit.
LAST_WORDS = {
    "checkpoint_io": "load / torch.load:",
    "dist_memory": "FSDP2/DDP per-rank state memory:",
    "dist_scaling": "scaling efficiency:",
    "elastic": "extra time lost, restart / shrink:",
    "import_scale": "S3 / local disk loader:",
    "kv_layout": "paged / dense step time: median",
    "linear_f32": "exaflop / MKL",
    "linear_row": "one-row / ",
    "moe_ep": "step-time ratio ep=2 / ep=1:",
    "moe_layer": "bf16: grouped",
    "pipeline": "PP=2 / DP=2 tokens/s:",
    "precision": "auto / faster of fp32 and bf16:",
    "serve_abuse": "5xx in /metrics",
    "serve_load": "round 1: exaflop, concurrency 2:",
    "serve_prefix": "cached / cold TTFT:",
    "serve_structured": "constrained / free:",
    "serve_vs_llama_server": "(tok/s ratio: of the medians, and the median of each repetition",
    "train_throughput": "ratio exaflop eager / peer eager:",
    "video_loader": "fed by the loader",
}


def test_every_benchmark_has_a_smoke_run():
    assert {b.stem for b in BENCH} == set(LAST_WORDS), "a new bench/ script needs --tiny and a line here"


@pytest.mark.parametrize("script", BENCH, ids=[b.stem for b in BENCH])
def test_benchmark_runs_at_a_tiny_size(script, tmp_path):
    if script.stem == "serve_vs_llama_server" and not (os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")):
        pytest.skip("no llama-server binary ($LLAMA_SERVER or PATH; bench/serve_vs_llama_server.py --build makes one)")
    args = [sys.executable, str(script), "--tiny"]
    if script.stem == "video_loader":
        args += ["--data", str(tmp_path / "drive")]
    if script.stem == "serve_load":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args += ["--port", str(s.getsockname()[1])]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if script.stem == "linear_f32":  # its kernel runs where PyTorch dispatches to AVX2: hold this one there
        env.update(MKL_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert LAST_WORDS[script.stem] in done.stdout, done.stdout[-3000:]


def test_demo_rehearsal_runs_the_whole_job(tmp_path):
    pytest.importorskip("highway_env")  # the [sim] extra: the driving half
    done = subprocess.run([sys.executable, "-m", "exaflop", "demo", "--steps", "10", "--episodes", "3",
                           "--corpus-bytes", "2000000", "--out", "runs", "--data", "data"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    out = done.stdout + done.stderr  # rich's console writes to stderr
    for line in ("val loss", "unigram", "sample:", "ADE", "closed loop", "model - constant velocity", "demo finished",
                 "a rehearsal"):
        assert line in out, out[-3000:]
    runs = tmp_path / "runs"
    for run in ("lm-tiny", "drive-tiny"):
        steps = [json.loads(x)["step"] for x in (runs / run / "metrics.jsonl").read_text().splitlines()
                 if json.loads(x)["kind"] == "train"]
        assert max(steps) == 10
    assert list((runs / "lm-tiny" / "plots").glob("*.png"))
    assert (runs / "drive-tiny" / "render" / "contact_sheet.png").stat().st_size > 10_000
    assert (runs / "drive-tiny" / "closed_loop" / "closed_loop.png").stat().st_size > 5_000
