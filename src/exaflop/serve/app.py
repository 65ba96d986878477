"""The FastAPI application: routes, the guard middleware, errors in the OpenAI shape.

The guard is plain ASGI in front of everything (including 404s and /openapi.json):
it counts requests by status for /metrics, enforces the API key everywhere but
/health, and reads the body up to the size limit before the app sees it, so an
oversized upload is a 413 however it is sent (Content-Length or chunked).
"""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from exaflop.serve import api
from exaflop.serve.auth import KeyChecker, RateLimiter
from exaflop.serve.metrics import Metrics
from exaflop.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    error_body,
    validation_message,
)
from exaflop.serve.reload import Reloader, ServedModel

log = logging.getLogger("exaflop.serve")

OPEN_PATHS = {"/health"}
ROUTES = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/drive/predict",
          "/openapi.json", "/docs"}


@dataclass
class Server:
    models: dict[str, ServedModel]
    metrics: Metrics
    keys: KeyChecker
    limiter: RateLimiter
    reloader: Reloader | None = None
    max_body_bytes: int = 8 << 20
    drive: dict = field(default_factory=dict)  # model id -> drive predictor (see serve.drive)

    @property
    def loaded(self) -> bool:
        return all(m.weights is not None for m in self.models.values()) and \
            all(d.loaded for d in self.drive.values())


class AsciiJSON(JSONResponse):
    """Errors may quote client text; ASCII escapes keep even a lone surrogate encodable."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def _json_error(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return AsciiJSON(error_body(message, type, param, code), status_code=status, headers=headers)


class Guard:
    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        status = [0]

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, counted_send, path)
        finally:
            self.server.metrics.requests.inc(route=route, status=str(status[0] or 500))

    async def _guarded(self, scope, receive, send, path: str) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key_id = "anonymous"
        if path not in OPEN_PATHS and self.server.keys.enabled:
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
            key_id = self.server.keys.check(token)
            if key_id is None:
                msg = ("You didn't provide an API key. Send it as 'Authorization: Bearer KEY'." if token is None
                       else "Incorrect API key provided.")
                return await _json_error(401, msg, code="invalid_api_key",
                                         headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        scope.setdefault("state", {})["key_id"] = key_id
        limit = self.server.max_body_bytes
        too_big = _json_error(413, f"request body is larger than the limit of {limit} bytes",
                              code="request_too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return await too_big(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await too_big(scope, receive, send)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), [False]

        async def replay() -> dict:
            if not replayed[0]:
                replayed[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later reads wait for the disconnect, as the app expects

        await self.app(scope, replay, send)


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for m in server.models.values():
            m.engine.start()
        if server.reloader is not None:
            server.reloader.start()
        yield
        if server.reloader is not None:
            server.reloader.stop()
        for m in server.models.values():
            m.engine.stop()

    app = FastAPI(title="exaflop", description="OpenAI-compatible API for exaflop models", version="1",
                  lifespan=lifespan, redoc_url=None)
    app.state.server = server
    app.add_middleware(Guard, server=server)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return AsciiJSON(e.body(), status_code=e.status, headers=e.headers())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(e.errors()))
        return _json_error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}."
        elif e.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
        else:
            message = str(e.detail)
        code = "not_found" if e.status_code == 404 else None
        return _json_error(e.status_code, message, code=code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _json_error(500, "internal server error; the server keeps running", type="server_error")

    @app.get("/health")
    async def health():
        steps = {name: (m.weights.step if m.weights else None) for name, m in server.models.items()}
        steps.update({name: (d.step if d.loaded else None) for name, d in server.drive.items()})
        status = 200 if server.loaded else 503
        return JSONResponse({"status": "ok" if status == 200 else "loading", "models": steps},
                            status_code=status, headers=None if status == 200 else {"Retry-After": "5"})

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    def model_card(name: str) -> dict:
        m = server.models.get(name)
        w = m.weights if m else None
        created = int(w.ckpt.stat().st_mtime) if w is not None and w.ckpt.exists() else 0
        return {"id": name, "object": "model", "created": created, "owned_by": "exaflop",
                "checkpoint_step": w.step if w else None, "context_length": w.ctx if w else None}

    @app.get("/v1/models")
    async def list_models():
        cards = [model_card(name) for name in server.models]
        cards += [d.card() for d in server.drive.values()]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id in server.models:
            return model_card(model_id)
        if model_id in server.drive:
            return server.drive[model_id].card()
        raise APIError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await api.generate(server.models.get(body.model), body, request, server)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await api.generate(server.models.get(body.model), body, request, server)

    @app.post("/v1/drive/predict")
    async def drive_predict(request: Request):
        from exaflop.serve.drive import predict

        return await predict(server, request)

    return app
