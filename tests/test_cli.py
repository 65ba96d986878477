"""The `exaflop` command end to end: real subprocesses, one-line errors, non-zero exits."""

import os
import subprocess
import sys

import pytest

from exaflop.config import load_config
from exaflop.engine.trainer import train
from tests.conftest import REPO, tiny_overrides


def run(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "exaflop", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200"})


def one_line_error(r, needle):
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("cli")
    cfg = load_config("lm-tiny", tiny_overrides(tmp, data_dir, "cli", "train.steps=6"))
    train(cfg, quiet=True)
    return cfg.run_dir


def test_data_text_cli(tmp_path, corpus_dir):
    r = run("data", "text", "--source", str(corpus_dir), "--out", str(tmp_path / "d"), "--vocab", "300", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "train" in r.stderr and (tmp_path / "d" / "manifest.json").is_file()


@pytest.mark.parametrize("args, needle", [
    (["data", "text", "--source", "/nonexistent/corpus"], "does not exist"),
    (["data", "text", "--source", "{empty}"], "no usable text"),
    (["data", "text", "--source", "{corpus}", "--vocab", "50"], "too small"),
    (["train", "lm-tiny", "--set", "optim.lrr=1"], "unknown key 'optim.lrr'"),
    (["train", "lm-tiny", "--set", "model.n_layer=two"], "model.n_layer"),
    (["train", "lm-nope"], "no file or preset named 'lm-nope'"),
    (["train", "lm-tiny", "--set", "data.path=/nonexistent"], "no manifest.json"),
    (["sample", "/nonexistent/run"], "not a run directory"),
    (["train"], "the following arguments are required"),
    (["plot", "/nonexistent/run"], "no training metrics"),
])
def test_bad_input_is_one_clear_line(tmp_path, corpus_dir, args, needle):
    (tmp_path / "empty").mkdir()
    args = [a.replace("{empty}", str(tmp_path / "empty")).replace("{corpus}", str(corpus_dir)) for a in args]
    if args[0] == "data":
        args += ["--out", str(tmp_path / "out"), "--quiet"]
    one_line_error(run(*args, cwd=tmp_path), needle)


def test_sample_plot_and_long_prompt(tiny_run):
    r = run("sample", str(tiny_run), "--prompt", "import json", "--max-new-tokens", "12", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("import json") and len(r.stdout) > len("import json")
    again = run("sample", str(tiny_run), "--prompt", "import json", "--max-new-tokens", "12", "--seed", "1")
    assert again.stdout == r.stdout  # same seed, same text
    one_line_error(run("sample", str(tiny_run), "--prompt", "word " * 200), "does not fit the model's context")
    p = run("plot", str(tiny_run))
    assert p.returncode == 0, p.stderr
    png = tiny_run / "plots" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_resume_incompatible_via_cli(tiny_run, data_dir):
    r = run("train", str(tiny_run / "config.toml"), "--resume", "--set", "model.n_layer=3")
    one_line_error(r, "model.n_layer: checkpoint 2 vs config 3")


def test_help_lists_every_job():
    r = run("--help")
    for cmd in ("demo", "data", "train", "sample", "plot", "export", "serve", "plan"):
        assert cmd in r.stdout
