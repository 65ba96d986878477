"""The tool-call parser on hand-written outputs: split anywhere, it gives the same calls."""

from __future__ import annotations

import pytest

from exaflop.serve.shapes import ToolCallParser, delta_json

TWO = ('<tool_call>{"name":"get_weather","arguments":{"city":"Paris","n":{"a":[1,2]}}}</tool_call>\n'
       '<tool_call>{"name":"get_time","arguments":{}}</tool_call>')


def run(text: str, mode: str, step: int) -> tuple[str, list[tuple[str, str]], list[dict]]:
    p = ToolCallParser(mode)
    deltas = []
    for i in range(0, len(text), step):
        deltas += p.feed(text[i:i + step], final=i + step >= len(text))
    calls: dict[int, list[str]] = {}
    for d in deltas:
        if d[0] == "call":
            calls[d[1]] = [d[3], ""]
        elif d[0] == "args":
            calls[d[1]][1] += d[2]
    return p.content, [tuple(v) for _, v in sorted(calls.items())], p.calls


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_two_calls_split_anywhere(step):
    content, streamed, calls = run(TWO, "forced", step)
    assert content == ""
    assert streamed == [("get_weather", '{"city":"Paris","n":{"a":[1,2]}}'), ("get_time", "{}")]
    assert [(c["name"], c["arguments"]) for c in calls] == streamed


def test_auto_plain_text_is_content():
    assert run("Hello <tool_call> world", "auto", 1)[:2] == ("Hello <tool_call> world", [])


def test_auto_call_with_spaces_and_text_after():
    text = '  <tool_call> { "name" : "f", "arguments" : {"x": 1} } </tool_call> done'
    content, streamed, _ = run(text, "auto", 1)
    assert streamed == [("f", '{"x": 1}')] and content == "done"


def test_cut_off_call_keeps_what_was_written():
    content, streamed, _ = run('<tool_call>{"name":"f","arguments":{"x":12', "forced", 4)
    assert streamed == [("f", '{"x":12')]


def test_held_back_brace_is_sent_when_it_is_not_the_end():
    p = ToolCallParser("forced")
    assert p.feed('<tool_call>{"name":"f","arguments":{"a":{"c":1')[-1] == ("args", 0, '{"a":{"c":1')
    assert p.feed("}") == []  # this "}" might close the call: held back
    assert p.feed(',"b":1}}</tool_call>') == [("args", 0, '},"b":1}')]  # it did not
    assert p.calls[0]["arguments"] == '{"a":{"c":1},"b":1}'


def test_delta_json_merges_a_calls_start_and_arguments():
    d = delta_json([("call", 0, "call_x", "f"), ("args", 0, '{"a"'), ("content", "")])
    assert d == {"tool_calls": [{"index": 0, "id": "call_x", "type": "function",
                                 "function": {"name": "f", "arguments": '{"a"'}}]}
