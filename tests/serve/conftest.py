"""A tiny trained language model, and real `exaflop serve` processes on 127.0.0.1.

The model is trained once per session (a few seconds); each server is a separate
process started through the real CLI, so the tests see exactly what users see.
"""

from __future__ import annotations

import json as jsonlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

MODEL = "m"
API_KEYS = ["key-alpha", "key-bravo", "key-charlie"]


def make_data(root: Path) -> Path:
    """Shards + tokenizer from the stdlib `json` package sources (fixed per Python version)."""
    from exaflop.lm.shards import build_text_dataset

    src, data = root / "corpus", root / "data"
    src.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted(Path(jsonlib.__file__).parent.glob("*.py"))):
        (src / f"{i}.txt").write_text(f.read_text())
    build_text_dataset(str(src), str(data), vocab_size=300, quiet=True)
    return data


def train_tiny(root: Path, data: Path, steps: int = 5, resume: bool = False) -> Path:
    """Train (or continue) the test model under root/runs/m; returns the run directory."""
    from exaflop.config import load_config
    from exaflop.engine.trainer import train

    cfg = load_config("lm-tiny", [
        f"data.path={data}", f"run.out_dir={root / 'runs'}", f"run.name={MODEL}", f"train.steps={steps}",
        "model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.n_kv_head=2", "model.seq_len=128",
        "model.vocab_size=300", "train.global_batch=2", "train.micro_batch=2", f"checkpoint.every={steps}",
        "eval.every=1000", "eval.batches=1", "run.tensorboard=false", "run.dtype=fp32"])
    train(cfg, resume=resume, quiet=True)
    run = root / "runs" / MODEL
    # Serve with a longer context than training used (cheap to train, long streams to test):
    # RoPE has no learned positions, so the checkpoint loads unchanged.
    toml = run / "config.toml"
    toml.write_text(toml.read_text().replace("seq_len = 128", "seq_len = 1024"))
    return run


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve-model")
    train_tiny(root, make_data(root))
    return root


@pytest.fixture(scope="session")
def run_dir(model_root) -> Path:
    return model_root / "runs" / MODEL


@pytest.fixture(scope="session")
def tokenizer(model_root):
    from exaflop.lm.tokenizer import load_tokenizer

    return load_tokenizer(model_root / "data" / "tokenizer.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, runs: list[Path], log: Path, *args: str, env: dict | None = None):
        self.runs, self.args, self.log = runs, args, log
        self.env = {k: v for k, v in os.environ.items() if k != "EXAFLOP_API_KEYS"}
        self.env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
        self._launch()

    def _launch(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "exaflop", "serve", *map(str, self.runs), "--port", str(self.port),
               # fp32 unless a test asks otherwise: batched == one-at-a-time holds bit for bit
               # only in fp32 (bf16 matmuls round differently at different batch shapes).
               # Eager unless a test asks (`--compile` later on the line wins): a compile per server
               # would cost every test seconds of CPU (tests/serve/test_serve_compile.py compiles).
               "--threads", "1", "--dtype", "fp32", "--compile", "off", *self.args]
        self._logf = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._logf, stderr=subprocess.STDOUT, env=self.env)

    def wait_ready(self, timeout: float = 90) -> ServerProcess:
        deadline = time.monotonic() + timeout
        retries = 3
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log.read_text()
                # free_port() frees the port before the server binds it: a process of another test
                # worker may take it in between. Then start again on another port.
                if "address already in use" in log and retries > 0:
                    retries -= 1
                    self._logf.close()
                    self._launch()
                    continue
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{log}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._logf.close()

    def metrics(self, headers: dict | None = None) -> dict[str, float]:
        """Prometheus samples as {'name{labels}': value}."""
        text = httpx.get(self.url + "/metrics", headers=headers, timeout=120).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


@pytest.fixture(scope="session")
def server(run_dir, tmp_path_factory):
    """The open (loopback, no keys) server most tests use."""
    s = ServerProcess([run_dir], tmp_path_factory.mktemp("logs") / "main.log", "--max-running", "32")
    yield s.wait_ready()
    s.stop()


@pytest.fixture(scope="session")
def guarded_server(run_dir, tmp_path_factory):
    """Keys from a file and the environment, tight rate limit, tiny caps and body limit."""
    d = tmp_path_factory.mktemp("guarded")
    (d / "keys.txt").write_text("# test keys\nkey-alpha\nkey-bravo\n")
    s = ServerProcess([run_dir], d / "server.log", "--api-key-file", str(d / "keys.txt"),
                      "--rate-limit-rpm", "4", "--max-running", "1", "--max-queue", "1",
                      "--max-body-mb", "0.01", env={"EXAFLOP_API_KEYS": "key-charlie"})
    yield s.wait_ready()
    s.stop()


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """Factory for tests that need their own server (stopped at the end of the session)."""
    started = []

    def start(runs: list[Path], *args: str, env: dict | None = None, timeout: float = 90) -> ServerProcess:
        s = ServerProcess(runs, tmp_path_factory.mktemp("own") / "server.log", *args, env=env)
        started.append(s)
        return s.wait_ready(timeout)

    yield start
    for s in started:
        s.stop()


@pytest.fixture()
def reload_run(model_root, tmp_path) -> Path:
    """A private copy of the model's run (data shared), for tests that write checkpoints."""
    root = tmp_path / "reload"
    (root / "runs").mkdir(parents=True)
    shutil.copytree(model_root / "runs" / MODEL, root / "runs" / MODEL)
    return root
