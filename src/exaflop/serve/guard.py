"""The guard: plain ASGI in front of every route (404s and /openapi.json included).

In order, for each request:
1. counts it by route and status for /metrics; a client that left before any response
   is `status="client_closed"`, never a 5xx (it would page an operator for nothing);
2. enforces the API key everywhere but /health and the chat page (/), and rate-limits failed authentication
   per client address (429 with Retry-After once over the limit; a valid key always passes);
3. reads the body before the app sees it: larger than the limit is a 413 however it is
   sent (Content-Length or chunked), slower than the body deadline is a 408.
Header size, header count and the head's deadline are enforced one layer down, in the
HTTP protocol (serve/http.py), before any of this runs.
"""

from __future__ import annotations

import asyncio
import json
import logging

from fastapi.responses import JSONResponse

from exaflop.serve.protocol import error_body

log = logging.getLogger("exaflop.serve")

# The chat page is static (no data of the server's in it); its API calls carry the key.
OPEN_PATHS = {"/health", "/"}
ROUTES = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/drive/predict",
          "/v1/responses", "/v1/embeddings", "/tokenize", "/detokenize", "/", "/openapi.json", "/docs"}


class AsciiJSON(JSONResponse):
    """Errors may quote client text; ASCII escapes keep even a lone surrogate encodable."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def json_error(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return AsciiJSON(error_body(message, type, param, code), status_code=status, headers=headers)


class Guard:
    def __init__(self, app, server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        status, gone = [0], [False]

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        async def watched_receive() -> dict:
            message = await receive()
            if message["type"] == "http.disconnect":
                gone[0] = True
            return message

        try:
            await self._guarded(scope, watched_receive, counted_send, path)
        finally:
            # 499 is the app's own "nobody is listening" answer (nginx's code): the client left.
            if status[0] == 499 or (not status[0] and gone[0]):
                label = "client_closed"
            else:
                label = str(status[0]) if status[0] else "500"
            self.server.metrics.requests.inc(route=route, status=label)

    async def _guarded(self, scope, receive, send, path: str) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key_id = "anonymous"
        if path not in OPEN_PATHS and self.server.keys.enabled:
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
            key_id = self.server.keys.check(token)
            if key_id is None:
                address = (scope.get("client") or ("unknown", 0))[0]
                wait = self.server.auth_failures.failed(address)
                if wait is not None:
                    self.server.metrics.auth_limited.inc()
                    return await json_error(429, "Too many failed authentication attempts from this address; "
                                            "retry later with a valid API key", type="requests",
                                            code="rate_limit_exceeded",
                                            headers={"Retry-After": str(max(1, round(wait)))})(scope, receive, send)
                msg = ("You didn't provide an API key. Send it as 'Authorization: Bearer KEY'." if token is None
                       else "Incorrect API key provided.")
                return await json_error(401, msg, code="invalid_api_key",
                                        headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        scope.setdefault("state", {})["key_id"] = key_id
        limit = self.server.max_body_bytes
        too_big = json_error(413, f"request body is larger than the limit of {limit} bytes",
                             code="request_too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return await too_big(scope, receive, send)
        body_timeout = self.server.limits.body_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + body_timeout
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                return await json_error(408, f"the request body took longer than {body_timeout:g} s to arrive",
                                        code="request_timeout",
                                        headers={"Connection": "close"})(scope, receive, send)
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await too_big(scope, receive, send)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), [False]
        del chunks

        async def replay() -> dict:
            if not replayed[0]:
                replayed[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later reads wait for the disconnect, as the app expects

        await self.app(scope, replay, send)
