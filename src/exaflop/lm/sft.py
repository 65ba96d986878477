"""Chat fine-tuning data: conversations -> (tokens, loss mask) samples.

`data.sft_path` names JSONL with one `{"messages": [{"role", "content"}, ...]}` per
line, or `builtin:stdlib-docs`, a demo set generated here from the docstrings of the
Python standard library ("What is the module `json` for?" -> its docstring's summary).

A conversation is rendered with the run's chat template (exaflop.lm.chat.ChatTemplate, the
one the server uses: exaflop's own, or an imported model's Jinja template) and tokenized
whole, so training sees exactly the tokens inference will. The loss covers only what the
assistant writes: its content and the marker that closes its turn. Role headers, system and
user turns and padding are masked out, decided per token from the character spans of the
rendered text. With an imported template the spans come from rendering the conversation up
to each assistant turn (with the generation prompt) and through it: the difference is that
turn as the template writes it. A template that does not render a conversation as a prefix
of its continuation (some drop earlier turns' reasoning) cannot be masked this way: such
conversations are skipped and counted, never trained on with a wrong mask.
A sample is one conversation, cut to seq_len+1 tokens and padded (<|pad|>, or the
tokenizer's own pad / end-of-text token for an imported one: padding is never attended to
by a real token and never in the loss).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sysconfig
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exaflop.errors import UserError
from exaflop.lm.chat import END, ROLES, ChatTemplate, render_turn, role_header
from exaflop.lm.shards import is_val
from exaflop.lm.tokenizer import load_tokenizer

BUILTIN = "builtin:stdlib-docs"
VAL_FRACTION = 0.05
PAD = "<|pad|>"


@dataclass
class SFTStats:
    used: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> lines

    def summary(self) -> str:
        parts = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return f"{self.used} conversations" + (f"; skipped {sum(self.skipped.values())}: {parts}" if parts else "")


def check_messages(obj: Any) -> str | None:
    """None for a trainable conversation, else why the line is skipped."""
    msgs = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(msgs, list) or not msgs:
        return "without a messages list"
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return "with a malformed message"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        return "without an assistant turn"
    return None


def read_jsonl(path: Path, stats: SFTStats) -> list[list[dict[str, str]]]:
    if not path.is_file():
        raise UserError(f"data.sft_path: {path} not found; give a JSONL of "
                        f'{{"messages": [...]}} lines or {BUILTIN!r}')
    convs = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                stats.skipped["not valid JSON"] += 1
                continue
            why = check_messages(obj)
            if why:
                stats.skipped[why] += 1
                continue
            convs.append([{"role": m["role"], "content": m["content"]} for m in obj["messages"]])
    return convs


# -- the embedded demo set --------------------------------------------------------------------

_MODULE_QUESTIONS = ("What is the Python module `{}` for?", "What does the `{}` module do?",
                     "Briefly, what is `{}` in the standard library?")
_OBJECT_QUESTIONS = ("What does `{}` do?", "Explain `{}` in one paragraph.", "What is `{}`?")
SYSTEM = "You answer questions about the Python standard library from its documentation."


def _summary(doc: str, limit: int = 400) -> str:
    """The docstring's first paragraph on one line, cut at a sentence end near `limit` chars."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    if len(para) > limit:
        cut = para.rfind(". ", 0, limit)
        para = para[:cut + 1] if cut > 40 else para[:limit].rsplit(" ", 1)[0] + " ..."
    return para


def _pick(options: tuple[str, ...], key: str) -> str:
    return options[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(options)]


def stdlib_doc_conversations(limit: int = 3000) -> list[list[dict[str, str]]]:
    """Q&A from top-level stdlib modules' docstrings (parsed, never imported): deterministic."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py")) + sorted(root.glob("*/__init__.py"))
    convs: list[list[dict[str, str]]] = []
    for path in files:
        if len(convs) >= limit:
            break
        mod = path.parent.name if path.name == "__init__.py" else path.stem
        if mod.startswith("_") or mod in ("this", "antigravity"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        items = [(mod, _MODULE_QUESTIONS, ast.get_docstring(tree))]
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                items.append((f"{mod}.{node.name}", _OBJECT_QUESTIONS, ast.get_docstring(node)))
        for name, questions, doc in items:
            answer = _summary(doc or "")
            if len(answer) < 20:
                continue
            msgs = [{"role": "user", "content": _pick(questions, name).format(name)},
                    {"role": "assistant", "content": answer}]
            if _pick(("system", "", ""), name + "/s"):  # a third carry the system turn
                msgs.insert(0, {"role": "system", "content": SYSTEM})
            convs.append(msgs)
    return convs[:limit]


def load_conversations(spec: str) -> tuple[list[list[dict[str, str]]], SFTStats]:
    stats = SFTStats()
    convs = stdlib_doc_conversations() if spec == BUILTIN else read_jsonl(Path(spec), stats)
    stats.used = len(convs)
    if not convs:
        raise UserError(f"data.sft_path: {spec} has no usable conversation ({stats.summary()}); "
                        'each line needs {"messages": [...]} with an assistant turn')
    return convs, stats


# -- tokens and mask ---------------------------------------------------------------------------

class NotMaskable(ValueError):
    """The run's template cannot render this conversation so that its assistant turns are found."""


def encode_conversation(tok, messages: list[dict[str, str]],
                        template: ChatTemplate | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, 1 where the token is assistant output) for the rendered conversation."""
    if template is not None and not template.native:
        return _encode_with_template(tok, messages, template)
    text, spans, pos = [], [], 0
    for m in messages:
        turn = render_turn(m["role"], m["content"])
        if m["role"] == "assistant":
            start = pos + len(role_header("assistant"))
            spans.append((start, start + len(m["content"]) + len(END)))
        text.append(turn)
        pos += len(turn)
    enc = tok.encode("".join(text), add_special_tokens=False)
    starts = np.array([s for s, _ in enc.offsets], dtype=np.int64)
    mask = np.zeros(len(starts), dtype=bool)
    for a, b in spans:
        mask |= (starts >= a) & (starts < b)
    return np.asarray(enc.ids, dtype=np.int64), mask


def _encode_with_template(tok, messages: list[dict[str, str]], template: ChatTemplate) -> tuple[np.ndarray, np.ndarray]:
    try:
        text = template.render(messages, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = template.render(messages[:i], add_generation_prompt=True)
            through = template.render(messages[:i + 1], add_generation_prompt=False)
            if not (through.startswith(before) and text.startswith(through)):
                raise NotMaskable("the model's chat template does not render it as a prefix of its continuation")
            spans.append((len(before), len(through)))
    except NotMaskable:
        raise
    except Exception as e:  # the template's own checks (raise_exception) and Jinja errors
        raise NotMaskable(f"the model's chat template refused it ({type(e).__name__})") from None
    # Special-token strings in the rendered text are those tokens, as when serving (serve/api.py).
    previous = tok.encode_special_tokens
    tok.encode_special_tokens = False
    try:
        enc = tok.encode(text, add_special_tokens=False)
    finally:
        tok.encode_special_tokens = previous
    starts = np.array([a for a, _ in enc.offsets], dtype=np.int64)
    mask = np.zeros(len(starts), dtype=bool)
    for a, b in spans:
        mask |= (starts >= a) & (starts < b)
    return np.asarray(enc.ids, dtype=np.int64), mask


def _pad_id(tok, template: ChatTemplate) -> int | None:
    """exaflop's <|pad|>, else (an imported tokenizer) its own pad or end-of-text token."""
    for name in (PAD, template.tokens.get("pad_token"), template.tokens.get("eos_token"), "<|endoftext|>"):
        if name and tok.token_to_id(name) is not None:
            return tok.token_to_id(name)
    return None


class SFTSamples:
    """Random access to padded conversations: sample i is a (2, seq_len+1) int64 array (ids, mask)."""

    def __init__(self, arrays: np.ndarray):
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.arrays[i]


_cache: dict[tuple[str, str, int], tuple[dict[str, np.ndarray], SFTStats]] = {}


def build_splits(spec: str, tokenizer_path: Path, seq_len: int) -> tuple[dict[str, np.ndarray], SFTStats]:
    # Absolute paths and modification times: one process may build splits from several working
    # directories (a relative 'data/x.jsonl' is another file in each) or after a file changed.
    def where(path: str | Path) -> str:
        p = Path(path)
        return f"{p.resolve()}@{p.stat().st_mtime_ns}" if p.exists() else str(path)

    key = (where(spec), where(tokenizer_path), seq_len)
    if key in _cache:
        return _cache[key]
    tok = load_tokenizer(tokenizer_path)
    template = ChatTemplate.from_dir(Path(tokenizer_path).parent)  # the run's own, as serving renders
    pad = _pad_id(tok, template)
    if pad is None:
        raise UserError(f"data.sft_path: the tokenizer {tokenizer_path} has no {PAD}, pad or end-of-text "
                        "token for padding")
    convs, stats = load_conversations(spec)
    rows: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    width = seq_len + 1
    for msgs in convs:
        try:
            ids, mask = encode_conversation(tok, msgs, template)
        except NotMaskable as e:
            stats.skipped[str(e)] += 1
            continue
        ids, mask = ids[:width], mask[:width]
        if not mask[1:].any():  # nothing of the assistant's left to learn after the cut
            stats.skipped["whose assistant turn starts after model.seq_len tokens"] += 1
            continue
        row = np.full((2, width), pad, dtype=np.int64)
        row[1] = 0
        row[0, :len(ids)], row[1, :len(ids)] = ids, mask
        split = "val" if is_val(json.dumps(msgs, sort_keys=True), VAL_FRACTION) else "train"
        rows[split].append(row)
    stats.used = len(rows["train"]) + len(rows["val"])
    if not rows["val"] and len(rows["train"]) > 1:  # tiny sets: still hold one out
        rows["val"].append(rows["train"].pop())
    if not rows["train"]:
        raise UserError(f"data.sft_path: {spec} leaves no training conversation ({stats.summary()})")
    splits = {k: np.stack(v) for k, v in rows.items()}
    _cache[key] = (splits, stats)
    if stats.skipped:
        from exaflop.progress import console

        console.print(f"[yellow]sft: {spec}: {stats.summary()}")
    return splits, stats


def sft_dataset(spec: str, tokenizer_path: Path, split: str, seq_len: int) -> SFTSamples:
    splits, _ = build_splits(spec, tokenizer_path, seq_len)
    return SFTSamples(splits[split])


def collate_sft(samples: list[np.ndarray]) -> dict[str, Any]:
    import torch  # here: every `exaflop` command builds its parser from this module, most never train

    x = torch.from_numpy(np.stack(samples))  # (B, 2, T+1)
    ids, mask = x[:, 0], x[:, 1]
    # Position t predicts token t+1: the loss counts it when that token is the assistant's.
    return {"input": ids[:, :-1].contiguous(), "target": ids[:, 1:].contiguous(),
            "loss_mask": mask[:, 1:].contiguous().bool()}


def _cmd_data_sft(args: argparse.Namespace) -> int:
    convs, stats = load_conversations(args.source)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for msgs in convs:
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    print(f"{out}: {stats.summary()}")
    return 0


def add_data_parser(dsub: Any) -> None:
    """`exaflop data sft`: write the demo set (or a cleaned copy of a JSONL) for inspection or editing."""
    p = dsub.add_parser("sft", help="write chat fine-tuning JSONL (default: the stdlib-docs demo set)")
    p.add_argument("--source", default=BUILTIN, help=f"{BUILTIN} or a JSONL of {{\"messages\": [...]}}")
    p.add_argument("--out", default="data/sft/stdlib-docs.jsonl", help="output JSONL file")
    p.set_defaults(func=_cmd_data_sft)
