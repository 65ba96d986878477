"""`exaflop export RUN OUT --format safetensors`: one checkpoint, consolidated into one file.

A DCP checkpoint is a directory of shards written by however many ranks trained it,
in whatever layout. Loading it into a one-process model resolves all of that (DCP
reshards on load), so the file holds the plain `model.state_dict()` keys and full
tensors that any single process, or another library, can read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from exaflop.errors import UserError


def export(run: str | Path, out: str | Path) -> str:
    from safetensors.torch import save_file

    from exaflop.engine.checkpoint import load_for_inference

    cfg, _, model = load_for_inference(run)
    out = Path(out)
    if out.is_dir() or not out.suffix:
        out = out / "model.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        # Tied weights (embedding = LM head) share storage, which safetensors refuses; every
        # key gets its own copy so `load_state_dict(strict=True)` works on the result.
        ptr = t.untyped_storage().data_ptr()
        tensors[name] = t.clone().contiguous() if ptr in seen else t.contiguous()
        seen.setdefault(ptr, name)
    meta = {"format": "pt", "step": str(model.checkpoint_step), "task": cfg.task,
            "config": json.dumps(cfg.to_dict(), sort_keys=True)}
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
    except OSError as e:
        raise UserError(f"export: cannot write {out} ({e.strerror}); pick another OUT") from None
    tmp.replace(out)
    return str(out)
