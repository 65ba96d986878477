"""Structured outputs and tool calling through the official `openai` client, on a real server.

The served model is the session's tiny test model (a few training steps on stdlib text): it
knows nothing of JSON or tools, so every valid output below is the grammar's doing
(serve/grammar.py) — the point of constrained decoding. Samples run at temperature 1.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from tests.serve.conftest import MODEL

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "pattern": "^[A-Z][a-z]{2,8}/[A-Z][a-z]{2,8}$"}},
        "required": ["zone"], "additionalProperties": False}}}
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, TIME)}

# Ten schemas: enums, nested objects, arrays with min/max items, $ref/$defs, string
# patterns, numbers with bounds, booleans, optional fields, anyOf, const.
STRUCTURED = [
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
     "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
        "required": ["name", "age"], "additionalProperties": False}}, "required": ["user"],
     "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                "minItems": 2, "maxItems": 4}},
     "required": ["tags"], "additionalProperties": False},
    {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                         "required": ["x", "y"], "additionalProperties": False}},
     "type": "object", "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
     "required": ["a", "b"], "additionalProperties": False},
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                      "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
     "required": ["zip", "code"], "additionalProperties": False},
    {"type": "object", "properties": {"ratio": {"type": "number", "minimum": 0, "maximum": 1},
                                      "ok": {"type": "boolean"}}, "required": ["ratio", "ok"],
     "additionalProperties": False},
    {"type": "object", "properties": {"id": {"type": "integer"}, "note": {"type": "string", "maxLength": 8}},
     "required": ["id"], "additionalProperties": False},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer"}, {"enum": ["none", "many"]}]}},
     "required": ["value"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "event"}, "items": {"type": "array", "maxItems": 3,
                                                                           "items": {"type": "boolean"}}},
     "required": ["kind", "items"], "additionalProperties": False},
    {"type": "object", "properties": {"matrix": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "integer", "minimum": -9, "maximum": 9}}}},
     "required": ["matrix"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What now?"}], **kw)


def valid_call(call, allowed: set[str]) -> None:
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in allowed
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_tool_choice_returns_a_valid_call_every_time(client):
    def one(seed: int):
        return ask(client, tools=[WEATHER, TIME], tool_choice="required", temperature=1.0, seed=seed,
                   max_tokens=120, parallel_tool_calls=False)

    with ThreadPoolExecutor(8) as pool:  # 50 prompts, batched together by the server
        replies = list(pool.map(one, range(50)))
    names = set()
    for r in replies:
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None and len(choice.message.tool_calls) == 1
        valid_call(choice.message.tool_calls[0], {"get_weather", "get_time"})
        names.add(choice.message.tool_calls[0].function.name)
    assert names == {"get_weather", "get_time"}  # the grammar leaves the choice to the model


def test_named_tool_choice_calls_that_tool(client):
    for seed in range(5):
        r = ask(client, tools=[WEATHER, TIME], temperature=1.0, seed=seed, max_tokens=120,
                tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False)
        (call,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls"
        valid_call(call, {"get_time"})


def test_streamed_tool_call_deltas_accumulate_to_the_whole_response(client):
    kw = {"tools": [WEATHER, TIME], "tool_choice": "required", "temperature": 0.0, "max_tokens": 160}
    whole = ask(client, **kw).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish, pieces = None, 0
    for chunk in ask(client, stream=True, **kw):
        ch = chunk.choices[0]
        for d in ch.delta.tool_calls or []:
            c = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            if d.id:
                assert c["id"] is None and d.function.name  # id and name come first, once
                c["id"], c["name"] = d.id, d.function.name
            c["arguments"] += d.function.arguments or ""
            pieces += 1
        finish = ch.finish_reason or finish
    assert finish == "tool_calls" and pieces > 2  # the arguments arrived in fragments
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c.function.name, c.function.arguments) for c in whole]


def test_parallel_calls_are_each_valid(client):
    # Parallel calls allowed (the default): a model that knows no tools may keep calling until
    # max_tokens; every call it finished is valid, and only the last can be cut off.
    for seed in range(5):
        r = ask(client, tools=[WEATHER, TIME], tool_choice="required", temperature=1.0, seed=seed, max_tokens=200)
        choice = r.choices[0]
        calls = choice.message.tool_calls
        complete = calls if choice.finish_reason == "tool_calls" else calls[:-1]
        assert choice.finish_reason in ("tool_calls", "length") and calls
        for c in complete:
            valid_call(c, {"get_weather", "get_time"})


def test_a_tool_result_follow_up(client):
    r = ask(client, tools=[WEATHER, TIME], tool_choice="required", temperature=1.0, seed=11, max_tokens=160,
            parallel_tool_calls=False)
    calls = r.choices[0].message.tool_calls
    for c in calls:
        valid_call(c, {"get_weather", "get_time"})
    messages = [{"role": "user", "content": "What now?"}, r.choices[0].message.model_dump(exclude_none=True)]
    messages += [{"role": "tool", "tool_call_id": c.id, "content": '{"temp": 21}'} for c in calls]
    follow = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME],
                                            tool_choice="none", max_tokens=8, temperature=0.0)
    assert follow.choices[0].finish_reason in ("stop", "length")
    assert follow.choices[0].message.tool_calls is None
    # The prompt holds the calls and the results: longer than the question alone by about the
    # calls' text (re-encoded: the grammar may have sampled a non-canonical tokenization).
    base = client.chat.completions.create(model=MODEL, messages=messages[:1], tools=[WEATHER, TIME],
                                          tool_choice="none", max_tokens=1)
    written = sum(len(c.function.arguments) + len(c.function.name) for c in calls)
    assert follow.usage.prompt_tokens - base.usage.prompt_tokens > written // 4


def test_structured_outputs_validate_across_schemas(client):
    def one(job):
        i, seed = job
        r = ask(client, temperature=1.0, seed=seed, max_tokens=200, response_format={
            "type": "json_schema", "json_schema": {"name": f"s{i}", "schema": STRUCTURED[i], "strict": True}})
        return i, r.choices[0]

    jobs = [(i, seed) for i in range(len(STRUCTURED)) for seed in range(50)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, jobs))
    assert len(results) == 500
    for i, choice in results:
        assert choice.finish_reason == "stop", (i, choice)
        jsonschema.validate(json.loads(choice.message.content), STRUCTURED[i])


def test_json_object_mode_returns_an_object(client):
    r = ask(client, temperature=1.0, seed=5, max_tokens=200, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # an unconstrained-size object may run out of tokens; it is still a JSON prefix
        assert r.choices[0].message.content.startswith("{")


@pytest.mark.parametrize("schema,keyword", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
])
def test_unsupported_schema_keyword_is_a_400_naming_the_param(client, schema, keyword):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    err = e.value.body
    assert err["param"] == "response_format.json_schema.schema" and keyword in err["message"]


def test_tool_request_mistakes_are_400s(client):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice" and "nope" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, tool_choice="required")
    assert e.value.body["param"] == "tool_choice"
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "string", "if": {"minLength": 2}}}}}}
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, tools=[bad], tool_choice="required")
    assert e.value.body["param"] == "tools" and "if" in e.value.body["message"]


def test_tool_messages_must_answer_an_earlier_call(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[
            {"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_x", "content": "1"}])
    assert e.value.body["param"] == "messages[1]" and "call_x" in e.value.body["message"]
