"""Config sections of the language-model task (torch-free: the planner reads them)."""

from __future__ import annotations

from pydantic import Field, model_validator

from exaflop.schema import Strict


class ModelConfig(Strict):
    n_layer: int = Field(4, ge=1)
    d_model: int = Field(128, ge=8)
    n_head: int = Field(4, ge=1)
    n_kv_head: int = Field(0, ge=0)  # 0: same as n_head (plain multi-head attention)
    d_ff: int = Field(0, ge=0)  # 0: SwiGLU default, ~8/3·d_model rounded up to a multiple of 64
    vocab_size: int = Field(4096, ge=16)
    seq_len: int = Field(256, ge=2)
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = Field(0.0, ge=0, lt=1)
    n_experts: int = Field(1, ge=1)  # >1: mixture-of-experts MLP (Grok-1 style; nn/moe.py)
    top_k: int = Field(1, ge=1)
    # MoE balancing: the auxiliary-loss-free routing bias moves by this much per step toward
    # balance (DeepSeek-V3's 0.001; 0: off), plus a sequence-wise auxiliary loss of this
    # weight (theirs: 0.0001; 0: off), never part of the validation loss.
    moe_bias_rate: float = Field(0.001, ge=0)
    moe_aux_coef: float = Field(0.0001, ge=0)
    moe_capacity: float = Field(0.0, ge=0)  # >0: capacity factor; copies beyond it are dropped
    init_std: float = 0.02

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.n_kv_head == 0:
            self.__dict__["n_kv_head"] = self.n_head
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if (self.d_model // self.n_head) % 2:
            raise ValueError("head dim (d_model/n_head) must be even for RoPE")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k={self.top_k} exceeds n_experts={self.n_experts}")
        if self.d_ff == 0:
            self.__dict__["d_ff"] = ((8 * self.d_model // 3) + 63) // 64 * 64
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


class DataConfig(Strict):
    # Directory written by `exaflop data text` (shards + manifest.json + tokenizer.json).
    path: str = "data/stdlib"
    # Format of chat data for SFT: when set, samples are JSONL conversations (see lm.sft).
    sft_path: str = ""
