"""An imported Hugging Face model keeps its own chat template: exaflop renders it exactly as
transformers' `apply_chat_template` does (tools, earlier calls and tool results included), and
the server encodes the same token ids."""

from __future__ import annotations

import json
import shutil
import sys

import httpx
import pytest

transformers = pytest.importorskip("transformers")

# A tool-aware template in the style of current instruct models (written for this test):
# tools listed in the system turn, calls as <tool_call> JSON, results as <tool_response>.
TEMPLATE = (
    "{%- if tools %}{{ '<|system|>\\n' }}{% if messages[0].role == 'system' %}{{ messages[0].content + '\\n\\n' }}"
    "{% endif %}{{ '# Tools\\n<tools>' }}{% for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\\n</tools><|end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{ '<|system|>\\n' + messages[0].content + '<|end|>\\n' }}{%- endif %}\n"
    "{%- for message in messages %}\n"
    "  {%- if message.role == 'user' %}{{ '<|user|>\\n' + message.content + '<|end|>\\n' }}\n"
    "  {%- elif message.role == 'assistant' %}{{ '<|assistant|>\\n' }}{% if message.content %}{{ message.content }}{% endif %}"
    "{% for call in message.tool_calls | default([]) %}{{ '<tool_call>\\n' + ({'name': call.function.name, "
    "'arguments': call.function.arguments} | tojson) + '\\n</tool_call>' }}{% endfor %}{{ '<|end|>\\n' }}\n"
    "  {%- elif message.role == 'tool' %}{{ '<|user|>\\n<tool_response>\\n' + message.content + "
    "'\\n</tool_response><|end|>\\n' }}\n"
    "  {%- elif message.role != 'system' %}{{ raise_exception('unknown role ' + message.role) }}\n"
    "  {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather — in °C",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CONVERSATIONS = [
    [{"role": "user", "content": "the quick fox"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the lazy dog?"}],
    [{"role": "system", "content": "use tools"}, {"role": "user", "content": "weather in Zürich?"},
     {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
         "name": "get_weather", "arguments": '{"city":"Zürich"}'}}]},
     {"role": "tool", "tool_call_id": "call_1", "content": '{"t": 21}'}],
]


@pytest.fixture(scope="module")
def imported(tiny_run, tmp_path_factory):
    from exaflop.lm.hf import export
    from exaflop.lm.hf_import import import_hf

    tmp = tmp_path_factory.mktemp("tmpl")
    src = export(tiny_run, tmp / "hf")
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    run = import_hf(src, name="imported", out_dir=str(tmp / "runs"), data_dir=str(tmp / "data"))
    return src, run


def _hf_args(messages):
    # transformers' templates take call arguments as objects, as exaflop passes them.
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append({k: v for k, v in m.items() if v is not None})
    return out


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("with_tools", [False, True])
def test_rendering_equals_transformers(imported, conv, with_tools):
    from exaflop.lm.chat import ChatTemplate

    src, run = imported
    template = ChatTemplate.from_dir(run / "tokenizer")
    assert not template.native
    tools = TOOLS if with_tools else None
    hf = transformers.AutoTokenizer.from_pretrained(src)
    want = hf.apply_chat_template(_hf_args(CONVERSATIONS[conv]), tools=tools, tokenize=False,
                                  add_generation_prompt=True)
    assert template.render(CONVERSATIONS[conv], tools) == want


def test_exported_exaflop_template_stays_native(tiny_run, tmp_path):
    from exaflop.lm.chat import ChatTemplate
    from exaflop.lm.hf import export
    from exaflop.lm.hf_import import import_hf

    run = import_hf(export(tiny_run, tmp_path / "hf"), name="back", out_dir=str(tmp_path / "runs"),
                    data_dir=str(tmp_path / "data"))
    assert ChatTemplate.from_dir(run / "tokenizer").native


def test_server_encodes_the_imported_template(imported, tmp_path):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[2]))
    from tests.serve.conftest import ServerProcess

    src, run = imported
    hf = transformers.AutoTokenizer.from_pretrained(src)
    server = ServerProcess([run], tmp_path / "server.log").wait_ready()
    try:
        for conv in CONVERSATIONS:
            r = httpx.post(server.url + "/tokenize", json={"model": "imported", "messages": conv, "tools": TOOLS})
            assert r.status_code == 200, r.text
            want = hf.apply_chat_template(_hf_args(conv), tools=TOOLS, tokenize=True, add_generation_prompt=True)
            want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
            assert r.json()["tokens"] == list(want)
        # The template's own refusal is the client's mistake: a 400, not a 500.
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": "imported", "messages": [
            {"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c", "content": "y"}]})
        assert r.status_code == 400
    finally:
        server.stop()
    shutil.rmtree(tmp_path / "unused", ignore_errors=True)


SFT_CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "capital of France?"},
            {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "and of Italy?"},
            {"role": "assistant", "content": "Rome, since 1871."}]


def test_sft_renders_and_masks_with_the_imported_template(imported, tmp_path):
    """Fine-tuning an imported run trains on the tokens its own template makes (the ones serving and
    transformers make), with the loss on exactly each assistant turn as the template writes it."""
    from exaflop.lm.chat import ChatTemplate
    from exaflop.lm.sft import build_splits, encode_conversation
    from exaflop.lm.tokenizer import load_tokenizer

    src, run = imported
    data = run.parent.parent / "data"  # the imported run's data.path (import_hf data_dir)
    tok, template = load_tokenizer(data / "tokenizer.json"), ChatTemplate.from_dir(data)
    assert not template.native
    ids, mask = encode_conversation(tok, SFT_CONV, template)
    hf = transformers.AutoTokenizer.from_pretrained(src)
    want = hf.apply_chat_template(SFT_CONV, tokenize=True, add_generation_prompt=False)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert ids.tolist() == list(want)
    learned = tok.decode(ids[mask].tolist(), skip_special_tokens=False)
    assert learned == "Paris.<|end|>\nRome, since 1871.<|end|>\n"
    assert "<|assistant|>" not in learned and "capital" not in learned  # headers and prompts are masked
    # Through build_splits, what `exaflop train` with data.sft_path reads.
    path = tmp_path / "chats.jsonl"
    good = [{"messages": SFT_CONV}, {"messages": SFT_CONV[1:3]}, {"messages": SFT_CONV[:3]}]
    path.write_text("\n".join(json.dumps(x) for x in good) + "\n")
    splits, stats = build_splits(str(path), data / "tokenizer.json", 64)
    assert stats.used == 3 and sum(len(v) for v in splits.values()) == 3
    row = next(r for v in splits.values() for r in v if r[1].sum() > 0)
    assert tok.decode(row[0][row[1].astype(bool)].tolist(), skip_special_tokens=False).startswith("Paris.<|end|>")


def test_sft_skips_conversations_a_template_cannot_mask():
    """A template that rewrites earlier turns (here: only the last assistant reply keeps its text, as
    templates that strip earlier reasoning do) cannot be masked by rendering prefixes: the
    conversation is refused with that reason, never trained on with a wrong mask."""
    from exaflop.lm.chat import ChatTemplate
    from exaflop.lm.sft import NotMaskable, encode_conversation

    strips = ChatTemplate("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}<A>{% else %}"
                          "<{{ m.role }}>{{ m.content }}{% endif %}{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    with pytest.raises(NotMaskable, match="prefix"):
        encode_conversation(None, SFT_CONV, strips)  # refused before any tokenizing
