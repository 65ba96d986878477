"""THE chat template: one format shared by SFT training, the server and the HF export.

    <|system|>\\n{content}<|end|>\\n
    <|user|>\\n{content}<|end|>\\n
    <|assistant|>\\n{content}<|end|>\\n
    ...
    <|assistant|>\\n                 <- generation prompt: the model writes, then <|end|>

Each role marker and <|end|> is a single special token of the exaflop tokenizer.
`CHAT_TEMPLATE_JINJA` renders exactly the same string in transformers'
`apply_chat_template`, so exported models chat identically elsewhere.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

ROLES = ("system", "user", "assistant")
END = "<|end|>"

CHAT_TEMPLATE_JINJA = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def role_header(role: str) -> str:
    return f"<|{role}|>\n"


def render_turn(role: str, content: str) -> str:
    return f"{role_header(role)}{content}{END}\n"


def render(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages` ([{"role", "content"}]); roles must be in ROLES."""
    parts = []
    for m in messages:
        role = m["role"]
        if role not in ROLES:
            raise ValueError(f"messages: role {role!r} is not one of {', '.join(ROLES)}")
        content = m.get("content") or ""
        if not isinstance(content, str):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(render_turn(role, content))
    if add_generation_prompt:
        parts.append(role_header("assistant"))
    return "".join(parts)


# -- tools (serve/grammar.py enforces the call format) -------------------------------------

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


def tools_preamble(functions: Sequence[dict[str, Any]]) -> str:
    """What a system turn says about the callable tools (Hermes-style: one JSON per line)."""
    lines = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False, separators=(",", ":"))
                      for f in functions)
    return ("You may call tools. To call one, reply with " + TOOL_CALL_OPEN
            + '{"name":NAME,"arguments":{...}}' + TOOL_CALL_CLOSE + " (one per line).\n<tools>\n"
            + lines + "\n</tools>")


def render_tool_call(name: str, arguments: str) -> str:
    """One call as the model writes it; `arguments` is the JSON text of the arguments."""
    return f'{TOOL_CALL_OPEN}{{"name":{json.dumps(name, ensure_ascii=False)},"arguments":{arguments or "{}"}}}{TOOL_CALL_CLOSE}'


def render_tool_result(content: str) -> str:
    """A tool's result, as the content of a user turn (the template has no tool role token)."""
    return f"<tool_response>\n{content}\n</tool_response>"
