"""metrics.jsonl (always) and TensorBoard (when installed), written by rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.run_dir, self.tensorboard = run_dir, tensorboard
        self.enabled = False
        self.file = None
        self.tb = None
        if enabled:
            self.enable()

    def enable(self) -> None:
        """Start writing (also later: a replica that becomes rank 0 when the first is lost)."""
        if self.enabled:
            return
        self.enabled = True
        run_dir, tensorboard = self.run_dir, self.tensorboard
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # tensorboard is an optional extra
                self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def peak_mem_mb() -> float:
    """This process's peak memory: CUDA allocator peak on GPU, max resident set on CPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def per_rank(value: float, distributed: bool, device="cpu") -> list[float]:
    """`value` from every rank, in rank order (a collective: all ranks must call it)."""
    if not distributed:
        return [value]
    import torch
    import torch.distributed as dist

    out = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([value], dtype=torch.float64, device=device))
    return [float(t.item()) for t in out]
