"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    # Decay 2-D weights (matmuls, embeddings); norms and biases are left alone.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": ps, "weight_decay": wd}
              for params, wd in ((decay, cfg.weight_decay), (no_decay, 0.0))
              for ps in _by_mesh(params)]
    # The fused kernel exists for CUDA (and CPU in recent torch); DTensor params (FSDP/TP)
    # support it on CUDA only, so fall back to foreach elsewhere.
    is_dtensor = any(type(p).__name__ == "DTensor" for p in decay)
    fused = cfg.fused and (device.type == "cuda" or not is_dtensor)
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def _by_mesh(params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    """Split by DeviceMesh (None: plain tensors): the foreach kernels cannot mix plain tensors
    with DTensors, or DTensors of different meshes (expert-parallel weights next to FSDP's)."""
    out: dict = {}
    for p in params:
        out.setdefault(getattr(p, "device_mesh", None), []).append(p)
    return list(out.values()) or [[]]


def lr_at(step: int, total: int, cfg) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))
    # warmup-stable-decay: flat at peak, then linear decay over the last decay_frac of steps
    decay_start = int(total * (1 - cfg.decay_frac))
    if step < decay_start:
        return peak
    progress = (step - decay_start) / max(1, total - decay_start)
    return peak - (peak - floor) * min(1.0, progress)
