"""Real torchrun launches on CPU with gloo, shared between tests to keep the suite short.

Every run trains the same tiny model (2 layers, d_model 64, seq 32, vocab 320) on a
small corpus made here, in fp32 so that layouts can be compared with a tight
tolerance, with global batch 8 in micro-batches of 2 (gradient accumulation on 1 and
2 data-parallel ranks). Launches that several tests read (the single-process
reference, the 2-process FSDP2 run with its checkpoints) are session fixtures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

from exaflop.engine.launch import torchrun_command

STEPS = 10
LOSS_TOL = 1e-3  # absolute, per step: fp32, only the order of reductions differs between layouts

BASE = ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.n_kv_head=2",
        "model.vocab_size=320", "model.seq_len=32", f"train.steps={STEPS}", "train.global_batch=8",
        "train.micro_batch=2", "train.log_every=1", "optim.warmup_steps=2", "run.dtype=fp32",
        "run.threads=1", "run.tensorboard=false", "eval.batches=2", "checkpoint.every=5"]


@dataclass
class Run:
    dir: Path
    rc: int
    log: str

    def losses(self) -> dict[int, float]:
        """Train loss by step; the last record wins (a restarted job logs some steps twice)."""
        out = {}
        for line in (self.dir / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec["kind"] == "train":
                out[rec["step"]] = rec["loss"]
        return out

    def records(self, kind: str) -> list[dict]:
        return [r for r in map(json.loads, (self.dir / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == kind]

    def samples(self) -> dict[int, list[list[int]]]:
        """step -> for each rank, the ids it consumed in the optimizer steps that survived.

        A restarted job appends to the same file from its checkpoint step on; a step number
        going backwards marks that, and the dead attempt's records from there on are dropped.
        """
        out: dict[int, list[list[int]]] = {}
        self.restarts: list[int] = []
        for f in sorted(self.dir.glob("samples_rank*.jsonl")):
            per_step: dict[int, list[int]] = {}
            prev = -1
            for rec in map(json.loads, f.read_text().splitlines()):
                s = rec["step"]
                if rec.get("discard"):  # an elastic group re-formed during step s: it ran again
                    per_step.pop(s, None)
                    continue
                if s < prev:
                    self.restarts.append(s)
                    per_step = {k: v for k, v in per_step.items() if k < s}
                per_step.setdefault(s, []).extend(rec["ids"])
                prev = s
            for s, ids in sorted(per_step.items()):
                out.setdefault(s, []).append(ids)
        return out


def _env(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "EXAFLOP_FAULT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    if fault:
        env["EXAFLOP_FAULT"] = fault
    return env


class Launcher:
    def __init__(self, root: Path, data: Path):
        self.root, self.data = root, data

    def overrides(self, name: str, extra: list[str]) -> list[str]:
        return [*BASE, f"data.path={self.data}", f"run.out_dir={self.root}", f"run.name={name}", *extra]

    def run(self, name: str, nproc: int, extra: list[str] = (), resume: bool = False,
            max_restarts: int = 0, fault: str | None = None, check: bool = True) -> Run:
        sets = self.overrides(name, list(extra))
        if nproc == 1:  # the plain entry point, no torchrun: what a laptop user runs
            cmd = [sys.executable, "-m", "exaflop.train", "lm-tiny", "--quiet"]
            for s in sets:
                cmd += ["--set", s]
            if resume:
                cmd.append("--resume")
        else:
            cmd = torchrun_command("lm-tiny", sets, nproc, max_restarts, resume, quiet=True)
        cmd.append("--record-samples")
        p = subprocess.run(cmd, env=_env(fault), capture_output=True, text=True, timeout=240)
        run = Run(self.root / name, p.returncode, p.stdout + p.stderr)
        if check:
            assert p.returncode == 0, f"{name} exited {p.returncode}:\n{run.log[-3000:]}"
        return run

    def fork(self, src: Run, name: str, steps: list[int]) -> Path:
        """A new run dir holding copies of `src`'s checkpoints at `steps` (latest = the last)."""
        dst = self.root / name / "checkpoints"
        dst.mkdir(parents=True)
        for s in steps:
            shutil.copytree(src.dir / "checkpoints" / f"step_{s:09d}", dst / f"step_{s:09d}")
        (dst / "latest").write_text(f"step_{steps[-1]:09d}\n")
        return dst


@pytest.fixture(scope="session")
def launcher(tmp_path_factory) -> Launcher:
    from exaflop.lm.shards import build_text_dataset

    root = tmp_path_factory.mktemp("dist")
    src = root / "corpus"
    src.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for mod in ("json", "logging", "email"):  # ~0.5 MB of real text, always installed
        for f in sorted((stdlib / mod).glob("*.py")):
            shutil.copy(f, src / f"{mod}_{f.name}")
    build_text_dataset(str(src), root / "data", vocab_size=300, quiet=True)
    return Launcher(root / "runs", root / "data")


@pytest.fixture(scope="session")
def reference(launcher) -> Run:
    """One process, the same global batch: what every layout must reproduce."""
    return launcher.run("reference", 1)


@pytest.fixture(scope="session")
def fsdp2(launcher) -> Run:
    """FSDP2 on 2 processes; its checkpoints at steps 5 and 10 feed the resume tests."""
    return launcher.run("fsdp2", 2, ["parallel.mode=fsdp"])


def assert_same_losses(run: Run, reference: Run, steps=None) -> None:
    got, want = run.losses(), reference.losses()
    steps = steps or sorted(want)
    diffs = {s: abs(got[s] - want[s]) for s in steps}
    assert max(diffs.values()) < LOSS_TOL, f"{run.dir.name}: loss differs from reference: {diffs}"


def assert_same_samples(run: Run, reference: Run, steps) -> None:
    """Each step's data-parallel ranks together consumed exactly the reference's samples."""
    got, want = run.samples(), reference.samples()
    for s in steps:
        ids = sorted(i for rank_ids in _dp_ranks(got[s]) for i in rank_ids)
        assert ids == sorted(want[s][0]), f"{run.dir.name}: step {s} consumed other samples"


def _dp_ranks(per_rank: list[list[int]]) -> list[list[int]]:
    # Tensor-parallel peers read the same samples: count each distinct slice once.
    out: list[list[int]] = []
    for ids in per_rank:
        if ids not in out:
            out.append(ids)
    return out
