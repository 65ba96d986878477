"""Token sampling and KV-cached generation."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from exaflop.errors import UserError


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Scale by temperature and mask out tokens outside top-k / the top-p nucleus. logits: (B, V)."""
    logits = logits / max(temperature, 1e-6)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already cover top_p of the mass.
        drop = probs.cumsum(-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_token(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:
    """One token id per row; temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float(), temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, stop_ids: tuple[int, ...] = ()) -> Iterator[int]:
    """Yield new token ids one at a time; prefill once, then one cached step per token."""
    ctx = model.cfg.seq_len
    if not prompt_ids:
        raise UserError("prompt: empty after tokenization; give some text")
    if len(prompt_ids) >= ctx:
        raise UserError(f"prompt: {len(prompt_ids)} tokens does not fit the model's context of {ctx} "
                        "(leave room for at least one new token); shorten the prompt")
    max_new_tokens = min(max_new_tokens, ctx - len(prompt_ids))
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed())
    cache = model.new_cache(1, ctx)
    x = torch.tensor([prompt_ids], device=device)
    for _ in range(max_new_tokens):
        logits = model.decode(x, cache)
        nxt = sample_token(logits, temperature, top_k, top_p, gen)
        tok = int(nxt.item())
        if tok in stop_ids:
            return
        yield tok
        x = nxt.view(1, 1)
