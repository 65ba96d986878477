"""API keys, rate limits, caps and body limits, on a server started with all of them."""

from __future__ import annotations

import argparse
import threading

import httpx
import pytest

from exaflop.errors import UserError

http = httpx.Client(timeout=120)  # generous: CI machines can be busy

MODEL = "m"


def _is_openai_error(r: httpx.Response) -> bool:
    body = r.json()
    return set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_missing_and_wrong_key_401_health_open(guarded_server):
    url = guarded_server.url
    for headers in ({}, _auth("key-wrong"), {"Authorization": "key-alpha"}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/metrics"),
                             ("GET", "/openapi.json"), ("GET", "/v1/nowhere")):
            r = http.request(method, url + path, headers=headers, json={"model": MODEL, "prompt": "x"})
            assert r.status_code == 401 and _is_openai_error(r), (path, headers)
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert http.get(url + "/health").status_code == 200
    # Keys from the file and from EXAFLOP_API_KEYS both work.
    for key in ("key-alpha", "key-charlie"):
        assert http.get(url + "/v1/models", headers=_auth(key)).status_code == 200


def test_rate_limit_429_per_key(guarded_server):
    url, body = guarded_server.url + "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1}
    codes = [http.post(url, json=body, headers=_auth("key-alpha")).status_code for _ in range(5)]
    assert codes[:4] == [200] * 4
    r = http.post(url, json=body, headers=_auth("key-alpha"))
    assert r.status_code == 429 and _is_openai_error(r)
    assert r.json()["error"]["code"] == "rate_limit_exceeded" and int(r.headers["retry-after"]) >= 1
    # Another key has its own budget.
    assert http.post(url, json=body, headers=_auth("key-charlie")).status_code == 200


def test_queue_full_503_with_retry_after(guarded_server):
    """--max-running 1 --max-queue 1: a third concurrent request is turned away."""
    url = guarded_server.url + "/v1/completions"
    long = {"model": MODEL, "prompt": "x", "max_tokens": 900, "temperature": 0,
            "logit_bias": {str(i): -100 for i in range(6)}}
    results: list[int] = []

    def call():
        results.append(httpx.post(url, json=long, headers=_auth("key-bravo"), timeout=60).status_code)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in range(100):  # until both are admitted (one running, one waiting)
        m = guarded_server.metrics(_auth("key-bravo"))
        if m.get('exaflop_requests_running{model="m"}') == 1 and m.get('exaflop_requests_waiting{model="m"}') == 1:
            break
        threading.Event().wait(0.02)
    r = http.post(url, json=long, headers=_auth("key-bravo"))
    for t in threads:
        t.join()
    assert r.status_code == 503 and _is_openai_error(r) and "retry-after" in r.headers
    assert results == [200, 200]


def test_body_limit_413(guarded_server):
    r = http.post(guarded_server.url + "/v1/completions", headers=_auth("key-charlie"),
                   json={"model": MODEL, "prompt": "x" * 20_000})
    assert r.status_code == 413 and _is_openai_error(r)

    def chunks():  # no Content-Length: the limit must hold for chunked uploads too
        yield b'{"model": "m", "prompt": "'
        for _ in range(40):
            yield b"y" * 1000
        yield b'"}'

    r = http.post(guarded_server.url + "/v1/completions", headers=_auth("key-charlie"), content=chunks())
    assert r.status_code == 413


def test_no_keys_refuses_public_bind(run_dir, monkeypatch):
    from exaflop.serve.cli import add_parser

    monkeypatch.delenv("EXAFLOP_API_KEYS", raising=False)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", str(run_dir), "--host", "0.0.0.0"])
    with pytest.raises(UserError, match="API keys"):
        args.func(args)


def test_rate_limiter_tokens_per_minute():
    from exaflop.serve.auth import RateLimited, RateLimiter

    lim = RateLimiter(tokens_per_min=100)
    lim.admit("k", 60)
    lim.charge("k", 30)
    with pytest.raises(RateLimited):
        lim.admit("k", 20)
    lim.admit("other", 90)
