"""/v1/responses through the official client: plain, streamed, a forced tool call and its result."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.serve.conftest import MODEL

TOOL = {"type": "function", "name": "lookup", "parameters": {
    "type": "object", "properties": {"key": {"enum": ["a", "b"]}, "n": {"type": "integer", "minimum": 0,
                                                                      "maximum": 9}},
    "required": ["key", "n"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_plain_response_equals_the_chat_answer(client):
    r = client.responses.create(model=MODEL, input="What does json.dumps do?", instructions="Be brief.",
                                temperature=0.0, max_output_tokens=12)
    chat = client.chat.completions.create(model=MODEL, temperature=0.0, max_tokens=12, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does json.dumps do?"}])
    assert r.object == "response" and r.id.startswith("resp_") and r.store is False
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    expect = "incomplete" if chat.choices[0].finish_reason == "length" else "completed"
    assert r.status == expect


def test_streamed_events_add_up_to_the_response(client):
    kw = {"model": MODEL, "input": "def parse(", "temperature": 0.0, "max_output_tokens": 16}
    whole = client.responses.create(**kw)
    kinds, text, final = [], "", None
    seqs = []
    for ev in client.responses.create(stream=True, **kw):
        kinds.append(ev.type)
        seqs.append(ev.sequence_number)
        if ev.type == "response.output_text.delta":
            text += ev.delta
        if ev.type in ("response.completed", "response.incomplete"):
            final = ev.response
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete") and "response.output_text.done" in kinds
    assert seqs == list(range(len(seqs)))
    assert text == whole.output_text == final.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_forced_function_call_then_its_output(client):
    r = client.responses.create(model=MODEL, input="Look it up.", tools=[TOOL], tool_choice="required",
                                parallel_tool_calls=False, temperature=1.0, max_output_tokens=80)
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "lookup" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), TOOL["parameters"])
    follow = client.responses.create(model=MODEL, tools=[TOOL], tool_choice="none", max_output_tokens=4, input=[
        {"role": "user", "content": "Look it up."},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"value": 3}'}])
    base = client.responses.create(model=MODEL, tools=[TOOL], tool_choice="none", max_output_tokens=1,
                                   input="Look it up.")
    # The call and its output are in the prompt: more than the question alone by their text.
    assert follow.output[0].type == "message"
    assert follow.usage.input_tokens - base.usage.input_tokens > len(call.arguments) // 4 + 5


def test_streamed_function_call_arguments(client):
    kw = {"model": MODEL, "input": "Look it up.", "tools": [TOOL], "tool_choice": "required",
          "parallel_tool_calls": False, "temperature": 0.0, "max_output_tokens": 80}
    whole = [o for o in client.responses.create(**kw).output if o.type == "function_call"][0]
    args, done = "", None
    for ev in client.responses.create(stream=True, **kw):
        if ev.type == "response.function_call_arguments.delta":
            args += ev.delta
        if ev.type == "response.function_call_arguments.done":
            done = ev.arguments
    assert args == done == whole.arguments


def test_structured_text_format(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = client.responses.create(model=MODEL, input="ok?", temperature=1.0, max_output_tokens=40,
                                text={"format": {"type": "json_schema", "name": "s", "schema": schema}})
    jsonschema.validate(json.loads(r.output_text), schema)


def test_unsupported_fields_are_400s_naming_them(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_123")
    assert e.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="x", text={"format": {
            "type": "json_schema", "name": "s", "schema": {"type": "array", "uniqueItems": True}}})
    assert e.value.body["param"] == "text.format.schema"
