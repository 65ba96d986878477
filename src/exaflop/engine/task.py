"""The seam between the task-agnostic engine and a task (lm, drive, ...).

A task turns a Config into a model, random-access sample sources, batches and a
loss. The engine handles everything else: devices, parallelism, optimisation,
checkpoints, telemetry. A new task needs no engine change: `exaflop.<task>.task`
exposes `build_task(cfg) -> Task`.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from exaflop.errors import UserError

Batch = dict[str, Any]  # tensors (moved to the device by the engine) and plain values


@runtime_checkable
class SampleSource(Protocol):
    """Random access by sample id; immutable, so the global order is reproducible."""

    def __len__(self) -> int: ...

    def __getitem__(self, sample_id: int) -> Any: ...


class Task(Protocol):
    def build_model(self) -> nn.Module: ...

    def build_dataset(self, split: str) -> SampleSource: ...  # split: "train" | "val"

    def collate(self, samples: list[Any]) -> Batch: ...

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]: ...

    def evaluate(self, model: nn.Module, batches: list[Batch]) -> dict[str, float]: ...

    def flops_per_sample(self) -> float: ...  # forward + backward, for MFU

    # Optional: the parallel engine asks for these when the config wants TP / FSDP.
    # def blocks(self, model) -> list[nn.Module]
    # def tp_plan(self, model, mesh) -> None

    # Optional, for self-contained runs: the trainer calls save_assets once (rank 0) to copy
    # into the run directory everything inference needs from the data (tokenizer, clip
    # geometry and label statistics); load_for_inference calls load_assets so that sampling,
    # serving and export read the run alone, never data.path.
    # def save_assets(self, run_dir: Path) -> None
    # def load_assets(self, run_dir: Path) -> None


def build_task(cfg) -> Task:
    try:
        mod = importlib.import_module(f"exaflop.{cfg.task}.task")
    except ModuleNotFoundError as e:
        raise UserError(f"config: task {cfg.task!r} has no trainer ({e})") from None
    return mod.build_task(cfg)
