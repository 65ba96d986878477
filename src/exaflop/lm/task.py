"""The language-model task: next-token prediction on packed token shards."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from exaflop.errors import UserError
from exaflop.lm.model import LM, flops_per_token
from exaflop.lm.sft import collate_sft, sft_dataset
from exaflop.lm.shards import TokenWindows, read_manifest


class LMTask:
    def __init__(self, cfg):
        self.cfg = cfg
        self.mcfg = cfg.model
        self.manifest = read_manifest(cfg.data.path)
        if self.manifest["vocab_size"] > self.mcfg.vocab_size:
            raise UserError(f"model.vocab_size={self.mcfg.vocab_size} is smaller than the tokenizer's "
                            f"{self.manifest['vocab_size']} tokens in {cfg.data.path}; "
                            f"set --set model.vocab_size={self.manifest['vocab_size']}")
        self.tokens_per_sample = self.mcfg.seq_len

    def build_model(self) -> nn.Module:
        return LM(self.mcfg)

    def build_dataset(self, split: str):
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
        _, loss = model(batch["input"], batch["target"], loss_mask=batch.get("loss_mask"))
        return loss, {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[dict[str, Any]]) -> dict[str, float]:
        losses = [float(self.loss(model, b)[0]) for b in batches]
        val_loss = sum(losses) / max(1, len(losses))
        if self.cfg.data.sft_path:  # bits per byte describes the pretraining corpus, not chats
            return {"val_loss": val_loss}
        m = self.manifest
        bytes_per_token = m["bytes"]["val"] / max(1, m["tokens"]["val"])
        return {"val_loss": val_loss, "val_bpb": val_loss / math.log(2) / bytes_per_token}

    def flops_per_sample(self) -> float:
        return flops_per_token(self.mcfg) * self.mcfg.seq_len


def build_task(cfg) -> LMTask:
    return LMTask(cfg)
