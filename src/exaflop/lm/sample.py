"""`exaflop sample RUN`: generate text from a trained language model."""

from __future__ import annotations

from pathlib import Path

from exaflop.engine.checkpoint import load_for_inference
from exaflop.errors import UserError
from exaflop.lm.generate import generate
from exaflop.lm.tokenizer import end_of_text_id, load_tokenizer


def load_lm(run: str | Path, device: str = "cpu"):
    """(cfg, model, tokenizer) from the run alone (its tokenizer/ folder; see lm/assets.py)."""
    cfg, task, model = load_for_inference(run, device)
    if cfg.task != "lm":
        raise UserError(f"{run}: a {cfg.task!r} run, not a language model")
    tok = load_tokenizer(task.assets / "tokenizer.json")
    model.tokenizer_dir = task.assets
    return cfg, model, tok


def stop_ids(tok, data_path: str | Path) -> tuple[int, ...]:
    """Generation stops at the end of a document, or at the end of a chat turn."""
    ids = {end_of_text_id(tok, Path(data_path) / "tokenizer.json"), tok.token_to_id("<|end|>")}
    return tuple(i for i in ids if i is not None)


def sample_text(run: str | Path, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                top_k: int = 50, top_p: float = 0.95, seed: int | None = None, dtype: str | None = None) -> str:
    """`dtype` None: the run's own run.dtype (normally auto), resolved on this machine."""
    from exaflop.engine.precision import autocast_for

    cfg, model, tok = load_lm(run)
    ids = tok.encode(prompt, add_special_tokens=False).ids
    flag = "--dtype" if dtype else "run.dtype"
    with autocast_for(dtype or cfg.run.dtype, next(model.parameters()).device, flag=flag):
        out = list(generate(model, ids, max_new_tokens, temperature, top_k, top_p, seed,
                            stop_ids=stop_ids(tok, model.tokenizer_dir)))
    return tok.decode(out, skip_special_tokens=False)
