"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with reserved special tokens."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from exaflop.errors import UserError

EOT = "<|endoftext|>"
# Chat roles reserved up front so a base model's tokenizer already fits SFT and the server.
SPECIAL_TOKENS = [EOT, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"]
BYTE_ALPHABET = 256


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    minimum = BYTE_ALPHABET + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise UserError(f"--vocab {vocab_size} is too small: 256 byte tokens + {len(SPECIAL_TOKENS)} "
                        f"special tokens need at least {minimum}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer: {path} not found (run `exaflop data text` first or pass --tokenizer)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise UserError(f"tokenizer: {path} is not a valid tokenizer.json ({e})") from None
    return tok


def end_of_text_id(tok: Tokenizer, tokenizer_path: str | Path) -> int:
    """The id that separates documents: <|endoftext|>, else an imported tokenizer's own eos.

    Imported Hugging Face tokenizers (Llama 3's <|end_of_text|>, </s>, ...) keep their
    tokenizer_config.json beside tokenizer.json; its eos_token is used then.
    """
    if tok.token_to_id(EOT) is not None:
        return tok.token_to_id(EOT)
    folder = Path(tokenizer_path).parent
    for name in ("hf_tokenizer_config.json", "tokenizer_config.json"):
        cfg_file = folder / name
        if cfg_file.is_file():
            eos = json.loads(cfg_file.read_text()).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if isinstance(eos, str) and tok.token_to_id(eos) is not None:
                return tok.token_to_id(eos)
    raise UserError(f"tokenizer: {tokenizer_path} has no {EOT} token and no eos_token in a "
                    "tokenizer_config.json beside it; add one so documents can be separated")


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


def special_ids(tok: Tokenizer) -> dict[str, int]:
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None}
