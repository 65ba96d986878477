"""/v1/completions and /v1/chat/completions: request → sequences → response or stream.

Everything a client can get wrong is checked here, before anything is queued, and
answered as an APIError (4xx, OpenAI shape). Each prompt × n becomes one engine
Sequence; their events come back through an asyncio queue fed from the engine
thread with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from exaflop.lm.chat import END, exaflop_turns, role_header
from exaflop.serve.auth import RateLimited
from exaflop.serve.grammar import request_grammar, tools_in_force
from exaflop.serve.protocol import APIError, ChatRequest, CompletionRequest
from exaflop.serve.reload import ServedModel, Weights
from exaflop.serve.scheduler import QueueFull
from exaflop.serve.sequence import Event, Handle, SamplingParams, Sequence
from exaflop.serve.shapes import Choice, Shaper, cached_of, sse

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy completions endpoint


def _encode(tok, text: str, param: str, special: bool = False) -> list[int]:
    """Plain text's ids; `special`: special-token strings in it become those tokens."""
    try:
        if not special:
            return tok.encode(text, add_special_tokens=False).ids
        previous = tok.encode_special_tokens
        tok.encode_special_tokens = False
        try:
            return tok.encode(text, add_special_tokens=False).ids
        finally:
            tok.encode_special_tokens = previous
    except Exception:  # e.g. a lone UTF-16 surrogate ("\\ud800") in the JSON: not encodable text
        raise APIError(400, f"{param}: text is not valid Unicode (lone surrogate?)", param=param) from None


def encode_chat(tok, messages: list[tuple[str, str]]) -> list[int]:
    """lm.chat's template, with message content encoded as plain text.

    Role markers are special tokens; content is tokenized with special-token parsing
    off, so text like "<|end|>" typed by a user cannot forge a turn boundary. Each
    piece starts after a newline or a special token (a pre-tokenizer boundary), so
    for ordinary content the ids equal those of encoding lm.chat.render()'s string.
    """
    ids: list[int] = []
    previous = tok.encode_special_tokens
    try:
        for role, content in messages:
            tok.encode_special_tokens = False
            ids += tok.encode(role_header(role), add_special_tokens=False).ids
            if content:
                tok.encode_special_tokens = True
                ids += _encode(tok, content, "messages")
            tok.encode_special_tokens = False
            ids += tok.encode(END + "\n", add_special_tokens=False).ids
        tok.encode_special_tokens = False
        ids += tok.encode(role_header("assistant"), add_special_tokens=False).ids
    finally:
        tok.encode_special_tokens = previous
    return ids


def chat_messages(body: ChatRequest) -> tuple[list[dict], list[dict] | None]:
    """The request's messages as OpenAI-shaped dicts, and the tools in force (None: none), after
    the checks templates do not make: a tool result must answer an earlier call."""
    called: set[str] = set()  # ids of the calls earlier assistant messages made
    msgs = []
    for i, m in enumerate(body.messages):
        if m.role == "tool":
            if m.tool_call_id is None:
                raise APIError(400, f"messages[{i}].tool_call_id: required for role tool", param=f"messages[{i}]")
            if m.tool_call_id not in called:
                raise APIError(400, f"messages[{i}]: a tool message must answer a call of an earlier assistant "
                               f"message (no tool_calls entry has id {m.tool_call_id!r})", param=f"messages[{i}]")
        if m.tool_calls:
            called |= {c.id for c in m.tool_calls}
        msg: dict = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            msg["content"] = m.text() or None
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        msgs.append(msg)
    tools, _ = tools_in_force(body)
    return msgs, [t.model_dump(exclude_none=True) for t in tools] or None


def chat_prompt(body: ChatRequest, w: Weights) -> list[int]:
    """Token ids of a chat request's prompt, rendered with the run's template (lm.chat.ChatTemplate):
    exaflop's (role markers special, content plain text) or an imported model's own Jinja one
    (encoded as transformers encodes it: special tokens in the text are parsed)."""
    msgs, tools = chat_messages(body)
    if w.template.native:
        return encode_chat(w.tok, exaflop_turns(msgs, tools))
    try:
        text = w.template.render(msgs, tools)
    except Exception as e:  # the template's own checks (raise_exception) and Jinja errors
        raise APIError(400, f"messages: the model's chat template refused them: {e}", param="messages") from None
    return _encode(w.tok, text, "messages", special=True)


def _prepare(body: CompletionRequest | ChatRequest, w: Weights) -> tuple[list[list[int]], str | None]:
    """Token ids of each prompt, and the output grammar (structured outputs, forced tool calls)."""
    grammar = request_grammar(body, w)[0] if isinstance(body, ChatRequest) else None
    return _prompts(body, w), grammar


def _prompts(body: CompletionRequest | ChatRequest, w: Weights) -> list[list[int]]:
    if isinstance(body, ChatRequest):
        return [chat_prompt(body, w)]
    p = body.prompt
    if isinstance(p, str):
        texts = [p]
    elif all(isinstance(x, str) for x in p):
        texts = list(p)  # type: ignore[arg-type]
    elif all(isinstance(x, int) for x in p):
        return [_check_ids(list(p), w)]  # type: ignore[arg-type]
    else:
        return [_check_ids(list(x), w) for x in p]  # type: ignore[union-attr]
    out = []
    for t in texts:
        ids = _encode(w.tok, t, "prompt")
        out.append(ids or [w.eot_id])  # an empty prompt starts a fresh document
    return out


def _texts(body: CompletionRequest | ChatRequest) -> tuple[str, list[int]]:
    """(param, characters of text per prompt) of a request, before any tokenization."""
    if isinstance(body, ChatRequest):
        tools = sum(len(t.model_dump_json()) for t in body.tools or [])  # described in the prompt
        return "messages", [sum(len(m.text() or "") for m in body.messages) + tools]
    p = body.prompt
    if isinstance(p, str):
        return "prompt", [len(p)]
    return "prompt", [len(x) for x in p if isinstance(x, str)]


def _check_length(body: CompletionRequest | ChatRequest, w: Weights) -> None:
    """Refuse text that cannot fit the context without tokenizing it: each token covers
    at most `w.max_token_chars` characters, so more than (ctx - 1) x that many characters
    is over the context whatever the tokenizer makes of them. This bounds the work (and
    memory) one request can cause before its real length is known."""
    param, lengths = _texts(body)
    bound = (w.ctx - 1) * w.max_token_chars
    longest = max(lengths, default=0)
    if longest > bound:
        raise APIError(400, f"This model's maximum context length is {w.ctx} tokens, but the {param} has "
                       f"{longest} characters, more than {w.ctx - 1} tokens of at most {w.max_token_chars} "
                       "characters each can hold. Shorten the prompt.", param=param,
                       code="context_length_exceeded")


# Tokenization and template rendering run here, not on the event loop: a long prompt would
# otherwise stall /health and every stream. One thread, because encode_chat toggles the
# shared tokenizer's special-token flag (and _check_length bounds each job's size).
_TOKENIZE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="exaflop-tokenize")


def _check_ids(ids: list[int], w: Weights) -> list[int]:
    bad = [i for i in ids if i >= w.vocab_size]
    if bad:
        raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary (size {w.vocab_size})",
                       param="prompt")
    return ids


def _params(body: CompletionRequest | ChatRequest, w: Weights, longest: int) -> SamplingParams:
    chat = isinstance(body, ChatRequest)
    if chat:
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs: requires logprobs=true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens
    else:
        if body.best_of is not None and body.best_of != (body.n or 1):
            raise APIError(400, "best_of: only best_of equal to n is supported", param="best_of")
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo: cannot be combined with logprobs here", param="echo")
        logprobs = body.logprobs
        max_tokens = body.max_tokens
    room = w.ctx - longest
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {w.ctx} tokens, but the prompt has "
                       f"{longest} tokens (leave room for at least one new token). Shorten the prompt.",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    if max_tokens is not None and longest + max_tokens > w.ctx:
        field = ("max_completion_tokens" if body.max_completion_tokens else "max_tokens") if chat else "max_tokens"
        raise APIError(400, f"This model's maximum context length is {w.ctx} tokens. However, you requested "
                       f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} for the "
                       "completion). Reduce the prompt or the completion length.",
                       param=field, code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = room if chat else min(COMPLETIONS_DEFAULT_MAX_TOKENS, room)
    bias: dict[int, float] = {}
    for k, v in (body.logit_bias or {}).items():
        if not k.isdigit() or int(k) >= w.vocab_size:
            raise APIError(400, f"logit_bias: key {k!r} is not a token id below {w.vocab_size}", param="logit_bias")
        bias[int(k)] = v
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=bias, seed=body.seed, stop=stop, logprobs=logprobs)


async def generate(served: ServedModel | None, body: CompletionRequest | ChatRequest, request: Request,
                   server) -> JSONResponse | StreamingResponse:
    chat = isinstance(body, ChatRequest)
    if served is None:
        raise APIError(404, f"The model `{body.model}` does not exist", param="model", code="model_not_found")
    w = served.weights
    if w is None:
        raise APIError(503, f"model `{body.model}` is still loading; retry shortly", type="server_error",
                       code="model_loading", retry_after=5)
    _check_length(body, w)
    prompts, grammar = await asyncio.get_running_loop().run_in_executor(_TOKENIZE, _prepare, body, w)
    params = _params(body, w, max(len(p) for p in prompts))
    params.grammar = grammar
    tool_mode = tools_in_force(body)[1] if chat else "none"
    n = body.n or 1
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options: only allowed when stream is true", param="stream_options")
    prompt_tokens = sum(len(p) for p in prompts)
    key = request.scope.get("state", {}).get("key_id", "anonymous")
    try:
        server.limiter.admit(key, prompt_tokens)
    except RateLimited as e:
        raise APIError(429, str(e), type="requests", code="rate_limit_exceeded", retry_after=e.retry_after) from None

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()

    handle = Handle(loop=loop, queue=queue, user=body.user)
    seqs = [Sequence(handle, pi * n + j, ids, params) for pi, ids in enumerate(prompts) for j in range(n)]
    try:
        served.engine.submit(seqs)
    except QueueFull as e:
        raise APIError(503, f"server is at capacity: {e}; retry later", type="server_error",
                       code="queue_full", retry_after=1) from None
    echo = {}
    if not chat and body.echo:
        echo = {s.index: w.tok.decode(s.prompt_ids, skip_special_tokens=False) for s in seqs}
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    shaper = Shaper(chat, body.model, params.logprobs is not None, f"exaflop-step{w.step}", include_usage,
                    tool_mode)
    choices = {s.index: Choice(s.index) for s in seqs}

    def finish(completion_tokens: int) -> None:
        handle.cancelled = True  # no-op for finished sequences; drops any still running
        served.engine.wake()
        server.limiter.charge(key, completion_tokens)

    if body.stream:
        stream = _stream(shaper, queue, choices, echo, prompt_tokens, finish, served.engine, n)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    done = 0
    watcher = asyncio.ensure_future(_signal_disconnect(request, queue))
    try:
        while done < len(choices):
            ev = await _next_event(queue, served.engine)
            if ev is None:  # the client left: stop generating now, not when the answer is complete
                return JSONResponse({}, status_code=499)  # nobody is listening (counted client_closed)
            if ev.error:
                raise APIError(500, f"generation failed: {ev.error}", type="server_error")
            choices[ev.index].add(ev)
            done += ev.finish_reason is not None
    finally:
        watcher.cancel()
        finish(sum(c.completion_tokens for c in choices.values()))
    return JSONResponse(shaper.response(list(choices.values()), prompt_tokens, echo, n))


async def _signal_disconnect(request: Request, queue: asyncio.Queue) -> None:
    """Put None on `queue` when the client disconnects (the body was read already, so the
    only message left to receive is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    queue.put_nowait(None)


async def _next_event(queue: asyncio.Queue, engine) -> Event | None:
    """The next event for this request; an error event if the engine thread has died.

    The engine fails a sequence with an event whatever goes wrong inside a step; this
    covers the one case it cannot: its own thread gone, when nothing would ever arrive.
    """
    if not queue.empty():  # the usual case under load: skip the timer
        return queue.get_nowait()
    while True:
        try:
            # A timer on this task, not wait_for's extra task per event (its ensure_future and
            # timer were ~10% of the HTTP thread's samples while streaming; 112 -> 107 us a token).
            async with asyncio.timeout(1.0):
                return await queue.get()
        except TimeoutError:
            if not engine.alive:
                return Event(-1, finish_reason="error", error="the model's engine has stopped")


async def _stream(shaper: Shaper, queue: asyncio.Queue, choices: dict[int, Choice], echo: dict[int, str],
                  prompt_tokens: int, finish, engine, n: int = 1) -> AsyncIterator[str]:
    done = 0
    try:
        for c in choices.values():
            if shaper.chat:
                yield shaper.chunk(c, "", [], None, role=True)
            elif c.index in echo:
                yield shaper.chunk(c, echo[c.index], [], None)
        while done < len(choices):
            ev: Event = await _next_event(queue, engine)
            if ev.error:
                yield sse({"error": {"message": f"generation failed: {ev.error}", "type": "server_error",
                                     "param": None, "code": None}})
                break
            c = choices[ev.index]
            c.completion_tokens = max(c.completion_tokens, ev.completion_tokens)
            c.cached_tokens = max(c.cached_tokens, ev.cached_tokens)
            done += ev.finish_reason is not None
            if ev.text or ev.logprobs or ev.finish_reason:
                yield shaper.chunk(c, ev.text, ev.logprobs, ev.finish_reason)
        if shaper.include_usage:
            yield shaper.usage_chunk(prompt_tokens, sum(c.completion_tokens for c in choices.values()),
                                     cached_of(choices.values(), n))
        yield sse("[DONE]")
    finally:  # also runs when the client disconnects and the response task is cancelled
        finish(sum(c.completion_tokens for c in choices.values()))
