"""OpenAI response JSON: whole responses, stream chunks, logprobs, usage.

Both endpoints share the collection logic; only the field names differ
(`text` vs `message`/`delta`, and two different logprobs layouts).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field

from exaflop.lm.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from exaflop.serve.sequence import Event, TokenLogprob


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def sse(obj: dict | str) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def cached_of(choices, n: int) -> int:
    """Prompt tokens served from the prefix cache: per prompt (choices i*n .. i*n+n-1 share
    it, counted once like prompt_tokens), the most any of its choices reused."""
    per_prompt: dict[int, int] = {}
    for c in choices:
        per_prompt[c.index // n] = max(per_prompt.get(c.index // n, 0), c.cached_tokens)
    return sum(per_prompt.values())


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


_HEADER = re.compile(r'\s*' + re.escape(TOOL_CALL_OPEN) + r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')


class ToolCallParser:
    """A chat choice's text split into content and tool calls, as it arrives.

    `feed` returns the deltas the new text allows: ("content", text), ("call", index, id,
    name) when a call's name is known, ("args", index, fragment) as its arguments arrive.
    Argument text that could be the end of the call (`}` then `</tool_call>`) is held back
    until it is known not to be. A stream and a whole response go through the same parser,
    so the accumulated stream equals the non-streamed result. Under "auto" the text is
    content unless it starts with `<tool_call>`.
    """

    def __init__(self, mode: str):
        self.buf, self.pos = "", 0
        self.state = "calls" if mode == "forced" else "start"
        self.calls: list[dict] = []
        self.content = ""
        self.args_start = self.args_sent = -1  # in the open call's arguments when >= 0

    def feed(self, text: str, final: bool = False) -> list[tuple]:
        self.buf += text
        out: list[tuple] = []
        if self.state == "start":
            lead = self.buf.lstrip()
            if lead.startswith(TOOL_CALL_OPEN):
                self.state = "calls"
            elif (lead and not TOOL_CALL_OPEN.startswith(lead)) or final:
                self.state = "text"
        if self.state == "text":
            out.append(("content", self.buf[self.pos:]))
            self.pos = len(self.buf)
        elif self.state == "calls":
            self._calls(out, final)
        self.content += "".join(d[1] for d in out if d[0] == "content")
        return [d for d in out if d[0] != "content" or d[1]]

    def _calls(self, out: list[tuple], final: bool) -> None:
        buf = self.buf
        while True:
            if self.args_start >= 0:
                close = buf.find(TOOL_CALL_CLOSE, self.args_sent)
                if close >= 0:
                    end = len(buf[:close].rstrip())
                    end = end - 1 if end > self.args_start and buf[end - 1] == "}" else end
                    end = max(self.args_sent, len(buf[:end].rstrip()))
                    self._args(out, end)
                    self.calls[-1]["arguments"] = buf[self.args_start:end]
                    self.pos, self.args_start = close + len(TOOL_CALL_CLOSE), -1
                    continue
                if final:  # cut off (max_tokens): what was written is the arguments
                    self._args(out, len(buf))
                    self.calls[-1]["arguments"] = buf[self.args_start:]
                    self.pos, self.args_start = len(buf), -1
                    return
                # Hold back a last "}" that may close the call, with the spaces around it.
                j = buf.rfind("}", self.args_sent)
                tail = buf[j + 1:].lstrip() if j >= 0 else None
                safe = j if tail is not None and TOOL_CALL_CLOSE.startswith(tail) else len(buf.rstrip())
                self._args(out, max(self.args_sent, len(buf[:safe].rstrip())))
                return
            m = _HEADER.match(buf, self.pos)
            if m is not None:
                call = {"id": "call_" + uuid.uuid4().hex[:24], "name": json.loads(f'"{m.group(1)}"'),
                        "arguments": ""}
                self.calls.append(call)
                out.append(("call", len(self.calls) - 1, call["id"], call["name"]))
                self.args_start = self.args_sent = m.end()
                continue
            if final:  # whatever follows the calls is content
                out.append(("content", buf[self.pos:].strip()))
                self.pos = len(buf)
            return

    def _args(self, out: list[tuple], end: int) -> None:
        if end > self.args_sent:
            out.append(("args", len(self.calls) - 1, self.buf[self.args_sent:end]))
            self.args_sent = end


def tool_calls_json(calls: list[dict]) -> list[dict]:
    return [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls]


def delta_json(deltas: list[tuple]) -> dict:
    """One chat stream delta from a parser's deltas (a call's start and arguments merged)."""
    out: dict = {}
    text = "".join(d[1] for d in deltas if d[0] == "content")
    if text:
        out["content"] = text
    calls: dict[int, dict] = {}
    for d in deltas:
        if d[0] == "call":
            calls[d[1]] = {"index": d[1], "id": d[2], "type": "function", "function": {"name": d[3], "arguments": ""}}
        elif d[0] == "args":
            entry = calls.setdefault(d[1], {"index": d[1], "function": {"arguments": ""}})
            entry["function"]["arguments"] += d[2]
    if calls:
        out["tool_calls"] = list(calls.values())
    return out


@dataclass
class Choice:
    """Accumulates one choice's events (non-streaming), or tracks offsets (streaming)."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    offset: int = 0  # completions text_offset of the next streamed token
    parser: ToolCallParser | None = None  # chat with tools in force
    cached_tokens: int = 0

    def add(self, ev: Event) -> None:
        self.text += ev.text
        self.logprobs += ev.logprobs
        self.finish_reason = ev.finish_reason or self.finish_reason
        self.completion_tokens = max(self.completion_tokens, ev.completion_tokens)
        self.cached_tokens = max(self.cached_tokens, ev.cached_tokens)


class Shaper:
    """Builds the JSON for one request; `chat` picks the endpoint's format."""

    def __init__(self, chat: bool, model: str, want_logprobs: bool, fingerprint: str,
                 include_usage: bool = False, tool_mode: str = "none"):
        self.chat, self.model, self.want_logprobs = chat, model, want_logprobs
        self.tool_mode = tool_mode  # "none", "auto" or "forced" (serve/grammar.py)
        self.fingerprint, self.include_usage = fingerprint, include_usage
        self.id, self.created = new_id(chat), int(time.time())

    def _base(self, obj: str) -> dict:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        if self.chat:
            out["system_fingerprint"] = self.fingerprint
        return out

    def response(self, choices: list[Choice], prompt_tokens: int, prefix: dict[int, str], n: int = 1) -> dict:
        out = self._base("chat.completion" if self.chat else "text_completion")
        out["choices"] = []
        for c in choices:
            if self.chat:
                lp = chat_logprobs(c.logprobs) if self.want_logprobs else None
                message = {"role": "assistant", "content": c.text, "refusal": None}
                finish = c.finish_reason
                if self.tool_mode != "none":
                    parser = ToolCallParser(self.tool_mode)
                    parser.feed(c.text, final=True)
                    if parser.calls:
                        message["content"] = parser.content or None
                        message["tool_calls"] = tool_calls_json(parser.calls)
                        finish = "tool_calls" if finish == "stop" else finish
                out["choices"].append({"index": c.index, "message": message, "logprobs": lp, "finish_reason": finish})
            else:
                lp = completion_logprobs(c.logprobs, len(prefix.get(c.index, ""))) if self.want_logprobs else None
                out["choices"].append({"index": c.index, "text": prefix.get(c.index, "") + c.text,
                                       "logprobs": lp, "finish_reason": c.finish_reason})
        out["usage"] = usage(prompt_tokens, sum(c.completion_tokens for c in choices), cached_of(choices, n))
        return out

    def chunk(self, choice: Choice, text: str, lps: list[TokenLogprob], finish: str | None,
              role: bool = False) -> str:
        out = self._base("chat.completion.chunk" if self.chat else "text_completion")
        if self.chat and self.tool_mode != "none" and not role:
            if choice.parser is None:
                choice.parser = ToolCallParser(self.tool_mode)
            delta = delta_json(choice.parser.feed(text, final=finish is not None))
            if finish == "stop" and choice.parser.calls:
                finish = "tool_calls"
            lp = chat_logprobs(lps) if self.want_logprobs and lps else None
            entry = {"index": choice.index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        elif self.chat:
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

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> str:
        out = self._base("chat.completion.chunk" if self.chat else "text_completion")
        out["choices"] = []
        out["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens)
        return sse(out)
