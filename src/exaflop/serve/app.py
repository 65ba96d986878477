"""The FastAPI application: routes and errors in the OpenAI shape.

In front of it: the guard (serve/guard.py: accounting, keys, body limits) and, one layer
down, the HTTP protocol's header limits and deadlines (serve/http.py).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from exaflop.serve import api
from exaflop.serve.auth import FailedAuthLimiter, KeyChecker, RateLimiter
from exaflop.serve.guard import AsciiJSON, Guard, json_error
from exaflop.serve.http import HTTPLimits
from exaflop.serve.metrics import Metrics
from exaflop.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ResponsesRequest,
    TokenizeRequest,
    validation_message,
)
from exaflop.serve.reload import Reloader, ServedModel

log = logging.getLogger("exaflop.serve")
CHAT_PAGE = Path(__file__).with_name("static") / "chat.html"

@dataclass
class Server:
    models: dict[str, ServedModel]
    metrics: Metrics
    keys: KeyChecker
    limiter: RateLimiter
    reloader: Reloader | None = None
    max_body_bytes: int = 8 << 20
    drive: dict = field(default_factory=dict)  # model id -> drive predictor (see serve.drive)
    limits: HTTPLimits = field(default_factory=HTTPLimits)
    auth_failures: FailedAuthLimiter = field(default_factory=FailedAuthLimiter)

    @property
    def loaded(self) -> bool:
        return all(m.weights is not None for m in self.models.values()) and \
            all(d.loaded for d in self.drive.values())


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
        for d in {id(d.recorder): d.recorder for d in server.drive.values() if d.recorder is not None}.values():
            d.close()  # the open record file becomes a closed .jsonl

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
        return json_error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}."
        elif e.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
        else:
            message = str(e.detail)
        code = "not_found" if e.status_code == 404 else None
        return json_error(e.status_code, message, code=code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return json_error(500, "internal server error; the server keeps running", type="server_error")

    @app.get("/", include_in_schema=False)
    async def chat_page():
        # A static page shipped in the package (no build step): it calls this server's API.
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

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
                "checkpoint_step": w.step if w else None, "context_length": w.ctx if w else None,
                # What serves it: the weights' dtype and whether matrices are int8 (--quantize).
                "dtype": str(next(w.model.parameters()).dtype).removeprefix("torch.") if w else None,
                "quantization": getattr(w.model, "quantized", "none") if w else None,
                "kv_cache_dtype": str(w.cache_dtype).removeprefix("torch.") if w else None,
                # "compiled", "compiling" (decoding eagerly until the compile is done) or "eager".
                "decode": m.engine.runner.decode_mode if m else None}

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

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request):
        from exaflop.serve.responses import create

        return await create(server.models.get(body.model), body, request, server)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        from exaflop.serve.utility import embeddings

        return await embeddings(server.models.get(body.model), body)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        from exaflop.serve.utility import tokenize

        return await tokenize(server.models.get(body.model), body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        from exaflop.serve.utility import detokenize

        return await detokenize(server.models.get(body.model), body)

    @app.post("/v1/drive/predict")
    async def drive_predict(request: Request):
        from exaflop.serve.drive import predict

        return await predict(server, request)

    return app
