"""The task registry: a new task is a folder's worth of code plus one `register` line, and
the engine trains it with nothing else changed (here the folder is this file)."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import Field
from torch import nn

from exaflop import tasks
from exaflop.config import load_config
from exaflop.engine.trainer import train
from exaflop.errors import UserError
from exaflop.schema import Strict


class LineModel(Strict):  # [model]
    width: int = Field(8, ge=1)


class LineData(Strict):  # [data]
    samples: int = Field(64, ge=8)


class LineTask:
    """Learn y = 3x - 1 from noisy samples: the smallest thing the Task protocol can train."""

    def __init__(self, cfg):
        self.cfg = cfg

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(1, self.cfg.model.width), nn.Tanh(), nn.Linear(self.cfg.model.width, 1))

    def build_dataset(self, split: str):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        x = torch.rand(self.cfg.data.samples, 1, generator=g) * 2 - 1
        return [(x[i], 3 * x[i] - 1) for i in range(len(x))]

    def collate(self, samples):
        return {"x": torch.stack([s[0] for s in samples]), "y": torch.stack([s[1] for s in samples])}

    def loss(self, model, batch):
        loss = nn.functional.mse_loss(model(batch["x"]), batch["y"])
        return loss, {}

    def evaluate(self, model, batches):
        return {"val_loss": sum(float(self.loss(model, b)[0]) for b in batches) / len(batches)}

    def flops_per_sample(self) -> float:
        return 6.0 * sum(p.numel() for p in self.build_model().parameters())


@pytest.fixture()
def line_task():
    spec = tasks.register(tasks.TaskSpec("line", "y = 3x - 1", LineModel, LineData, LineTask))
    yield spec
    del tasks.TASKS["line"]


def test_a_registered_task_trains_with_the_engine(line_task, tmp_path):
    cfg = load_config(None, ["task=line", "model.width=16", f"run.out_dir={tmp_path}", "run.name=line",
                             "train.steps=60", "train.micro_batch=16", "optim.lr=0.03", "optim.warmup_steps=0",
                             "eval.batches=2", "run.tensorboard=false", "run.dtype=fp32"])
    assert isinstance(cfg.model, LineModel) and cfg.model.width == 16  # typed at the engine
    result = train(cfg, quiet=True)
    first = json.loads((tmp_path / "line" / "metrics.jsonl").read_text().splitlines()[1])
    assert first["kind"] == "train"
    assert result["val_loss"] < first["loss"] / 10  # it learned the line
    saved = (tmp_path / "line" / "config.toml").read_text()
    assert 'task = "line"' in saved and "width = 16" in saved  # the section round-trips


def test_unknown_task_names_the_known_ones():
    with pytest.raises(UserError, match=r"unknown task 'nope' \(known: lm, drive\)"):
        load_config("lm-tiny", ["task=nope"])


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        tasks.register(tasks.TaskSpec("lm", "again", LineModel, LineData, LineTask))
