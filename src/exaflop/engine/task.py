"""The seam between the task-agnostic engine and a task (lm, drive, ...).

A task turns a Config into a model, random-access sample sources, batches and a
loss. The engine handles everything else: devices, parallelism, optimisation,
checkpoints, telemetry. A new task needs no engine change: it is registered in
`exaflop/tasks.py`, whose record builds the task object from a Config.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

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

    # Optional: the parallel engine (engine/parallel.py) asks for these when the config wants
    # FSDP / activation checkpointing (blocks: the repeated units; default: the model's
    # `blocks` or `layers` ModuleList) and tensor parallelism (apply_tp; without it tp > 1
    # is refused with a clear error).
    # def blocks(self, model) -> list[nn.Module]
    # def apply_tp(self, model, tp_mesh, sequence_parallel: bool) -> None
    # Optional: called after each optimizer step that updated (engine/step.py); returns
    # metrics for the training log (e.g. MoE routing-bias balancing and expert loads).
    # def after_step(self, model, rt) -> dict[str, float]

    # Optional, for self-contained runs: the trainer calls save_assets once (rank 0) to copy
    # into the run directory everything inference needs from the data (tokenizer, clip
    # geometry and label statistics); load_for_inference calls load_assets so that sampling,
    # serving and export read the run alone, never data.path.
    # def save_assets(self, run_dir: Path) -> None
    # def load_assets(self, run_dir: Path) -> None


def build_task(cfg) -> Task:
    """The task object of `cfg.task`, from the registry."""
    from exaflop import tasks

    return tasks.get(cfg.task).build(cfg)
