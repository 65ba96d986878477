"""One client cannot freeze the server: huge prompts, huge or slow headers, stalled bodies,
abandoned requests and key guessing, each against a real `exaflop serve` on 127.0.0.1.

Every loop here is bounded by a deadline, so a regression fails instead of hanging.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import MODEL

KEY = "key-hardening-0123456789abcdef"
HEADER_TIMEOUT, BODY_TIMEOUT, AUTH_FAIL_LIMIT = 1.0, 1.0, 20


@pytest.fixture(scope="module")
def hardened(run_dir, start_server):
    """Defaults except short read deadlines (so the tests are quick) and an API key."""
    return start_server([run_dir], "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT),
                        "--auth-fail-limit", str(AUTH_FAIL_LIMIT), env={"EXAFLOP_API_KEYS": KEY})


def _auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _server_5xx(server) -> float:
    return sum(v for k, v in server.metrics(_auth()).items()
               if k.startswith("exaflop_requests_total") and 'status="5' in k)


def _recv_all(sock: socket.socket, deadline: float) -> bytes:
    """Read until the server closes the connection (or the deadline passes)."""
    out = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return out


def _chat(client: openai.OpenAI, content: str, max_tokens: int = 1):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          max_tokens=max_tokens, temperature=0)


def test_huge_prompt_is_refused_without_stalling_anyone(hardened):
    client = openai.OpenAI(base_url=hardened.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    for _ in range(3):  # warm: first requests allocate caches that stay
        _chat(client, "hello")
    big = "hello world " * 699_000  # just under the 8 MiB body limit
    rss_before = _rss_mib(hardened.proc.pid)

    def attempt() -> tuple[list[float], list[float]]:
        result: dict = {}

        def send_big():
            try:
                _chat(client, big)
            except openai.BadRequestError as e:
                result["error"] = e
            result["done"] = time.monotonic()

        health, small = [], []
        t = threading.Thread(target=send_big)
        start = time.monotonic()
        t.start()
        with httpx.Client(timeout=10) as http:
            # Probe for as long as the big request is in flight (at least 1 s), a bounded number of times.
            for _ in range(200):
                t0 = time.monotonic()
                assert http.get(hardened.url + "/health").status_code == 200
                health.append(time.monotonic() - t0)
                t0 = time.monotonic()
                assert _chat(client, "hi").choices[0].message.content is not None
                small.append(time.monotonic() - t0)
                if "done" in result and time.monotonic() - start > 1.0:
                    break
        t.join(30)
        err = result.get("error")
        assert err is not None and err.status_code == 400, result
        assert err.code == "context_length_exceeded" and err.param == "messages"
        return health, small

    # A server that handles the big body on its event loop stalls the probes every time; one probe
    # over the bound once (another test's process taking the CPU: 0.208 s seen in CI) is tried again.
    health, small = attempt()
    if max(health) >= 0.2 or max(small) >= 0.2:
        health, small = attempt()
    assert max(health) < 0.2, f"/health took {max(health):.3f} s during the 8 MiB prompt"
    assert max(small) < 0.2, f"a small chat took {max(small):.3f} s during the 8 MiB prompt"
    # The refused prompt's memory is given back (allocator arenas settle within a moment).
    for _ in range(50):
        rss_after = _rss_mib(hardened.proc.pid)
        if rss_after <= rss_before * 1.10:
            break
        time.sleep(0.1)
    assert rss_after <= rss_before * 1.10, f"RSS {rss_before:.0f} -> {rss_after:.0f} MiB"


def test_repeated_huge_prompts_do_not_grow_memory(hardened):
    client = openai.OpenAI(base_url=hardened.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    big = "x" * ((8 << 20) - 200)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=big, max_tokens=1)
    rss_before = _rss_mib(hardened.proc.pid)
    for _ in range(4):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=big, max_tokens=1)
        assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"
    assert _rss_mib(hardened.proc.pid) <= rss_before * 1.10


def test_one_mib_header_is_431_before_auth_quickly(hardened):
    before = hardened.metrics(_auth()).get('exaflop_http_refused_total{reason="request_header_fields_too_large"}', 0)
    head = (b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer wrong\r\n"
            b"X-Filler: " + b"a" * (1 << 20) + b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", hardened.port)) as s:
        t0 = time.monotonic()
        try:
            s.sendall(head)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may refuse (and close) before it has read everything
        reply = _recv_all(s, t0 + 5)
        elapsed = time.monotonic() - t0
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
    assert b'"code":"request_header_fields_too_large"' in reply.replace(b" ", b"")
    assert elapsed < 0.1, f"431 took {elapsed * 1000:.0f} ms"
    after = hardened.metrics(_auth())['exaflop_http_refused_total{reason="request_header_fields_too_large"}']
    assert after == before + 1
    # Too many small headers is the same refusal.
    many = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n"
    with socket.create_connection(("127.0.0.1", hardened.port)) as s:
        s.sendall(many)
        assert _recv_all(s, time.monotonic() + 5).startswith(b"HTTP/1.1 431")
    assert httpx.get(hardened.url + "/health").status_code == 200  # and nothing else is affected


def test_trickled_header_block_is_closed_with_408(hardened):
    with socket.create_connection(("127.0.0.1", hardened.port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        t0, reply = time.monotonic(), b""
        s.settimeout(0.2)
        # One header byte every 0.2 s, never finishing the head; bounded at 3x the timeout.
        while time.monotonic() - t0 < HEADER_TIMEOUT * 3:
            try:
                s.send(b"X")
                reply += s.recv(4096)
                break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        elapsed = time.monotonic() - t0
        reply += _recv_all(s, time.monotonic() + 1)
    assert elapsed < HEADER_TIMEOUT + 1.0, f"connection still open after {elapsed:.1f} s"
    assert reply == b"" or reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"request_timeout" in reply or reply == b""


def test_many_idle_connections_are_all_released(hardened):
    socks = [socket.create_connection(("127.0.0.1", hardened.port)) for _ in range(100)]
    try:
        for s in socks:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # never finished
        deadline = time.monotonic() + HEADER_TIMEOUT + 3
        closed = sum(1 for s in socks if _recv_all(s, deadline).startswith(b"HTTP/1.1 408"))
    finally:
        for s in socks:
            s.close()
    assert closed == 100
    assert httpx.get(hardened.url + "/health").status_code == 200


def test_stalled_body_is_408(hardened):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", hardened.port)) as s:
        s.sendall(head + b'{"model": "m", ')  # then nothing more
        t0 = time.monotonic()
        reply = _recv_all(s, t0 + BODY_TIMEOUT * 4)
        elapsed = time.monotonic() - t0
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"request_timeout" in reply
    assert elapsed < BODY_TIMEOUT + 1.0


def test_abandoned_requests_are_client_closed_not_5xx(hardened):
    def closed_count() -> float:
        return sum(v for k, v in hardened.metrics(_auth()).items()
                   if k.startswith("exaflop_requests_total") and 'status="client_closed"' in k)

    five_before, closed_before = _server_5xx(hardened), closed_count()
    # 1: gone halfway through its body.
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 500\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", hardened.port)) as s:
        s.sendall(head + b'{"model": "m", "prompt": "de')
        time.sleep(0.2)
    # 2: gone while a non-streaming answer is being generated (no response started yet).
    with pytest.raises(httpx.TimeoutException):
        httpx.post(hardened.url + "/v1/completions", headers=_auth(), timeout=0.3,
                   json={"model": MODEL, "prompt": "def", "max_tokens": 900, "logit_bias": {str(i): -100 for i in range(6)}})
    deadline = time.monotonic() + 20
    while closed_count() < closed_before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert closed_count() == closed_before + 2
    assert _server_5xx(hardened) == five_before
    assert hardened.metrics(_auth())[f'exaflop_requests_running{{model="{MODEL}"}}'] == 0


def test_key_guessing_is_429_while_a_valid_key_passes(hardened):
    codes, valid, retry_after = [], [], None
    with httpx.Client(base_url=hardened.url, timeout=10) as http:
        t0 = time.monotonic()
        for i in range(50):
            r = http.get("/v1/models", headers=_auth(f"guess-{i}"))
            codes.append(r.status_code)
            if r.status_code == 429:
                retry_after = r.headers.get("retry-after")
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
            if i % 5 == 0:
                valid.append(http.get("/v1/models", headers=_auth()).status_code)
        elapsed = time.monotonic() - t0
    assert elapsed < 5
    assert codes[:AUTH_FAIL_LIMIT] == [401] * AUTH_FAIL_LIMIT
    assert codes[AUTH_FAIL_LIMIT:] == [429] * (50 - AUTH_FAIL_LIMIT)
    assert retry_after is not None and int(retry_after) >= 1
    assert valid == [200] * 10
    m = hardened.metrics(_auth())
    assert m["exaflop_auth_rate_limited_total"] >= 50 - AUTH_FAIL_LIMIT
