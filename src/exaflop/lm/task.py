"""The language-model task: next-token prediction on packed token shards."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from exaflop.engine.parallel import unwrap
from exaflop.errors import UserError
from exaflop.lm import parallel_plan
from exaflop.lm.assets import read_manifest as read_assets_manifest
from exaflop.lm.assets import save_assets, tokenizer_dir
from exaflop.lm.model import LM, flops_per_token
from exaflop.lm.sft import collate_sft, sft_dataset
from exaflop.lm.shards import TokenWindows, read_manifest


class LMTask:
    def __init__(self, cfg):
        self.cfg = cfg
        self.mcfg = cfg.model
        self.tokens_per_sample = self.mcfg.seq_len
        self._manifest: dict | None = None
        self.assets: Path | None = None  # the run's own tokenizer folder, at inference

    @property
    def manifest(self) -> dict:
        """The data manifest: the training data's, or at inference the run's copy of it."""
        if self._manifest is None:
            m = read_assets_manifest(self.assets) if self.assets else read_manifest(self.cfg.data.path)
            if m["vocab_size"] > self.mcfg.vocab_size:
                raise UserError(f"model.vocab_size={self.mcfg.vocab_size} is smaller than the tokenizer's "
                                f"{m['vocab_size']} tokens in {self.cfg.data.path}; "
                                f"set --set model.vocab_size={m['vocab_size']}")
            self._manifest = m
        return self._manifest

    def save_assets(self, run_dir: Path) -> None:
        self.manifest  # noqa: B018  (a missing or mismatched dataset is a one-line error first)
        save_assets(self.cfg.data.path, run_dir)

    def load_assets(self, run_dir: Path) -> None:
        self.assets = tokenizer_dir(self.cfg, run_dir)

    def build_model(self) -> nn.Module:
        return LM(self.mcfg)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return parallel_plan.blocks(model)

    def apply_tp(self, model: nn.Module, tp_mesh, sequence_parallel: bool) -> None:
        parallel_plan.apply_tp(model, tp_mesh, sequence_parallel)

    def apply_ep(self, model: nn.Module, mesh) -> list[nn.Parameter]:
        return parallel_plan.apply_ep(model, mesh)

    def split_stage(self, model: nn.Module, stage: int, n_stages: int, ranks: int = 0) -> list[str]:
        if self.cfg.data.sft_path:
            raise UserError("parallel.pp > 1 does not support chat fine-tuning (data.sft_path: masked "
                            "losses); set parallel.pp=1")
        return parallel_plan.split_stage(model, stage, n_stages, ranks)

    def stage_shares(self, n_stages: int, ranks: int = 0) -> list[float]:
        return parallel_plan.stage_split(self.mcfg, n_stages, ranks)[1]

    def pipeline_io(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        return batch["input"], batch["target"]

    def pipeline_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return parallel_plan.pipeline_loss(logits, target)

    def build_dataset(self, split: str):
        self.manifest  # noqa: B018  (checks the vocabulary before any worker starts)
        if self.cfg.data.sft_path:  # chat fine-tuning: padded conversations, assistant-only loss
            return sft_dataset(self.cfg.data.sft_path, Path(self.cfg.data.path) / "tokenizer.json",
                               split, self.mcfg.seq_len)
        return TokenWindows(self.cfg.data.path, split, self.mcfg.seq_len)

    def collate(self, samples: list[np.ndarray]) -> dict[str, Any]:
        if self.cfg.data.sft_path:
            return collate_sft(samples)
        x = torch.from_numpy(np.stack(samples))
        return {"input": x[:, :-1].contiguous(), "target": x[:, 1:].contiguous()}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        _, ce = model(batch["input"], batch["target"], loss_mask=batch.get("loss_mask"))
        aux = unwrap(model).aux_loss() if self.mcfg.n_experts > 1 else None
        if aux is None:
            return ce, {}
        # The MoE balance term trains the router; the logged loss stays the cross-entropy.
        return ce + aux, {"ce_loss": ce.item(), "aux_loss": aux.item()}

    def after_step(self, model: nn.Module, rt) -> dict[str, float]:
        """After each optimizer step: MoE routing-bias balancing from the step's expert loads
        (summed over micro-batches and ranks), and per-layer load statistics for the log."""
        layers = unwrap(model).moe_layers() if self.mcfg.n_experts > 1 else []
        if not layers:
            return {}
        load = torch.stack([m.take_load() for m in layers])  # (layers, E)
        if rt.distributed:  # every rank must move its bias the same way
            torch.distributed.all_reduce(load)
        out = {}
        for i, (m, lo) in enumerate(zip(layers, load, strict=True)):
            if self.mcfg.moe_bias_rate > 0:
                m.balance(lo, self.mcfg.moe_bias_rate)
            out[f"moe_load_l{i}"] = float(lo.max() / lo.mean().clamp(min=1e-9))
        out["moe_load_max_over_mean"] = max(out.values())
        return out

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[dict[str, Any]]) -> dict[str, float]:
        # Cross-entropy only: an MoE run's balance term is a training device, not a loss of the data.
        losses = [float(model(b["input"], b["target"], loss_mask=b.get("loss_mask"))[1]) for b in batches]
        val_loss = sum(losses) / max(1, len(losses))
        if self.cfg.data.sft_path:  # bits per byte describes the pretraining corpus, not chats
            return {"val_loss": val_loss}
        m = self.manifest
        bytes_per_token = m["bytes"]["val"] / max(1, m["tokens"]["val"])
        return {"val_loss": val_loss, "val_bpb": val_loss / math.log(2) / bytes_per_token}

    def flops_per_sample(self) -> float:
        return flops_per_token(self.mcfg) * self.mcfg.seq_len
