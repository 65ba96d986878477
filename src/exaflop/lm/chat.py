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
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
# An imported model's tokenizer_config.json, kept in the run's tokenizer folder (its chat template).
HF_TOKENIZER_CONFIG = "hf_tokenizer_config.json"
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


# -- one rendering path: exaflop's template, or the one an imported model brought ---------------

def exaflop_turns(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
                  ) -> list[tuple[str, str]]:
    """OpenAI-shaped messages as exaflop template turns (role, content): developer is system, a
    tool result is a user turn wrapping it, an assistant's earlier calls are written as the
    model writes them, and `tools` (their `function` objects) are described at the end of the
    system turn."""
    turns: list[tuple[str, str]] = []
    for m in messages:
        content = _text(m.get("content"))
        if m["role"] == "tool":
            turns.append(("user", render_tool_result(content)))
        elif m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(render_tool_call(c["function"]["name"], _arguments_text(c["function"]["arguments"]))
                              for c in m["tool_calls"])
            turns.append(("assistant", f"{content}\n{calls}" if content else calls))
        else:
            turns.append(("system" if m["role"] == "developer" else m["role"], content))
    if tools:
        preamble = tools_preamble([t.get("function", t) for t in tools])
        if turns and turns[0][0] == "system":
            turns[0] = ("system", f"{turns[0][1]}\n\n{preamble}" if turns[0][1] else preamble)
        else:
            turns.insert(0, ("system", preamble))
    return turns


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict))


def _arguments_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))


class ChatTemplate:
    """How a run's conversations become prompt text.

    exaflop-trained runs use THE template above (`jinja` None; serving encodes it with role
    markers as special tokens and content as plain text). A run imported from Hugging Face
    keeps the Jinja template its tokenizer_config.json brought (RUN/tokenizer/
    hf_tokenizer_config.json), rendered the way transformers' `apply_chat_template` renders it
    — a sandboxed Jinja environment with trimmed blocks, loop controls, `raise_exception`,
    `strftime_now` and a non-ASCII-escaping `tojson` — with the special tokens it names
    (bos_token, eos_token, ...), `tools` when given, and tool-call arguments as objects.
    """

    def __init__(self, jinja: str | dict[str, str] | None = None, tokens: dict[str, str] | None = None):
        self.jinja, self.tokens = jinja, tokens or {}
        self._compiled: dict[str, Any] = {}

    @classmethod
    def from_dir(cls, tokenizer_dir: Path | str) -> ChatTemplate:
        """The template of the run whose tokenizer folder is `tokenizer_dir`."""
        path = Path(tokenizer_dir) / HF_TOKENIZER_CONFIG
        if not path.is_file():
            return cls()
        cfg = json.loads(path.read_text())
        jinja = cfg.get("chat_template")
        if isinstance(jinja, list):  # named templates: {"name": "default" | "tool_use" | ..., "template"}
            jinja = {t["name"]: t["template"] for t in jinja}
        if not jinja or jinja == CHAT_TEMPLATE_JINJA:  # our own, exported and imported back
            return cls()
        tokens = {}
        for k, v in cfg.items():
            if k.endswith("_token") and v is not None:
                tokens[k] = v["content"] if isinstance(v, dict) else v
        return cls(jinja, tokens)

    @property
    def native(self) -> bool:
        return self.jinja is None

    def render(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
               add_generation_prompt: bool = True) -> str:
        if self.native:
            out = "".join(render_turn(r, c) for r, c in exaflop_turns(messages, tools))
            return out + (role_header("assistant") if add_generation_prompt else "")
        source = self.jinja
        if isinstance(source, dict):
            source = source.get("tool_use") if tools and "tool_use" in source else source.get("default")
            if source is None:
                raise ValueError("the model's chat templates have no 'default' entry")
        template = self._compiled.get(source)
        if template is None:
            template = self._compiled[source] = _jinja_env().from_string(source)
        msgs = [_for_template(m) for m in messages]
        return template.render(messages=msgs, tools=list(tools) if tools else None,
                               add_generation_prompt=add_generation_prompt, **self.tokens)


def _for_template(m: dict[str, Any]) -> dict[str, Any]:
    """A message as Hugging Face templates expect it: text content, and call arguments as objects."""
    out = {k: v for k, v in m.items() if v is not None}
    out["content"] = _text(m.get("content")) if m.get("content") is not None else None
    if out["content"] is None:
        out.pop("content")
    if m.get("tool_calls"):
        out["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _arguments_obj(c["function"]["arguments"])}}
                             for c in m["tool_calls"]]
    return out


def _arguments_obj(arguments: Any) -> Any:
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # not JSON (a model's cut-off call): the template gets the text


def _jinja_env():
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env
