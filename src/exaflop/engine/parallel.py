"""Wrap a model for the process layout in the config (single process: unchanged).

The distributed layouts (DDP, FSDP2, tensor parallel, HSDP) live here so the
trainer loop stays the same for one CPU core and a GPU cluster.
"""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from exaflop.engine.runtime import Runtime


def data_parallel_size(cfg, rt: Runtime) -> tuple[int, int]:
    """(dp world size, this rank's dp index): ranks that consume different samples."""
    return rt.world, rt.rank


def parallelize(model: nn.Module, task, cfg, rt: Runtime) -> nn.Module:
    model.to(rt.device)
    if not rt.distributed:
        return model
    return DDP(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model
