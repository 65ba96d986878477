"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with reserved special tokens."""

from __future__ import annotations

import hashlib
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
    if tok.token_to_id(EOT) is None:
        raise UserError(f"tokenizer: {path} has no {EOT} token; exaflop needs it to separate documents")
    return tok


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


def special_ids(tok: Tokenizer) -> dict[str, int]:
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None}
