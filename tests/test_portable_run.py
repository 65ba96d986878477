"""A trained run is self-contained: copied elsewhere, with the training data gone, it samples,
exports and serves from any working directory, also from read-only storage."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from exaflop.config import load_config
from exaflop.engine.trainer import train
from tests.conftest import REPO, tiny_overrides

ENV = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


def exaflop(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "exaflop", *args], cwd=cwd, env=ENV, capture_output=True,
                         text=True, timeout=300)
    if check:
        assert out.returncode == 0, f"exaflop {' '.join(args)}:\n{out.stdout[-1500:]}\n{out.stderr[-2500:]}"
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir) -> Path:
    """A run trained on a private copy of the data, which is then deleted."""
    root = tmp_path_factory.mktemp("portable")
    data = root / "data"
    shutil.copytree(data_dir, data)
    cfg = load_config("lm-tiny", tiny_overrides(root, data, "port", "train.steps=3"))
    train(cfg, quiet=True)
    shutil.rmtree(data)
    return cfg.run_dir


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@contextlib.contextmanager
def read_only(path: Path):
    """A read-only view of `path`: a read-only bind mount where we may mount (root, which
    ignores file modes), else the write bits removed."""
    view = path.with_name(path.name + "-ro")
    view.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(path), str(view)], capture_output=True).returncode == 0
    if mounted and subprocess.run(["mount", "-o", "remount,bind,ro", str(view)],
                                  capture_output=True).returncode != 0:
        subprocess.run(["umount", str(view)], check=True)
        mounted = False
    if not mounted:
        view.rmdir()
        shutil.copytree(path, view)
        for p in [view, *view.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
    try:
        probe = view / ".write-probe"
        if mounted or os.geteuid() != 0:
            with pytest.raises(OSError):
                probe.write_text("x")
        yield view
    finally:
        if mounted:
            subprocess.run(["umount", str(view)], check=True)
            view.rmdir()
        else:
            for p in [view, *view.rglob("*")]:
                p.chmod(p.stat().st_mode | 0o200)
            shutil.rmtree(view)


def _serve_and_chat(run: Path, cwd: Path, log: Path) -> str:
    from openai import OpenAI

    from tests.serve.conftest import free_port

    port = free_port()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "exaflop", "serve", str(run), "--port", str(port),
                                 "--threads", "1", "--reload-interval", "0"], cwd=cwd, env=ENV,
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        r = client.completions.create(model=run.name, prompt="def f(", max_tokens=6, temperature=0)
        assert r.usage.completion_tokens >= 1
        return r.choices[0].text
    finally:
        proc.terminate()
        proc.wait(20)


def _use_everywhere(run: Path, tmp: Path) -> None:
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    out = exaflop("sample", str(run), "--prompt", "def f(", "--max-new-tokens", "8", "--seed", "1",
                  cwd=elsewhere)
    assert out.stdout.startswith("def f(") and len(out.stdout) > len("def f(")
    assert "older run" not in out.stderr  # no fallback to data.path was needed
    exaflop("export", str(run), str(tmp / "hf-out"), "--format", "hf", cwd=elsewhere)
    assert (tmp / "hf-out" / "tokenizer.json").is_file() and (tmp / "hf-out" / "config.json").is_file()
    pytest.importorskip("gguf")
    exaflop("export", str(run), str(tmp / "m.gguf"), "--format", "gguf", cwd=elsewhere)
    assert (tmp / "m.gguf").stat().st_size > 10_000
    _serve_and_chat(run, elsewhere, tmp / "serve.log")


def test_a_copied_run_works_without_its_data_from_another_directory(trained, tmp_path):
    assert (trained / "tokenizer" / "tokenizer.json").is_file()
    assert (trained / "tokenizer" / "manifest.json").is_file()
    copy = tmp_path / "box" / "lm"
    shutil.copytree(trained, copy)
    _use_everywhere(copy, tmp_path)


def test_a_read_only_run_is_served_and_sampled_and_nothing_is_written(trained, tmp_path):
    copy = tmp_path / "lm"
    shutil.copytree(trained, copy)
    before = _snapshot(copy)
    with read_only(copy) as view:
        _use_everywhere(view, tmp_path)
    assert _snapshot(copy) == before


def test_an_old_layout_run_loads_where_its_data_is_and_names_the_file_where_not(trained, tmp_path, data_dir):
    old = tmp_path / "runs" / "old"
    shutil.copytree(trained, old)
    shutil.rmtree(old / "tokenizer")  # what a run trained before this change looks like
    cfg_file = old / "config.toml"
    cfg_file.write_text("\n".join(f'path = "{data_dir}"' if line.startswith("path = ") else line
                                  for line in cfg_file.read_text().splitlines()) + "\n")
    out = exaflop("sample", str(old), "--max-new-tokens", "4", cwd=tmp_path)
    hint = [x for x in out.stderr.splitlines() if "older run" in x]
    assert len(hint) == 1 and "mkdir" in hint[0]  # one line: how to make it self-contained
    cfg_file.write_text(cfg_file.read_text().replace(str(data_dir), str(tmp_path / "gone")))
    out = exaflop("sample", str(old), "--max-new-tokens", "4", cwd=tmp_path, check=False)
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "tokenizer/tokenizer.json" in err[0] and "gone/tokenizer.json" in err[0]


def test_sft_from_a_copied_run_needs_no_data(trained, tmp_path):
    copy = tmp_path / "runs" / "base"
    shutil.copytree(trained, copy)
    exaflop("import", "run", str(copy), "--name", "chat", "--config", "lm-sft-tiny", "--out-dir",
            str(tmp_path / "runs"), cwd=tmp_path)
    exaflop("train", str(tmp_path / "runs" / "chat" / "config.toml"), "--resume", "--set", "train.steps=2",
            "--set", "run.tensorboard=false", "--set", "eval.batches=1", "--set", "train.micro_batch=2",
            "--set", "train.global_batch=2", cwd=tmp_path)
    assert (tmp_path / "runs" / "chat" / "tokenizer" / "tokenizer.json").is_file()
