"""The task registry: every task exaflop trains, one typed record each, registered here.

A task is what the engine trains (`engine/task.py`'s `Task` protocol): its record names
the config section types (`[model]`, `[data]`, torch-free so the planner and the CLI read
configs without torch) and the builder of its task object, which in turn builds the model,
the datasets, batches, loss, evaluation and (optionally) the parallel plan.

A new task is a new folder (`exaflop/<name>/config.py` and `task.py`) plus one
`register(...)` line below; docs/architecture.md walks through `drive` as the example.
The builders import their task lazily: reading a config must not import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from exaflop.drive import config as drive_config
from exaflop.errors import UserError
from exaflop.lm import config as lm_config
from exaflop.schema import Strict


@dataclass(frozen=True)
class TaskSpec:
    name: str
    summary: str
    model_config: type[Strict]  # the [model] section
    data_config: type[Strict]  # the [data] section
    build: Callable[[Any], Any]  # Config -> the task object (engine/task.py: Task)


TASKS: dict[str, TaskSpec] = {}


def register(spec: TaskSpec) -> TaskSpec:
    if spec.name in TASKS:
        raise ValueError(f"task {spec.name!r} is registered twice")
    TASKS[spec.name] = spec
    return spec


def get(name: str) -> TaskSpec:
    spec = TASKS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise UserError(f"config: unknown task {name!r} (known: {', '.join(TASKS)}); set task = one of them")
    return spec


def _build_lm(cfg):
    from exaflop.lm.task import LMTask

    return LMTask(cfg)


def _build_drive(cfg):
    from exaflop.drive.task import DriveTask

    return DriveTask(cfg)


register(TaskSpec("lm", "decoder language model on tokenized text", lm_config.ModelConfig, lm_config.DataConfig,
                  _build_lm))
register(TaskSpec("drive", "video clip -> future trajectory + steering", drive_config.ModelConfig,
                  drive_config.DataConfig, _build_drive))
