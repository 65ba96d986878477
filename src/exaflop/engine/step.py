"""One optimizer step: the unit the training loop repeats and a pipeline schedule replaces.

`train_step` runs the step's micro-batches forward and backward (gradient sync only on the
last one), clips, and updates unless the step is non-finite — it has no notion of cadence,
logging or checkpoints, which the loop (engine/trainer.py) and its components own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from exaflop.engine.parallel import clip_grad_norm, set_grad_sync


@dataclass
class StepOutcome:
    loss: float  # mean over the step's micro-batches and the ranks
    grad_norm: float
    metrics: dict[str, float] = field(default_factory=dict)  # the task's, averaged like the loss

    @property
    def finite(self) -> bool:
        return math.isfinite(self.grad_norm) and math.isfinite(self.loss)


class NoDrills:
    """The hooks `train_step` calls; the trainer's `Drills` (engine/faults.py) fill them in."""

    def on_batch(self, step: int, batch: dict[str, Any]) -> None: ...

    def after_backward(self, step: int, model: torch.nn.Module) -> None: ...


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_step(model, optimizer, task, batches: Iterator, accum: int, rt, step: int, lr: float,
               grad_clip: float, drills=None, before_update: Callable[[], None] | None = None) -> StepOutcome:
    """Optimizer step `step` (0-based) over `accum` micro-batches from `batches`.

    A non-finite loss or gradient norm drops the gradients without updating (the caller
    applies the skip/stop policy); `before_update` runs just before the optimizer writes
    the parameters (an async checkpoint may still be copying them).
    """
    drills = drills or NoDrills()
    for g in optimizer.param_groups:
        g["lr"] = lr
    model.train()
    loss_sum, metrics_sum = 0.0, {}
    for micro in range(accum):
        batch = to_device(next(batches), rt.device)
        drills.on_batch(step, batch)
        with set_grad_sync(model, micro == accum - 1), rt.autocast():
            loss, metrics = task.loss(model, batch)
        (loss / accum).backward()
        loss_sum += loss.detach().float().item() / accum
        for k, v in metrics.items():
            metrics_sum[k] = metrics_sum.get(k, 0.0) + v / accum
    if getattr(rt, "expert_grads", None) is not None:
        rt.expert_grads.reduce()
    drills.after_backward(step, model)
    try:
        out = StepOutcome(mean_over_ranks(loss_sum, rt), clip(model, grad_clip, rt, optimizer), metrics_sum)
        if out.finite:
            if before_update is not None:
                before_update()
            optimizer.step()
            after = getattr(task, "after_step", None)  # optional: e.g. MoE routing-bias balancing
            if after is not None:
                out.metrics.update(after(model, rt))
    finally:
        optimizer.__dict__.pop("grad_scale", None)  # this step's clipping only
    optimizer.zero_grad(set_to_none=True)
    return out


def clip(model, max_norm: float, rt, optimizer: torch.optim.Optimizer | None = None) -> float:
    """Clip the gradients to `max_norm` (0: measure only); the total norm before clipping.

    With a fused optimizer the clipping rides on its update: PyTorch's fused Adam/AdamW divide
    each gradient by `optimizer.grad_scale` as they read it (the hook GradScaler uses), which
    saves a read and a write of every gradient (lm-small, AMX, 2 threads: ~3 ms of a ~220 ms
    step). The caller removes `grad_scale` after the step (train_step does)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if rt.distributed:  # DTensor gradients may live on several meshes (TP blocks, FSDP root)
        return clip_grad_norm(params, max_norm)
    grads = [p.grad for p in params]
    total = grad_norm(grads)
    if max_norm > 0 and math.isfinite(total) and total + 1e-6 > max_norm:
        if optimizer is not None and _fused(optimizer):
            optimizer.grad_scale = torch.tensor((total + 1e-6) / max_norm, dtype=torch.float32, device=grads[0].device)
        else:
            torch._foreach_mul_(grads, max_norm / (total + 1e-6))
    return total


def grad_norm(grads: list[torch.Tensor]) -> float:
    """The L2 norm of all of `grads` together. fp32 CPU gradients: each tensor's sum of squares
    as a BLAS dot product, summed in fp64 — 1.7 ms for lm-small's 13.8M gradients against
    torch's norm kernels' 2.8-3.8 (AMX CPU, 2 threads; the norm's careful summation is not
    needed to clip, and the dot's fp32 partial sums are within ~1e-6 of it relatively)."""
    if grads and all(g.device.type == "cpu" and g.dtype == torch.float32 and g.is_contiguous()
                     and type(g) is torch.Tensor for g in grads):
        return math.sqrt(sum(float(torch.dot(g.view(-1), g.view(-1))) for g in grads))
    norm = torch.nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP/TP
        norm = norm.full_tensor()
    return float(norm)


def _fused(optimizer: torch.optim.Optimizer) -> bool:
    """A fused Adam/AdamW: the optimizers whose kernels take `grad_scale`."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and all(
        g.get("fused") for g in optimizer.param_groups)


def mean_over_ranks(x: float, rt) -> float:
    if not rt.distributed:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return float(t.item() / rt.world)
