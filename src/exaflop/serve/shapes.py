"""OpenAI response JSON: whole responses, stream chunks, logprobs, usage.

Both endpoints share the collection logic; only the field names differ
(`text` vs `message`/`delta`, and two different logprobs layouts).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from exaflop.serve.sequence import Event, TokenLogprob


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def sse(obj: dict | str) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprobs(lps: list[TokenLogprob]) -> dict:
    return {"content": [{"token": lp.token, "logprob": lp.logprob, "bytes": lp.bytes,
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": b} for t, v, b in lp.top]}
                        for lp in lps], "refusal": None}


def completion_logprobs(lps: list[TokenLogprob], offset: int) -> dict:
    offsets = []
    for lp in lps:
        offsets.append(offset)
        offset += len(lp.token)
    return {"tokens": [lp.token for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{t: v for t, v, _ in lp.top} for lp in lps], "text_offset": offsets}


@dataclass
class Choice:
    """Accumulates one choice's events (non-streaming), or tracks offsets (streaming)."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    offset: int = 0  # completions text_offset of the next streamed token

    def add(self, ev: Event) -> None:
        self.text += ev.text
        self.logprobs += ev.logprobs
        self.finish_reason = ev.finish_reason or self.finish_reason
        self.completion_tokens = max(self.completion_tokens, ev.completion_tokens)


class Shaper:
    """Builds the JSON for one request; `chat` picks the endpoint's format."""

    def __init__(self, chat: bool, model: str, want_logprobs: bool, fingerprint: str,
                 include_usage: bool = False):
        self.chat, self.model, self.want_logprobs = chat, model, want_logprobs
        self.fingerprint, self.include_usage = fingerprint, include_usage
        self.id, self.created = new_id(chat), int(time.time())

    def _base(self, obj: str) -> dict:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        if self.chat:
            out["system_fingerprint"] = self.fingerprint
        return out

    def response(self, choices: list[Choice], prompt_tokens: int, prefix: dict[int, str]) -> dict:
        out = self._base("chat.completion" if self.chat else "text_completion")
        out["choices"] = []
        for c in choices:
            if self.chat:
                lp = chat_logprobs(c.logprobs) if self.want_logprobs else None
                out["choices"].append({"index": c.index, "message": {"role": "assistant", "content": c.text,
                                                                     "refusal": None},
                                       "logprobs": lp, "finish_reason": c.finish_reason})
            else:
                lp = completion_logprobs(c.logprobs, len(prefix.get(c.index, ""))) if self.want_logprobs else None
                out["choices"].append({"index": c.index, "text": prefix.get(c.index, "") + c.text,
                                       "logprobs": lp, "finish_reason": c.finish_reason})
        out["usage"] = usage(prompt_tokens, sum(c.completion_tokens for c in choices))
        return out

    def chunk(self, choice: Choice, text: str, lps: list[TokenLogprob], finish: str | None,
              role: bool = False) -> str:
        out = self._base("chat.completion.chunk" if self.chat else "text_completion")
        if self.chat:
            delta: dict = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
            lp = chat_logprobs(lps) if self.want_logprobs and lps else None
            entry = {"index": choice.index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            lp = completion_logprobs(lps, choice.offset) if self.want_logprobs and lps else None
            entry = {"index": choice.index, "text": text, "logprobs": lp, "finish_reason": finish}
        choice.offset += sum(len(x.token) for x in lps)
        out["choices"] = [entry]
        if self.include_usage:
            out["usage"] = None
        return sse(out)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> str:
        out = self._base("chat.completion.chunk" if self.chat else "text_completion")
        out["choices"] = []
        out["usage"] = usage(prompt_tokens, completion_tokens)
        return sse(out)
