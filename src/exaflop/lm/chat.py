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
