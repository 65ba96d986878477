"""Pipeline parallel: the optimizer step as a `torch.distributed.pipelining` schedule.

The model's layers are split into `parallel.pp` stages (the task decides how: its
`split_stage`), one per rank of the mesh's `pp` dim; a step's micro-batches (the same
`train.micro_batch` as gradient accumulation) flow through them on a GPipe or 1F1B
schedule. The interleaved 1F1B schedule splits them into pp × `parallel.pp_virtual` stages
instead, rank r running stages r, r + pp, ... (Megatron's virtual pipeline, Narayanan et al.
2021): each rank idles (p - 1) / (v·m + p - 1) of a step instead of (p - 1) / (m + p - 1). Each stage keeps the parameter names of the unsplit model, so checkpoints
reshard across pipeline degrees like across any other layout. The task's optional
methods for it:

    split_stage(model, stage, n_stages, ranks) -> list[str]   # prune to this stage (called by
                                                       # engine.parallel.parallelize); returns the
                                                       # names of weights the first and last
                                                       # stages share (tied embeddings)
    pipeline_io(batch) -> (input, target)                      # what enters and what the loss reads
    pipeline_loss(output, target) -> Tensor                    # the last stage's loss per micro-batch
    stage_shares(n_stages, ranks) -> list[float]               # optional: each stage's share of
                                                               # the FLOPs (per-stage MFU)

Interleaved 1F1B on gloo was checked by repeated runs with a collective timeout
(docs/distributed.md): the same losses as one process every time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from exaflop.engine.parallel import clip_grad_norm, local_tensor
from exaflop.engine.step import NoDrills, StepOutcome, to_device
from exaflop.errors import UserError


def bubble_fraction(pp: int, n_micro: int, virtual: int = 1) -> float:
    """Idle share of a step with equal stages: (p - 1) / (m + p - 1) for GPipe / 1F1B, and
    (p - 1) / (v·m + p - 1) for interleaved 1F1B with v stages per rank (each warm-up and
    drain slot lasts 1/v of a whole rank's layers)."""
    return (pp - 1) / (virtual * n_micro + pp - 1)


def pipeline_micro_batch(per_rank: int, micro: int, pp: int) -> int:
    """A pipeline needs at least `pp` micro-batches per step to keep its stages busy: the largest
    micro-batch no bigger than `micro` that divides the rank's batch into at least `pp` (the
    samples a step consumes do not depend on it). Unchanged when the batch is smaller than pp."""
    for m in range(micro, 0, -1):
        if per_rank % m == 0 and per_rank // m >= pp:
            return m
    return micro


class Pipeline:
    def __init__(self, model: nn.Module, task, cfg, rt, layout, mesh, n_micro: int):
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
            ScheduleLoopedBFS,
        )

        for name in ("pipeline_io", "pipeline_loss"):
            if not hasattr(task, name):
                raise UserError(f"parallel.pp={layout.pp}: task {cfg.task!r} cannot be split into "
                                f"pipeline stages (its task object has no {name}); set parallel.pp=1")
        if n_micro < layout.pp and cfg.parallel.pp_schedule == "1f1b":
            raise UserError(f"parallel.pp_schedule=1f1b needs at least pp={layout.pp} micro-batches per step, "
                            f"got {n_micro} (train.global_batch / dp / train.micro_batch); lower "
                            "train.micro_batch or use parallel.pp_schedule=gpipe")
        self.task, self.rt, self.model = task, rt, model
        self.n, self.n_micro = layout.pp, n_micro
        self.index = layout.stage_of(rt.rank)
        self.virtual, n_stages = layout.pp_virtual, layout.n_stages
        stages = layout.stages_of(rt.rank)
        self.first, self.last = stages[0] == 0, stages[-1] == n_stages - 1
        self.group = mesh["pp"].get_group()
        # By name: FSDP2 replaced the parameter objects after the split.
        params = dict(model.named_parameters())
        self.tied = [params[n] for n in rt.pp_tied or []]  # engine.parallel.parallelize split the model
        self.tied_group = self.group if self.n == 2 else _first_last_group(layout, rt.rank)
        self.contributors = rt.world // self.n  # ranks that compute a loss: the last stage's
        def pipeline_stages() -> list:
            return [PipelineStage(m, s, n_stages, rt.device, group=self.group)
                    for m, s in zip(rt.pp_chunks, stages, strict=True)]

        if self.virtual > 1:
            self.schedule = ScheduleInterleaved1F1B(pipeline_stages(), n_micro, loss_fn=task.pipeline_loss)
        else:
            cls = Schedule1F1B if cfg.parallel.pp_schedule == "1f1b" else ScheduleGPipe
            self.schedule = cls(pipeline_stages()[0], n_micro, loss_fn=task.pipeline_loss)
        # Evaluation: one micro-batch per call on stages of its own (their buffers are sized
        # by the micro-batch count the first time a schedule runs).
        if self.virtual > 1:
            self._eval = ScheduleLoopedBFS(pipeline_stages(), 1, loss_fn=task.pipeline_loss)
        else:
            self._eval = ScheduleGPipe(pipeline_stages()[0], 1, loss_fn=task.pipeline_loss)
        self.bubble = bubble_fraction(self.n, n_micro, self.virtual)
        shares = getattr(task, "stage_shares", None)
        self.shares = None
        if shares is not None:  # per pipeline rank: the sum over its stages
            per_stage = shares(n_stages, ranks=self.n) if self.virtual > 1 else shares(n_stages)
            self.shares = [sum(per_stage[r + k * self.n] for k in range(self.virtual)) for r in range(self.n)]

    def describe(self) -> dict[str, Any]:
        out = {"pp": self.n, "pp_stage": self.index, "pp_microbatches": self.n_micro, "pp_bubble": self.bubble,
               "pp_virtual": self.virtual}
        if self.shares:
            out["pp_stage_flops_share"] = self.shares
        return out

    def stage_mfu(self, mfu: float) -> list[float] | None:
        """Each stage's MFU from the job's: a stage does its share of the FLOPs on 1/pp of the ranks."""
        return [mfu * self.n * s for s in self.shares] if self.shares else None

    def _run(self, schedule, inp, target, train: bool) -> float:
        losses: list = []
        args = (inp,) if self.first else ()
        kw = {"target": target, "losses": losses} if self.last else {}
        (schedule.step if train else schedule.eval)(*args, **kw)
        local = float(torch.stack(losses).float().mean()) if self.last else 0.0
        t = torch.tensor([local], dtype=torch.float64, device=self.rt.device)
        dist.all_reduce(t)
        return float(t.item()) / self.contributors

    @torch.no_grad()
    def evaluate(self, inp: torch.Tensor, target: torch.Tensor) -> float:
        """Mean loss of one micro-batch on every rank (the last stage computes it)."""
        with self.rt.autocast():
            return self._run(self._eval, inp, target, train=False)

    def step(self, optimizer, batches: Iterator, accum: int, step: int, lr: float, grad_clip: float,
             drills=None, before_update: Callable[[], None] | None = None) -> StepOutcome:
        """Optimizer step `step` over `accum` micro-batches, as engine.step.train_step."""
        drills = drills or NoDrills()
        for g in optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        inputs, targets = [], []
        for _ in range(accum):
            batch = to_device(next(batches), self.rt.device)
            drills.on_batch(step, batch)
            i, t = self.task.pipeline_io(batch)
            inputs.append(i)
            targets.append(t)
        with self.rt.autocast():
            loss = self._run(self.schedule, torch.cat(inputs), torch.cat(targets), train=True)
        self._sync_tied()
        drills.after_backward(step, self.model)
        out = StepOutcome(loss, self._clip(grad_clip))
        if out.finite:
            if before_update is not None:
                before_update()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out

    @torch.no_grad()
    def _sync_tied(self) -> None:
        # A weight on the first and the last stage (the embedding the LM head reuses) gets a
        # gradient from each use: their sum, on both, keeps the two copies equal.
        for p in self.tied:
            if p.grad is not None:
                dist.all_reduce(local_tensor(p.grad), group=self.tied_group)

    @torch.no_grad()
    def _clip(self, max_norm: float) -> float:
        """Global gradient norm over all stages (a tied weight counted once), clipped."""
        skip = set() if self.first else {id(p) for p in self.tied}
        params = [p for p in self.model.parameters() if p.grad is not None]
        return clip_grad_norm(params, max_norm, group=self.group, skip=skip)


def _first_last_group(layout, rank: int):
    """The process group of the first and last stage ranks with this rank's (dp, tp) position;
    every rank creates every such group (new_group is collective)."""
    per_stage = layout.dp * layout.tp
    mine = None
    for c in range(per_stage):
        g = dist.new_group([c, c + (layout.pp - 1) * per_stage])
        if rank % per_stage == c:
            mine = g
    return mine


class EvalModel:
    """What the task's `evaluate` calls as `model(input, target)`, run through the pipeline:
    `(None, loss)` on every rank."""

    def __init__(self, pipe: Pipeline):
        self.pipe = pipe

    def eval(self) -> EvalModel:
        self.pipe.model.eval()
        return self

    def __call__(self, inp: torch.Tensor, target: torch.Tensor, loss_mask=None):
        if loss_mask is not None:
            raise UserError("parallel.pp > 1 does not support masked losses (data.sft_path); set parallel.pp=1")
        return None, torch.tensor(self.pipe.evaluate(inp, target))
