"""Every command in the README's fenced blocks either runs from a clean checkout or says why not.

The commands are read from README.md itself, so a new or changed command must be
classified here: run (with size overrides that keep it cheap, appended so the README's
own flags are still parsed), or skipped with the reason (downloaded data, a GPU, a
cluster, or a test elsewhere that runs it for real).

They run one after another in a fresh directory, each through the CLI's entry point in this
process (`exaflop.cli.main`, what the `exaflop` script calls; the first one through
`python -m exaflop`, as a user would): a new interpreter for each would spend ~2 s of CPU
importing torch before doing anything, ~45 s of this test. `exaflop serve` runs as its own
process, as a server does.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO

EXAFLOP = [sys.executable, "-m", "exaflop"]

SMALL_LM = ["--set", "train.steps=3", "--set", "eval.batches=1", "--set", "run.tensorboard=false",
            "--set", "checkpoint.every=0", "--set", "eval.every=0"]
# What each runnable command gets appended (first matching prefix wins).
CHEAP = [
    ("exaflop data text --source docs/", []),
    ("exaflop data text", ["--max-bytes", "1500000", "--quiet"]),
    ("exaflop train lm-tiny --resume", ["--set", "train.steps=4"]),
    ("exaflop train lm-tiny --nproc", None),
    ("exaflop train lm-small", [*SMALL_LM, "--set", "model.n_layer=1"]),
    ("exaflop train lm-sft-tiny", SMALL_LM),
    ("exaflop train lm-tiny", SMALL_LM),
    ("exaflop data drive sim", ["--episodes", "3", "--seconds", "6", "--quiet"]),
    ("exaflop train drive-tiny", ["--set", "train.steps=2", "--set", "eval.batches=1",
                                  "--set", "run.tensorboard=false", "--set", "data.num_workers=0"]),
    ("exaflop drive render", ["--clips", "2"]),
    ("exaflop drive closed-loop", ["--episodes", "1", "--seconds", "4", "--policies", "model,constant-velocity"]),
    ("exaflop sample", ["--max-new-tokens", "8"]),
    ("exaflop plot", []),
    ("exaflop serve runs/lm-tiny", []),
    ("exaflop export", []),
    ("exaflop import hf", []),
    ("exaflop plan data", ["--resolution", "320x240"]),  # measures a smaller drive: seconds
    ("exaflop plan", []),
]
SKIP = {
    "make demo": "the main job itself (minutes; measured in docs/benchmarks.md); each of its steps runs here as its own README command",
    "make test": "this suite",
    "python -m venv": "GPU install: needs a CUDA wheel index",
    "pip install": "GPU install: needs a CUDA wheel index",
    "exaflop data text --source corpus.jsonl": "the user's own corpus",
    "exaflop train lm-tiny --nproc": "torchrun process groups: tests/dist/ launches these for real",
    "torchrun --nnodes 16": "a 16-node cluster",
    "-m exaflop.train": "a 16-node cluster",
    "exaflop data drive comma2k19 /data": "downloaded dataset (tests/drive/test_importers.py uses its layout)",
    "exaflop data drive udacity /data": "downloaded dataset (tests/drive/test_importers.py uses its layout)",
    "exaflop data drive generic /data": "downloaded dataset (tests/drive/test_importers.py uses its layout)",
    "exaflop drive engine": "minutes per round: tests/drive/test_train_e2e.py runs a round end to end",
    "s3://fleet/": "object storage and a Ray cluster: tests/drive/test_fleet.py runs these commands against a "
                   "moto S3 server and a two-node ray.cluster_utils.Cluster on 127.0.0.1",
    "EXAFLOP_API_KEYS=": "binds 0.0.0.0: tests/serve/ covers keys on 127.0.0.1",
}
# Placeholders the README uses for the user's own files, and what stands in for them here.
PLACEHOLDERS = {"path/to/llama-dir": "hf-out"}


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                cmds.append(line)
    return cmds


def classify(cmd: str) -> tuple[str, list[str] | str]:
    for prefix, why in SKIP.items():
        if cmd.startswith(prefix) or prefix in cmd:
            return "skip", why
    for prefix, extra in CHEAP:
        if cmd.startswith(prefix):
            return "run", extra
    return "unknown", ""


def test_every_readme_command_is_classified():
    cmds = readme_commands()
    assert len(cmds) >= 25, cmds  # the parser found the blocks
    unknown = [c for c in cmds if classify(c)[0] == "unknown"]
    assert not unknown, f"README commands with no entry in tests/test_readme.py: {unknown}"
    assert not [r for r in ("../shared", "shared/planner") if r in (REPO / "README.md").read_text()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_until_healthy(argv: list[str], cwd: Path, env: dict) -> None:
    if "--port" in argv:  # the README's --port 8000 may be taken here: use a free one
        i = argv.index("--port")
        del argv[i:i + 2]
    port = _free_port()
    argv = [*argv, "--port", str(port)]
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError("exaflop serve never became healthy")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _run_in_process(argv: list[str], cwd: Path, capfd) -> tuple[int, str]:
    """`exaflop <argv>` through cli.main, in `cwd`; what a command changes in the process (the
    working directory, the environment, torch's threads) is put back after it."""
    import torch

    from exaflop.cli import main

    env, threads, here = dict(os.environ), torch.get_num_threads(), os.getcwd()
    os.chdir(cwd)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(threads)
    out = capfd.readouterr()
    return code, out.out[-2000:] + "\n" + out.err[-3000:]


def test_readme_commands_run_from_a_clean_checkout(tmp_path, capfd, monkeypatch):
    pytest.importorskip("highway_env")
    pytest.importorskip("transformers")
    work = tmp_path / "clone"
    work.mkdir()
    for folder in ("docs", "configs"):  # README paths are relative to the checkout (docs/, configs/)
        shutil.copytree(REPO / folder, work / folder)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    env = dict(os.environ)
    ran = []
    for cmd in readme_commands():
        kind, extra = classify(cmd)
        if kind != "run":
            continue
        for old, new in PLACEHOLDERS.items():
            cmd = cmd.replace(old, new)
        args = shlex.split(cmd)[1:] + list(extra)
        if cmd.startswith("exaflop serve"):
            _serve_until_healthy([*EXAFLOP, *args], work, env)
        elif not ran:
            out = subprocess.run([*EXAFLOP, *args], cwd=work, env=env, capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        else:
            code, out = _run_in_process(args, work, capfd)
            assert code == 0, f"{cmd}\n{out}"
        ran.append(cmd)
    assert len(ran) >= 20, ran
    assert (work / "runs/lm-tiny/plots/loss.png").is_file()
    assert (work / "out.safetensors").is_file() and (work / "model.gguf").is_file()
    assert (work / "runs/drive-tiny/render").is_dir()
