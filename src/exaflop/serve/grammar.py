"""Constrained decoding: structured outputs and tool calls enforced token by token.

A request's `response_format` (`json_object`, `json_schema`) or a tool choice that must call
a tool (`required`, or a named function) becomes an llguidance grammar here, checked against
the model's tokenizer before anything is queued: a schema keyword llguidance cannot enforce
is a 400 naming the parameter, never a schema silently ignored. Each sequence then owns an
`LLMatcher` (serve/sequence.py); every decode step asks it for the allowed-token bitmask of
its row, the sampler masks that row (serve/sampling.py), and the chosen token advances it.
llguidance computes a mask in ~0.1 ms for these vocabularies (an Earley parser over the
token trie, in Rust), so rows of different requests — constrained or not — share one batch.

Output format for tool calls, in exaflop's chat template (also how earlier calls and tool
results are rendered back into a prompt, lm/chat.py):

    <tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>

one per call, separated by a newline when parallel calls are allowed.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import torch
from llguidance import LLMatcher, LLTokenizer

from exaflop.lm.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from exaflop.serve.protocol import APIError, ChatRequest

CALL_OPEN, CALL_CLOSE = TOOL_CALL_OPEN, TOOL_CALL_CLOSE
# Compact JSON (no free whitespace): a small model cannot wander into endless spaces, and
# the text is the same whichever way it is later split into stream chunks.
_COMPACT = {"whitespace_flexible": False}

_lock = threading.Lock()


def tokenizer_for(w) -> LLTokenizer:
    """llguidance's view of a served checkpoint's tokenizer (built once per checkpoint; ~ms).
    Every special token ends a reply (serve/reload.py), so each is an end-of-sequence token."""
    with _lock:
        tok = getattr(w, "_ll_tokenizer", None)
        if tok is None:
            tok = LLTokenizer(w.tok.to_str(), n_vocab=w.vocab_size, eos_token=sorted(w.stop_ids))
            w._ll_tokenizer = tok
        return tok


def _schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "x-guidance": {**_COMPACT, **schema.get("x-guidance", {})}}


def tool_schema(tool) -> dict[str, Any]:
    """The JSON of one call of `tool`: its name, then arguments valid under its parameters."""
    params = tool.function.parameters or {"type": "object", "properties": {}, "additionalProperties": False}
    return {"type": "object", "properties": {"name": {"const": tool.function.name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def tools_in_force(body: ChatRequest) -> tuple[list, str]:
    """(the tools the model may call, the mode: "none", "auto" or "forced")."""
    tools = list(body.tools or [])
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if choice == "none" or not tools:
        if body.tool_choice not in (None, "none") and not tools:
            raise APIError(400, "tool_choice: set without tools; add tools or remove tool_choice", param="tool_choice")
        return [], "none"
    if choice == "auto":
        return tools, "auto"
    if choice == "required":
        return tools, "forced"
    named = [t for t in tools if t.function.name == choice.function.name]
    if not named:
        raise APIError(400, f"tool_choice.function.name: no tool named {choice.function.name!r} in tools",
                       param="tool_choice")
    return named, "forced"


def request_grammar(body: ChatRequest, w) -> tuple[str | None, str]:
    """The grammar a chat request's output must follow (None: free text), and the param its
    problems are reported under. Raises a 400 for what cannot be enforced."""
    tools, mode = tools_in_force(body)
    rf = body.response_format
    if mode == "forced":
        if rf is not None and rf.type != "text":
            raise APIError(400, "response_format: cannot be combined with a tool_choice that forces a tool call",
                           param="response_format")
        calls = [tool_schema(t) for t in tools]
        call = json.dumps(_schema(calls[0] if len(calls) == 1 else {"anyOf": calls}))
        sep = r' ("\n" call)*' if body.parallel_tool_calls is not False else ""
        lark = f'start: call{sep}\ncall: "{CALL_OPEN}" %json {call} "{CALL_CLOSE}"\n'
        return _checked(LLMatcher.grammar_from_lark(lark), w, "tools"), "tools"
    if rf is None or rf.type == "text":
        return None, ""
    if rf.type == "json_object":
        return _checked(LLMatcher.grammar_from_json_schema(json.dumps(_schema({"type": "object"}))), w,
                        "response_format"), "response_format"
    if rf.json_schema is None or rf.json_schema.schema_ is None:
        raise APIError(400, "response_format.json_schema.schema: required when type is json_schema",
                       param="response_format.json_schema.schema")
    param = "response_format.json_schema.schema"
    try:
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(_schema(rf.json_schema.schema_)))
    except Exception as e:  # a schema llguidance cannot even read
        raise APIError(400, f"{param}: {e}", param=param) from None
    return _checked(grammar, w, param), param


def _checked(grammar: str, w, param: str) -> str:
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, tokenizer_for(w))
    if is_error:
        detail = "; ".join(messages)[:500]
        raise APIError(400, f"{param}: cannot be enforced: {detail} (remove or rewrite that part of the schema)",
                       param=param)
    return grammar


class Constraint:
    """One sequence's position in its grammar."""

    def __init__(self, w, grammar: str):
        self.matcher = LLMatcher(tokenizer_for(w), grammar)
        if self.matcher.is_error():
            raise ValueError(f"grammar: {self.matcher.get_error()}")

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise ValueError(f"token {token} broke the output grammar: {self.matcher.get_error()}")


def mask_rows(logits: torch.Tensor, constraints: list[Constraint | None]) -> None:
    """Set the logits of tokens each constrained row's grammar forbids to -inf, in place."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return
    # Imported here, not at the top: llguidance.torch imports torch's compiler (~2 s of every
    # server's start), and most servers never see a constrained request.
    from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

    B, V = logits.shape
    bitmask = allocate_token_bitmask(B, V)
    bitmask.fill_(-1)  # unconstrained rows: everything allowed
    for i in rows:
        fill_next_token_bitmask(constraints[i].matcher, bitmask, i)
    # Unpacked eagerly here, not with llguidance.torch.apply_token_bitmask_inplace: that kernel
    # is torch.compile'd (a compile on first use), and on AVX2-only CPUs its compiled bit
    # shifts let forbidden tokens through (measured with ATEN_CPU_CAPABILITY=avx2: a mask
    # allowing token 5 allowed 150 tokens). Bit k of word j allows token 32·j + k.
    shifts = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).reshape(B, -1)[:, :V].bool()
    logits.masked_fill_(~allowed.to(logits.device), float("-inf"))
