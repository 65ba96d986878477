"""/tokenize, /detokenize and /v1/embeddings: what app builders call beside generation.

Tokenization runs on the API's tokenizer thread (serve/api.py), embeddings one request at a
time in a short-lived thread of their own (serve/threads.py): a forward pass over a batch of
inputs must not stall the event loop, and no thread but the engine's may keep an OpenMP team. Embeddings are the served checkpoint's final
hidden states, normed and mean-pooled over each input's tokens (LM.embed): a decoder LM's
pooled states, documented as such (docs/serving.md), not a retrieval-trained embedder.
"""

from __future__ import annotations

import asyncio
import base64
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import torch

from exaflop.serve.api import _TOKENIZE, _check_ids, _encode, chat_prompt
from exaflop.serve.protocol import (
    APIError,
    ChatRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
from exaflop.serve.reload import ServedModel, Weights
from exaflop.serve.threads import in_fresh_thread

# One embedding request at a time; its forward runs in a thread that ends with it.
_EMBED = ThreadPoolExecutor(max_workers=1, thread_name_prefix="exaflop-embed")
EMBED_BATCH = 16  # inputs per forward pass


def _weights(served: ServedModel | None, model: str) -> Weights:
    if served is None:
        raise APIError(404, f"The model `{model}` does not exist", param="model", code="model_not_found")
    if served.weights is None:
        raise APIError(503, f"model `{model}` is still loading; retry shortly", type="server_error",
                       code="model_loading", retry_after=5)
    return served.weights


async def tokenize(served: ServedModel | None, body: TokenizeRequest) -> dict:
    w = _weights(served, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "tokenize: give exactly one of prompt or messages", param="prompt")
    limit = (w.ctx * 4) * w.max_token_chars  # bound the work before tokenizing (as generation does)
    size = len(body.prompt) if body.prompt is not None else sum(len(m.text()) for m in body.messages or [])
    if size > limit:
        raise APIError(400, f"tokenize: {size} characters is more than this endpoint tokenizes ({limit})",
                       param="prompt" if body.prompt is not None else "messages")

    def run() -> list[int]:
        if body.prompt is not None:
            return _encode(w.tok, body.prompt, "prompt")
        return chat_prompt(ChatRequest(model=body.model, messages=body.messages or [], tools=body.tools), w)

    ids = await asyncio.get_running_loop().run_in_executor(_TOKENIZE, run)
    return {"tokens": ids, "count": len(ids), "max_model_len": w.ctx}


async def detokenize(served: ServedModel | None, body: DetokenizeRequest) -> dict:
    w = _weights(served, body.model)
    ids = _check_ids(list(body.tokens), w) if body.tokens else []
    text = b"".join(w.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
    return {"prompt": text}


async def embeddings(served: ServedModel | None, body: EmbeddingRequest) -> dict:
    w = _weights(served, body.model)
    if body.dimensions is not None and body.dimensions != w.cfg.model.d_model:
        raise APIError(400, f"dimensions: this model's embeddings have {w.cfg.model.d_model} dimensions; "
                       "omit dimensions or set it to that", param="dimensions")
    inp = body.input
    if isinstance(inp, str):
        texts: list = [inp]
    elif all(isinstance(x, int) for x in inp):
        texts = [list(inp)]
    else:
        texts = list(inp)
    bound = w.ctx * w.max_token_chars
    for t in texts:
        if isinstance(t, str) and len(t) > bound:
            raise APIError(400, f"input: {len(t)} characters cannot fit this model's {w.ctx}-token context",
                           param="input", code="context_length_exceeded")

    def ids_of() -> list[list[int]]:
        out = []
        for t in texts:
            ids = _check_ids(list(t), w) if isinstance(t, list) else _encode(w.tok, t, "input")
            if len(ids) > w.ctx:
                raise APIError(400, f"input: {len(ids)} tokens, more than this model's context of {w.ctx}",
                               param="input", code="context_length_exceeded")
            out.append(ids or [w.eot_id])
        return out

    loop = asyncio.get_running_loop()
    ids = await loop.run_in_executor(_TOKENIZE, ids_of)
    job = partial(in_fresh_thread, _embed, w, ids, threads=served.engine.threads)
    vectors = await loop.run_in_executor(_EMBED, job)
    data = []
    for i, v in enumerate(vectors):
        emb = base64.b64encode(v.astype(np.float32).tobytes()).decode() if body.encoding_format == "base64" \
            else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    n = sum(len(x) for x in ids)
    return {"object": "list", "data": data, "model": body.model, "usage": {"prompt_tokens": n, "total_tokens": n}}


def _embed(w: Weights, ids: list[list[int]]) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    # Similar lengths together: less padding per forward; results go back in input order.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    got: dict[int, np.ndarray] = {}
    with torch.inference_mode():
        for k in range(0, len(order), EMBED_BATCH):
            rows = order[k:k + EMBED_BATCH]
            T = max(len(ids[i]) for i in rows)
            idx = torch.zeros(len(rows), T, dtype=torch.long, device=w.device)
            for r, i in enumerate(rows):
                idx[r, :len(ids[i])] = torch.tensor(ids[i])
            lengths = torch.tensor([len(ids[i]) for i in rows], device=w.device)
            vecs = w.model.embed(idx, lengths).cpu().numpy()
            for r, i in enumerate(rows):
                got[i] = vecs[r]
    out = [got[i] for i in range(len(ids))]
    return out
