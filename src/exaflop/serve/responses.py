"""/v1/responses, the stateless subset: text, streaming events, function tools, structured text.

A Responses request is translated into a chat request (instructions → a system message,
`function_call` items → an assistant message's tool calls, `function_call_output` items →
tool messages, `text.format` → `response_format`) and runs through the same path as
/v1/chat/completions (serve/api.py: validation, batching, constrained decoding, limits).
Its answer — a whole chat completion, or the chat stream — is re-shaped into a Response
object or the Responses event stream (`response.created` ... `response.completed`).

Not offered (a 400 names the field): `previous_response_id` (nothing is stored; `store` is
accepted and reported as false), built-in tools (web search, files, computer use).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from exaflop.serve import api
from exaflop.serve.protocol import (
    APIError,
    ChatRequest,
    FunctionCallItem,
    FunctionCallOutputItem,
    ResponsesRequest,
    StreamOptions,
)
from exaflop.serve.reload import ServedModel
from exaflop.serve.shapes import sse

# Chat parameter names in errors, as the Responses request calls them.
_PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens", "response_format": "text.format",
           "response_format.json_schema.schema": "text.format.schema"}


def _hex() -> str:
    return uuid.uuid4().hex[:24]


def to_chat(body: ResponsesRequest) -> ChatRequest:
    if body.previous_response_id is not None:
        raise APIError(400, "previous_response_id: not supported; this server stores no responses — send the "
                       "whole conversation in input", param="previous_response_id")
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    for item in items:
        if isinstance(item, dict):
            messages.append(item)
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls") is not None:
                messages[-1]["tool_calls"].append(call)  # consecutive calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        else:
            messages.append({"role": item.role, "content": item.text()})
    chat: dict[str, Any] = {"model": body.model, "messages": messages, "max_completion_tokens": body.max_output_tokens,
                            "temperature": body.temperature, "top_p": body.top_p, "user": body.user,
                            "parallel_tool_calls": body.parallel_tool_calls}
    if body.tools:
        chat["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                         for t in body.tools]
    if body.tool_choice is not None:
        tc = body.tool_choice
        chat["tool_choice"] = tc if isinstance(tc, str) else {"type": "function", "function": {"name": tc.name}}
    fmt = body.text.format if body.text is not None else None
    if fmt is not None and fmt.type == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name or "output", "schema": fmt.schema_, "strict": fmt.strict}}
    elif fmt is not None:
        chat["response_format"] = {"type": fmt.type}
    return ChatRequest.model_validate(chat)


async def create(served: ServedModel | None, body: ResponsesRequest, request: Request, server):
    try:
        chat = to_chat(body)
        if body.stream:
            chat.stream, chat.stream_options = True, StreamOptions(include_usage=True)
        answer = await api.generate(served, chat, request, server)
    except APIError as e:
        if e.param is not None:
            head = e.param.split("[")[0]
            e.param = "input" if head == "messages" else _PARAMS.get(e.param, e.param)
        raise
    shape = _Shape(body)
    if isinstance(answer, StreamingResponse):
        return StreamingResponse(shape.events(answer.body_iterator), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    if answer.status_code != 200:  # the client left (499): nobody reads this
        return answer
    data = json.loads(answer.body)
    choice = data["choices"][0]
    msg = choice["message"]
    if msg.get("content") or not msg.get("tool_calls"):
        shape.message(msg.get("content") or "")
    for c in msg.get("tool_calls") or []:
        shape.call(c["id"], c["function"]["name"], c["function"]["arguments"])
    shape.finish(choice["finish_reason"], data["usage"])
    return JSONResponse(shape.response())


class _Shape:
    """The Response object (and its events) being built from a chat answer."""

    def __init__(self, body: ResponsesRequest):
        self.body, self.id, self.created = body, "resp_" + _hex(), int(time.time())
        self.output: list[dict] = []
        self.status, self.incomplete, self.usage = "in_progress", None, None
        self.seq = 0
        self.open: dict[int, dict] = {}  # output index -> item still streaming

    # -- whole items ------------------------------------------------------------------
    def message(self, text: str) -> dict:
        item = {"type": "message", "id": "msg_" + _hex(), "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}
        self.output.append(item)
        return item

    def call(self, call_id: str, name: str, arguments: str) -> dict:
        item = {"type": "function_call", "id": "fc_" + _hex(), "call_id": call_id, "name": name,
                "arguments": arguments, "status": "completed"}
        self.output.append(item)
        return item

    def finish(self, reason: str | None, usage: dict | None) -> None:
        self.status = "incomplete" if reason == "length" else "completed"
        self.incomplete = {"reason": "max_output_tokens"} if reason == "length" else None
        for item in self.output:
            item["status"] = self.status
        if usage is not None:
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            self.usage = {"input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": cached},
                          "output_tokens": usage["completion_tokens"],
                          "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": usage["total_tokens"]}

    def response(self) -> dict:
        b = self.body
        fmt = b.text.format.model_dump(by_alias=True, exclude_none=True) if b.text and b.text.format else {"type": "text"}
        tc = b.tool_choice if isinstance(b.tool_choice, str) or b.tool_choice is None else b.tool_choice.model_dump()
        return {"id": self.id, "object": "response", "created_at": self.created, "status": self.status,
                "error": None, "incomplete_details": self.incomplete, "instructions": b.instructions,
                "max_output_tokens": b.max_output_tokens, "model": b.model, "output": self.output,
                "parallel_tool_calls": b.parallel_tool_calls is not False, "previous_response_id": None,
                "store": False, "temperature": 1.0 if b.temperature is None else b.temperature,
                "top_p": 1.0 if b.top_p is None else b.top_p, "text": {"format": fmt},
                "tool_choice": tc or ("auto" if b.tools else "none"),
                "tools": [t.model_dump(exclude_none=True) for t in b.tools or []], "truncation": "disabled",
                "usage": self.usage, "metadata": b.metadata or {}, "user": b.user}

    # -- the event stream ---------------------------------------------------------------
    def _event(self, kind: str, **fields) -> str:
        self.seq += 1
        return sse({"type": kind, "sequence_number": self.seq - 1, **fields})

    async def events(self, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        yield self._event("response.created", response=self.response())
        yield self._event("response.in_progress", response=self.response())
        text_item: int | None = None
        calls: dict[int, int] = {}  # chat tool-call index -> output index
        finish = None
        async for raw in chunks:
            data = raw.removeprefix("data: ").strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                e = chunk["error"]
                yield self._event("error", code=e.get("code"), message=e["message"], param=e.get("param"))
                self.status = "failed"
                yield self._event("response.failed", response={**self.response(), "error": {
                    "code": "server_error", "message": e["message"]}})
                return
            if chunk.get("usage"):
                self.finish(finish, chunk["usage"])
            for ch in chunk.get("choices", []):
                delta = ch.get("delta", {})
                if delta.get("content"):
                    if text_item is None:
                        text_item = len(self.output)
                        item = self.message("")
                        item["status"], item["content"] = "in_progress", []
                        self.open[text_item] = item
                        yield self._event("response.output_item.added", output_index=text_item, item=item)
                        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                        item["content"].append(part)
                        yield self._event("response.content_part.added", item_id=item["id"], output_index=text_item,
                                          content_index=0, part=part)
                    part = self.output[text_item]["content"][0]
                    part["text"] += delta["content"]
                    yield self._event("response.output_text.delta", item_id=self.output[text_item]["id"],
                                      output_index=text_item, content_index=0, delta=delta["content"], logprobs=[])
                for tc in delta.get("tool_calls") or []:
                    if tc["index"] not in calls:
                        calls[tc["index"]] = len(self.output)
                        item = self.call(tc["id"], tc["function"]["name"], "")
                        item["status"] = "in_progress"
                        self.open[calls[tc["index"]]] = item
                        yield self._event("response.output_item.added", output_index=calls[tc["index"]], item=item)
                    args = tc["function"].get("arguments") or ""
                    if args:
                        k = calls[tc["index"]]
                        self.output[k]["arguments"] += args
                        yield self._event("response.function_call_arguments.delta", item_id=self.output[k]["id"],
                                          output_index=k, delta=args)
                finish = ch.get("finish_reason") or finish
        if text_item is None and not calls:  # an empty reply is still one (empty) message
            text_item = len(self.output)
            self.message("")
            yield self._event("response.output_item.added", output_index=text_item, item=self.output[text_item])
        self.finish(finish, None if self.usage is None else {
            "prompt_tokens": self.usage["input_tokens"], "completion_tokens": self.usage["output_tokens"],
            "total_tokens": self.usage["total_tokens"], "prompt_tokens_details": self.usage["input_tokens_details"]})
        for k, item in sorted(self.open.items()):
            if item["type"] == "message":
                part = item["content"][0]
                yield self._event("response.output_text.done", item_id=item["id"], output_index=k, content_index=0,
                                  text=part["text"], logprobs=[])
                yield self._event("response.content_part.done", item_id=item["id"], output_index=k, content_index=0,
                                  part=part)
            else:
                yield self._event("response.function_call_arguments.done", item_id=item["id"], output_index=k,
                                  arguments=item["arguments"])
            yield self._event("response.output_item.done", output_index=k, item=item)
        kind = "response.incomplete" if self.status == "incomplete" else "response.completed"
        yield self._event(kind, response=self.response())
