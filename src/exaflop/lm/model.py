"""Decoder-only transformer language model (Llama-style: RMSNorm, RoPE, SwiGLU, GQA)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exaflop.lm.config import ModelConfig
from exaflop.nn import Block, KVCache, RMSNorm, rope_tables
from exaflop.nn.cpu_ops import embedding
from exaflop.nn.loss import linear_cross_entropy


class LM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.d_ff, causal=True, norm_eps=cfg.norm_eps,
                  dropout=cfg.dropout, n_experts=cfg.n_experts, top_k=cfg.top_k,
                  capacity_factor=cfg.moe_capacity, aux_coef=cfg.moe_aux_coef)
            for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
        # Not persistent: derived from the config, so checkpoints stay portable.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            # Residual output projections scaled down by depth (GPT-2), so the
            # residual stream's variance does not grow with the number of layers.
            scale = 1 / math.sqrt(2 * self.cfg.n_layer) if name.endswith(("wo.weight", "w2.weight", "mlp.w2")) else 1
            nn.init.normal_(p, mean=0.0, std=std * scale)

    def hidden(self, idx: Tensor, cache: KVCache | None = None, rows: Tensor | None = None,
               key_pos: Tensor | None = None) -> Tensor:
        """Final hidden states (B, T, C), before the last norm. With `cache`, positions continue
        from each row's cache length and this chunk's keys/values are written into it."""
        x = embedding(idx, self.tok_emb)
        if cache is None:
            T = idx.shape[1]
            rope = (self.rope_cos[:T], self.rope_sin[:T])
        else:
            rope = (self.rope_cos, self.rope_sin)
        step = None if cache is None else cache.step(rows, idx.shape[1], rope, key_pos)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, None if step is None else step.view(i))
        return x

    def forward(self, idx: Tensor, targets: Tensor | None = None, cache: KVCache | None = None,
                rows: Tensor | None = None, loss_mask: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """idx: (B, T) token ids -> (logits or None while training, cross-entropy or None).

        With `cache`, positions continue from each row's cache length; the cache's lengths
        do not move (use `decode`, which does both)."""
        x = self.norm(self.hidden(idx, cache, rows))
        if targets is None:
            return self.lm_head(x).float(), None
        if torch.is_grad_enabled() and type(x) is torch.Tensor:  # plain tensor: not under TP/SP
            # Training: fused head + loss in chunks, no full logits tensor (nn/loss.py).
            logits = None
            loss = linear_cross_entropy(x, self.lm_head.weight, targets, loss_mask)
        else:
            logits = self.lm_head(x).float()
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
            if loss_mask is None:
                loss = loss.mean()
            else:
                m = loss_mask.reshape(-1).float()
                loss = (loss * m).sum() / m.sum().clamp(min=1)
        return logits, loss

    @torch.no_grad()
    def embed(self, idx: Tensor, lengths: Tensor) -> Tensor:
        """(B, C) fp32 sentence embeddings: the final (normed) hidden states mean-pooled over each
        row's first `lengths[b]` tokens (rows right-padded to T; causal, so padding after a
        row's tokens does not change them). What /v1/embeddings serves: a decoder LM's pooled
        states, not a model trained for retrieval."""
        x = self.norm(self.hidden(idx)).float()
        keep = (torch.arange(idx.shape[1], device=idx.device)[None, :] < lengths[:, None]).float()
        return (x * keep[..., None]).sum(1) / lengths[:, None].clamp(min=1).float()

    def moe_layers(self) -> list:
        return [b.mlp for b in self.blocks if hasattr(b.mlp, "expert_bias")]

    def aux_loss(self) -> Tensor | None:
        """The MoE balance loss of the last forward, weighted (model.moe_aux_coef) and averaged
        over the MoE layers; None without one. Not part of `forward`'s loss: training adds it
        (LMTask.loss), evaluation never does."""
        terms = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        if not terms:
            return None
        return self.cfg.moe_aux_coef * sum(terms) / len(terms)

    def logits_at(self, idx: Tensor, cache: KVCache, rows: Tensor | None, last: Tensor,
                  key_pos: Tensor | None = None) -> Tensor:
        """fp32 logits (B, V) at position `last[b]` of each row of this chunk, filling the cache
        for all of it but not moving its lengths: the pure step `decode` runs (and the one the
        server compiles). The LM head runs on one position per row instead of all T: for a
        long prompt and a large vocabulary that is most of the prefill's memory. `key_pos`:
        arange(read length), given to a compiled step (nn/decode.py DecodeStep)."""
        x = self.hidden(idx, cache, rows, key_pos)
        x = x[torch.arange(x.shape[0], device=x.device), last]  # (B, C)
        return self.lm_head(self.norm(x)).float()

    def decode(self, idx: Tensor, cache: KVCache, rows: Tensor | None = None, lengths: Tensor | None = None,
               step=None) -> Tensor:
        """Append `idx` (B, T) to rows `rows` of `cache` (default 0..B-1) and return the
        next-token logits (B, V) after each row's last real token.

        `lengths` (B,): real tokens per row when a batch of prompts is right-padded to T
        (default: all T). Padding is exact: a row's queries see only keys at or before their
        own position, and the row's length advances by its real count only, so the padding
        is overwritten before anything attends to it. `step` replaces `logits_at` by a
        compiled copy of it (same arguments, the model first); one whose `needs_key_pos` is
        False gets None for `key_pos` (lm/fused_step.py: the three tensor ops that make it
        cost ~0.1 ms a step after the operator has streamed the caches cold)."""
        B, T = idx.shape
        n = lengths if lengths is not None else torch.full((B,), T, dtype=torch.long, device=idx.device)
        if step is None:
            logits = LM.logits_at(self, idx, cache, rows, n - 1)
        else:
            # The read length as a tensor's size: a dynamic dimension of the compiled graph, so the
            # step reads only the filled prefix without a graph per length. At least 2 (the extra
            # position is masked): the compiler specializes sizes 0 and 1 into graphs of their own.
            key_pos = None
            if getattr(step, "needs_key_pos", True):  # a step that reads only what it is given
                start = cache.lengths[:B] if rows is None else cache.lengths[rows]
                key_pos = torch.arange(max(int(start.max()) + T, 2), device=idx.device)
            logits = step(self, idx, cache, rows, n - 1, key_pos)
        cache.advance(rows, n)
        return logits

    def new_cache(self, slots: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        c = self.cfg
        p = self.tok_emb.weight
        return KVCache(c.n_layer, slots, c.n_kv_head, max_len or c.seq_len, c.head_dim,
                       device=p.device, dtype=dtype or p.dtype)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
        return n


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), matmuls only.

    6·N for the weight matmuls (N counts active params incl. the LM head) plus the
    attention score/value matmuls 12·L·T·C·(1/2 for causal)... we count the full
    T² as the kernels compute it without causal skipping on CPU.
    """
    C, L, T = cfg.d_model, cfg.n_layer, cfg.seq_len
    kv = cfg.n_kv_head * cfg.head_dim
    attn = C * C * 2 + 2 * C * kv  # q, o + k, v projections
    mlp = 3 * C * cfg.d_ff * cfg.top_k + (C * cfg.n_experts if cfg.n_experts > 1 else 0)
    n_active = L * (attn + mlp) + C * cfg.vocab_size
    return 6 * n_active + 12 * L * T * C
