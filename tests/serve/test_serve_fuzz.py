"""Fuzz every operation of the server's own OpenAPI schema: no 5xx, no 422, errors in OpenAI shape.

Cases come from schemathesis (valid and invalid bodies, query and path values);
half of them are pointed at the real model so validation past the model lookup is
exercised too. Generation lengths are clamped so the run stays short.
"""

from __future__ import annotations

import httpx
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

http = httpx.Client(timeout=120)  # generous: CI machines can be busy

MODEL = "m"
EXAMPLES = 300


def _operations(spec: dict):
    schema = schemathesis.openapi.from_dict(spec)
    ops = [r.ok() for r in schema.get_all_operations()]
    return [op.as_strategy(generation_mode=mode) for op in ops
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]


def _short(body):
    """Point at the real model (when asked) and cap generation, leaving invalid values alone."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    for field in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(field), int) and not isinstance(body[field], bool) and body[field] > 4:
            body[field] = 4
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 4
    return body


def test_fuzz_openapi_no_5xx_and_openai_errors(server):
    spec = http.get(server.url + "/openapi.json").json()
    client = httpx.Client(base_url=server.url, timeout=60)
    seen: dict[int, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(_operations(spec)), real_model=st.booleans())
    def check(case, real_model):
        kwargs: dict = {"params": case.query or None,
                        "headers": {k: str(v) for k, v in (case.headers or {}).items()} or None}
        body = case.body
        if isinstance(body, dict) and real_model:
            body = {**body, "model": MODEL}
        if isinstance(body, bytes):  # a raw (often not-JSON) payload from negative generation
            kwargs["content"] = body
            kwargs["headers"] = {**(kwargs["headers"] or {}), "content-type": case.media_type or "application/json"}
        elif case.method.upper() == "POST" and type(body).__name__ != "NotSet":
            kwargs["json"] = _short(body)
        try:
            r = client.request(case.method, case.formatted_path, **kwargs)
        except (httpx.LocalProtocolError, UnicodeEncodeError):
            assume(False)  # the client cannot even send it (e.g. a header with a newline)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (case.method, case.formatted_path, kwargs, r.text)
        assert r.status_code != 422, r.text
        if r.status_code >= 400:
            err = r.json()["error"]
            assert {"message", "type", "param", "code"} <= set(err) and err["message"], r.text

    check()
    assert any(code == 200 for code in seen) and any(400 <= code < 500 for code in seen), seen
    assert http.get(server.url + "/health").status_code == 200  # still alive


NASTY = [
    b"", b"[]", b"null", b"not json", b'{"model": "m"}', b'{"model": "m", "prompt": []}',
    b'{"model": "m", "prompt": [[1, 2], []]}', b'{"model": "m", "prompt": "\\ud800"}',
    b'{"model": "\\ud800", "prompt": "x"}', b'{"model": "m", "prompt": "x", "\\ud800": 1}',
    b'{"model": "m", "prompt": [999999]}', b'{"model": "m", "prompt": "x", "logit_bias": {"-1": 5}}',
    b'{"model": "m", "prompt": "x", "seed": 18446744073709551616}', b'{"model": "m", "prompt": "x", "n": 0}',
    b'{"model": "m", "prompt": "x", "best_of": 3}', b'{"model": "m", "prompt": "x", "suffix": "y"}',
    b'{"model": "m", "prompt": "x", "echo": true, "logprobs": 1}', b'{"model": "m", "prompt": "x", "top_p": 1.5}',
    b'{"model": "m", "messages": []}', b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"model": "m", "messages": [{"role": "tool", "content": "x"}]}',
    b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
    b'{"model": "m", "messages": [{"role": "user"}], "top_logprobs": 2}',
]


def test_nasty_bodies_are_4xx_in_openai_shape(server):
    for path in ("/v1/completions", "/v1/chat/completions"):
        for raw in NASTY:
            r = http.post(server.url + path, content=raw, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500 and r.status_code != 422, (path, raw, r.text)
            assert r.json()["error"]["message"], (path, raw)
