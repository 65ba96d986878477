"""Checkpoints: torch.distributed.checkpoint directories, written atomically.

    checkpoints/step_000100/   DCP shards (*.distcp, .metadata), rng_rank*.pt, meta.json
    checkpoints/latest         text file naming the newest complete checkpoint

A checkpoint is first written to `.tmp-step_000100/`; only when every rank has
finished is it renamed into place, then `latest` is replaced by rename. A crash
or full disk at any point leaves the previous checkpoint and `latest` valid.
`meta.json` lists every file with its size, so a truncated or missing shard is
detected on load and the previous complete checkpoint is used instead.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from exaflop.errors import UserError

# Optimizer state keyed by parameter name ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"): it
# loads into any grouping of the parameters, and the optimizer groups by DeviceMesh
# (engine/optim.py), which depends on the layout (expert-parallel weights on their own mesh).
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:09d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint dirs, newest first (by step)."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")]
    return sorted(dirs, key=lambda p: int(p.name.split("_")[1]), reverse=True)


def verify(ckpt: Path) -> str | None:
    """None if every file recorded in meta.json is present with its size, else the problem."""
    meta_path = ckpt / "meta.json"
    if not meta_path.is_file():
        return f"{ckpt}: meta.json missing (the write did not finish)"
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return f"{meta_path}: not valid JSON"
    for name, size in meta.get("files", {}).items():
        f = ckpt / name
        if not f.is_file():
            return f"{ckpt}: shard {name} is missing"
        if f.stat().st_size != size:
            return f"{ckpt}: shard {name} is truncated ({f.stat().st_size} of {size} bytes)"
    return None


PINNED = "pinned.json"  # checkpoints/pinned.json: names pruning never removes


def pinned_checkpoints(root: Path) -> set[str]:
    """Checkpoint names listed in ROOT/pinned.json (e.g. the one a driving run serves: its
    promotion pins it, so training on never prunes what is being served)."""
    try:
        return set(json.loads((Path(root) / PINNED).read_text()))
    except (OSError, ValueError, TypeError):
        return set()


def pin_checkpoint(root: Path, name: str, only: bool = True) -> None:
    """Pin `name` (atomically); with `only`, it replaces the earlier pins."""
    names = sorted({name} if only else pinned_checkpoints(root) | {name})
    tmp = Path(root) / f".{PINNED}.tmp"
    tmp.write_text(json.dumps(names))
    os.replace(tmp, Path(root) / PINNED)


def read_latest(root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and the problems with any newer ones skipped."""
    problems: list[str] = []
    candidates = list_checkpoints(root)
    latest_file = root / "latest"
    if latest_file.is_file():
        named = root / latest_file.read_text().strip()
        if named in candidates:  # `latest` wins over anything newer left half-written
            candidates = [named] + [c for c in candidates if c != named]
    for c in candidates:
        problem = verify(c)
        if problem is None:
            return c, problems
        problems.append(problem)
    return None, problems


def latest_complete(root: Path, what: str) -> tuple[Path, list[str]]:
    """The newest checkpoint that verifies (and problems with newer ones), or a one-line error."""
    ckpt, problems = read_latest(root)
    if ckpt is None:
        raise UserError(f"{what}: no complete checkpoint under {root}" + (f" ({problems[0]})" if problems else ""))
    return ckpt, problems


class Checkpointer:
    def __init__(self, root: Path, keep: int = 3, async_save: bool = False):
        self.root = Path(root)
        self.keep = keep
        self.async_save = async_save
        self._pending: Any = None  # future of an in-flight async save
        self._pending_finish: Any = None
        self._stager: _ReusedBufferStager | None = None
        self._group: Any = None  # process group for async writes

    # -- save ---------------------------------------------------------------
    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
             rng: dict[str, Any]) -> float:
        """Write a checkpoint for meta['step']; returns seconds the caller was blocked."""
        t0 = time.perf_counter()
        self.wait()  # one save in flight at a time
        step = int(meta["step"])
        final = step_dir(self.root, step)
        tmp = self.root / f".tmp-{final.name}"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        torch.save(rng, tmp / f"rng_rank{_rank():05d}.pt")
        msd, osd = get_state_dict(model, optimizer, options=_FLAT)
        state = {"model": msd, "optim": osd}
        meta = {**meta, "optim_format": "flat"}
        if self.async_save:
            self._stager = self._stager or _ReusedBufferStager()
            if dist.is_initialized() and self._group is None:
                # The background write runs its own collectives (plan exchange, barrier). On the
                # training group they would interleave with FSDP/TP collectives of the main
                # thread in a different order on each rank: give it a group of its own.
                self._group = dist.new_group(backend="gloo")
            self._pending = dcp.async_save(state, checkpoint_id=str(tmp), async_stager=self._stager,
                                           process_group=self._group)
            self._pending_finish = (tmp, final, meta)
        else:
            try:
                dcp.save(state, checkpoint_id=str(tmp))
            except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
                raise self._write_failed(tmp, step, e) from None
            self._finish(tmp, final, meta)
        return time.perf_counter() - t0

    def _write_failed(self, tmp: Path, step: int, err: BaseException) -> UserError:
        """A failed write (full disk, quota, I/O error): drop the partial dir, keep `latest`."""
        shutil.rmtree(tmp, ignore_errors=True)
        cause = err
        if isinstance(err, CheckpointException):  # DCP wraps each rank's failure
            cause = next(iter(err.failures.values()), err) if err.failures else err
            if isinstance(cause, tuple):  # (exception, traceback) pairs in some versions
                cause = cause[0]
        previous, _ = read_latest(self.root)
        kept = f"{previous.name} is intact" if previous else "no earlier checkpoint exists"
        return UserError(f"checkpoint step {step} could not be written to {self.root} "
                         f"({getattr(cause, 'strerror', None) or cause}); {kept} — free space and rerun with --resume")

    def wait_staged(self) -> None:
        """Block until an async save has copied the state: call before the optimizer changes it."""
        if self._stager is not None:
            self._stager.wait()

    def wait(self) -> None:
        if self._pending is not None:
            # With background staging async_save returns (staging, upload) futures.
            getattr(self._pending, "upload_completion", self._pending).result()
            tmp, final, meta = self._pending_finish
            self._pending = self._pending_finish = None
            self._finish(tmp, final, meta)

    def _finish(self, tmp: Path, final: Path, meta: dict[str, Any]) -> None:
        _barrier()  # every rank's shards are on disk
        if _rank() == 0:
            files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
            meta = {**meta, "world_size": _world(), "files": files, "time": time.time()}
            _atomic_write(tmp / "meta.json", json.dumps(meta, indent=1))
            _fault_point("before_rename")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _atomic_write(self.root / "latest", final.name + "\n")
            self._prune()
        _barrier()

    def _prune(self) -> None:
        pinned = pinned_checkpoints(self.root)
        for old in list_checkpoints(self.root)[self.keep:]:
            if old.name not in pinned:
                shutil.rmtree(old, ignore_errors=True)

    # -- load ---------------------------------------------------------------
    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
             ckpt: Path | None = None) -> tuple[dict[str, Any], dict[str, Any] | None, list[str]]:
        """Load the newest complete checkpoint in place (any world size / layout).

        Returns (meta, this rank's rng state or None if the world size changed, warnings).
        """
        problems: list[str] = []
        if ckpt is None:
            ckpt, problems = latest_complete(self.root, "--resume")
        meta = json.loads((ckpt / "meta.json").read_text())
        # Checkpoints before expert parallelism kept the optimizer's param groups as lists, which
        # only load into the same grouping; "flat" keys them by parameter name.
        opts = _FLAT if meta.get("optim_format") == "flat" else StateDictOptions()
        msd, osd = get_state_dict(model, optimizer, options=opts) if optimizer is not None else (
            get_state_dict(model, [], options=StateDictOptions())[0], None)
        state = {"model": msd} if osd is None else {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(ckpt))
        if optimizer is not None:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                           options=opts)
        else:
            model.load_state_dict(state["model"])
        rng = None
        rng_file = ckpt / f"rng_rank{_rank():05d}.pt"
        if meta.get("world_size") == _world() and rng_file.is_file():
            rng = torch.load(rng_file, weights_only=False)
        return meta, rng, problems


class _ReusedBufferStager:
    """dcp.async_save staging into host buffers allocated once and reused by every save,
    copied by a background thread.

    The state must be copied before the next optimizer step changes it, and that copy is
    what an async save costs the training loop. Two things keep it off the loop: the
    buffers are reused (fresh allocations cost more in page faults than the copy itself;
    pinned on CUDA), and the copy runs in a thread while the next step's forward and
    backward run, which change gradients, not parameters or optimizer state. The trainer
    calls `wait()` (via Checkpointer.wait_staged) before `optimizer.step()`.
    """

    should_synchronize_after_execute = False  # the trainer synchronises before optimizer.step

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._cache: dict[str, Any] | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="exaflop-ckpt-stage")
        self._staging: Any = None

    def stage(self, state_dict: dict[str, Any]):
        self.wait()
        self._staging = self._pool.submit(self._copy, state_dict)
        return self._staging

    def wait(self) -> None:
        if self._staging is not None:
            self._staging.result()
            self._staging = None

    def _copy(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        # Private torch API (what torch's own async_save stages with), checked against the
        # torch pin in the Makefile, which lists it: re-check when the pin moves.
        from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

        if self._cache is not None:
            try:
                return _copy_state_dict(state_dict, self._cache)
            except (KeyError, RuntimeError, TypeError, AssertionError, IndexError):
                self._cache = None  # the structure changed (new optimizer state): reallocate
        self._cache = _create_cpu_state_dict(state_dict, pin_memory=torch.cuda.is_available())
        return _copy_state_dict(state_dict, self._cache)

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _atomic_write(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a crash at any point leaves the old file or the new.

    Written to a temporary file beside it, fsynced (so the rename cannot reach the disk
    before the data does), then renamed over it. The fault points let tests kill the
    process for real between those steps (tests/test_checkpoint_atomic.py).
    """
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        if os.environ.get("EXAFLOP_FAULT") == "atomic_write:torn":
            f.write(text[: len(text) // 2])
            f.flush()
            os._exit(17)
        f.write(text)
        f.flush()
        _fault_point("atomic_write:before_fsync")
        os.fsync(f.fileno())
    _fault_point("atomic_write:before_replace")
    os.replace(tmp, path)


def _fault_point(name: str) -> None:
    """Crash here when EXAFLOP_FAULT names this point: lets tests kill a write part-way for real."""
    if os.environ.get("EXAFLOP_FAULT") == name:
        os._exit(17)


def load_for_inference(run_or_ckpt: str | Path, device: str | torch.device = "cpu"):
    """(cfg, task, model) from a run directory (its latest checkpoint) or a checkpoint directory."""
    from exaflop.config import load_config_file
    from exaflop.engine.task import build_task

    path = Path(run_or_ckpt)
    if (path / "meta.json").is_file() and path.name.startswith("step_"):
        ckpt, run_dir = path, path.parent.parent
    else:
        run_dir = path
        if not (run_dir / "config.toml").is_file():
            raise UserError(f"{run_dir}: not a run directory (no config.toml); pass runs/<name>")
        ckpt, _ = latest_complete(run_dir / "checkpoints", str(run_dir))
    cfg = load_config_file(run_dir / "config.toml")
    task = build_task(cfg)
    if hasattr(task, "load_assets"):  # the run's own copy of what the data provided (read only)
        task.load_assets(run_dir)
    model = task.build_model()
    meta = json.loads((ckpt / "meta.json").read_text())
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(ckpt))
    model.load_state_dict(state["model"])
    model.to(device).eval()
    model.checkpoint_step = int(meta["step"])  # type: ignore[attr-defined]
    model.run_dir = run_dir  # type: ignore[attr-defined]
    return cfg, task, model


def run_dir_of(run_or_ckpt: str | Path) -> Path:
    """The run directory of a RUN argument (a run directory or one of its checkpoints)."""
    path = Path(run_or_ckpt)
    return path.parent.parent if (path / "meta.json").is_file() and path.name.startswith("step_") else path
