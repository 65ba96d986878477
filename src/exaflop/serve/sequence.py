"""One generated sequence (one `choice`): sampling settings, output text, stop strings.

Text is produced from token *bytes* through an incremental UTF-8 decoder, so a
character split across tokens is emitted whole, never as U+FFFD halves. Text that
could still become a stop string is held back until it either completes the stop
(then it is cut, with everything after it) or stops matching (then it is sent):
a stop string never leaks into a stream.
"""

from __future__ import annotations

import codecs
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: off; k: the chosen token's logprob and the top k
    grammar: str | None = None  # llguidance grammar the output must follow (serve/grammar.py)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]]


@dataclass
class Event:
    """What one engine step produced for one sequence (delivered to the HTTP handler)."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "error"
    completion_tokens: int = 0
    error: str | None = None
    cached_tokens: int = 0  # of the prompt, restored from the prefix cache


class Handle:
    """The HTTP side of a request: a flag the engine polls, and where its events go.

    With `loop` and `queue` set, the engine hands over all of one step's events to
    each event loop in a single `call_soon_threadsafe` (one wake-up per step rather
    than one per sequence); otherwise `deliver` is called directly.
    """

    def __init__(self, deliver: Callable[[Event], None] | None = None, loop: Any = None, queue: Any = None,
                 user: str | None = None):
        self.deliver = deliver or (lambda ev: queue.put_nowait(ev))
        self.user = user  # the request's `user` field (also what a serve fault drill aims at)
        self.loop, self.queue = loop, queue
        self.cancelled = False
        self.arrival = time.perf_counter()


class Sequence:
    def __init__(self, handle: Handle, index: int, prompt_ids: list[int], params: SamplingParams):
        self.handle, self.index, self.prompt_ids, self.params = handle, index, prompt_ids, params
        self.weights: Any = None  # the checkpoint it runs on, fixed at admission
        self.slot = -1
        self.out_ids: list[int] = []
        self.counts: torch.Tensor | None = None  # per-token output counts, for penalties
        self.bias: torch.Tensor | None = None  # dense logit_bias row
        self.generator: torch.Generator | None = None
        self.constraint: Any = None  # serve.grammar.Constraint while the output is constrained
        self.cached_tokens = 0  # prompt tokens restored from the prefix cache (serve/prefix.py)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # decoded output so far (held-back part included)
        self.sent = 0  # chars of self.text already delivered
        self._pending_lp: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.t_first: float | None = None
        self.t_last: float | None = None

    @property
    def cancelled(self) -> bool:
        return self.handle.cancelled

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.out_ids)

    def start(self, weights: Any, slot: int, device: torch.device) -> None:
        self.weights, self.slot = weights, slot
        self.generator = torch.Generator(device=device)
        seed = self.params.seed
        # Choice i of a seeded request uses seed+i, so n>1 choices differ but repeat exactly.
        self.generator.manual_seed((seed + self.index) % (1 << 63) if seed is not None else
                                   int(torch.randint(0, 1 << 62, ()).item()))
        if self.params.grammar is not None:
            from exaflop.serve.grammar import Constraint

            self.constraint = Constraint(weights, self.params.grammar)
        if self.params.penalized:
            self.counts = torch.zeros(weights.vocab_size, device=device)
        if self.params.logit_bias:  # dense once, so a step adds every row's bias in one op
            self.bias = torch.zeros(weights.vocab_size, device=device)
            self.bias[list(self.params.logit_bias)] = torch.tensor(list(self.params.logit_bias.values()),
                                                                   dtype=self.bias.dtype, device=device)

    def add_token(self, token: int, lp: TokenLogprob | None) -> Event | None:
        """Record a sampled token; returns what to deliver now (or None to wait)."""
        w = self.weights
        if self.constraint is not None:
            self.constraint.consume(token)
        self.out_ids.append(token)
        if self.counts is not None:
            self.counts[token] += 1
        if token in w.stop_ids:
            return self._finish("stop")
        if lp is not None:
            self._pending_lp.append(lp)
        self.text += self._utf8.decode(w.token_bytes(token), final=False)
        if self._cut_at_stop():
            return self._finish("stop")
        if len(self.out_ids) >= self.params.max_tokens or self.length >= w.ctx:
            return self._finish("length")
        end = len(self.text) - self._held_back()
        if end <= self.sent:
            return None
        return self._event(end)

    def _cut_at_stop(self) -> bool:
        """Truncate text at the earliest complete stop string; True if one was found."""
        best = -1
        for s in self.params.stop:
            i = self.text.find(s, self.sent)
            if i >= 0 and (best < 0 or i < best):
                best = i
        if best < 0:
            return False
        self.text = self.text[:best]
        return True

    def _held_back(self) -> int:
        """Length of the longest tail of the unsent text that begins some stop string."""
        unsent = len(self.text) - self.sent
        hold = 0
        for s in self.params.stop:
            for k in range(min(len(s) - 1, unsent), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return hold

    def _finish(self, reason: str) -> Event:
        self.finish_reason = reason
        if reason == "length":  # nothing can complete a stop string now: flush all
            self.text += self._utf8.decode(b"", final=True)
        return self._event(len(self.text), reason)

    def _event(self, end: int, finish: str | None = None) -> Event:
        ev = Event(self.index, self.text[self.sent:end], self._pending_lp, finish,
                   completion_tokens=len(self.out_ids), cached_tokens=self.cached_tokens)
        self.sent = max(self.sent, end)
        self._pending_lp = []
        return ev


def byte_decoder() -> dict[str, int]:
    """Inverse of the byte-level BPE alphabet: each of the 256 bytes is one printable char.

    Printable Latin-1 bytes stand for themselves; the rest (controls, space,
    0x7f-0xa0, 0xad) are shifted to code points from 256 up, in byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table.values():
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def token_byte_table(tok, vocab_size: int, special: set[int]) -> list[bytes]:
    """Bytes of every token id (special tokens: their text; ids past the tokenizer: none).

    Byte-level BPE (exaflop's own, GPT-2 and Llama-3 style) maps each piece's chars
    back through the byte alphabet; SentencePiece-style tokenizers (imported runs) use
    "▁" for a space and "<0xNN>" pieces for raw bytes.
    """
    decoder = json.dumps(json.loads(tok.to_str()).get("decoder"))
    byte_level = '"ByteLevel"' in decoder
    inverse = byte_decoder()
    table: list[bytes] = []
    for i in range(vocab_size):
        piece = tok.id_to_token(i)
        if piece is None:
            table.append(b"")
        elif i in special:
            table.append(piece.encode())
        elif byte_level and all(c in inverse for c in piece):
            table.append(bytes(inverse[c] for c in piece))
        elif (m := _BYTE_PIECE.fullmatch(piece)) is not None:
            table.append(bytes([int(m.group(1), 16)]))
        else:
            table.append(piece.replace("\u2581", " ").encode())
    return table


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
