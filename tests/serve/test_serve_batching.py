"""Continuous batching: concurrency gives the same greedy text, disconnects free slots, stops hold."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai

http = httpx.Client(timeout=120)  # generous: CI machines can be busy

MODEL = "m"
NO_SPECIALS = {str(i): -100 for i in range(6)}  # special tokens are ids 0-5: never end early


def _prompts(k: int) -> list[str]:
    # Different lengths on purpose: batched prefill pads them to a common length.
    words = ["def", "import json", "class Decoder(object):\n    ", "x = ", "return self.", "# ", "if not "]
    return [words[i % len(words)] * (1 + i % 3) + str(i) for i in range(k)]


def test_32_concurrent_streams_equal_one_at_a_time(server):
    prompts = _prompts(32)
    # Different lengths too: sequences finish at different steps, so slots are freed and
    # the survivors' caches compacted while others keep decoding.
    lengths = [12 + (i * 7) % 17 for i in range(32)]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0,
                                       logit_bias=NO_SPECIALS).choices[0].text for p, n in zip(prompts, lengths, strict=True)]
    before = server.metrics()
    steps_before = before.get('exaflop_generation_tokens_total{model="m"}', 0)
    small_before = before.get('exaflop_decode_batch_size_bucket{model="m",le="8"}', 0)
    all_before = before.get('exaflop_decode_batch_size_count{model="m"}', 0)

    async def one(ac: openai.AsyncOpenAI, p: str, n: int) -> str:
        stream = await ac.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0,
                                             logit_bias=NO_SPECIALS, stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def all_at_once() -> list[str]:
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                                http_client=openai.DefaultAsyncHttpxClient(
                                    limits=httpx.Limits(max_connections=64)))
        return await asyncio.gather(*(one(ac, p, n) for p, n in zip(prompts, lengths, strict=True)))

    together = asyncio.run(all_at_once())
    assert together == alone
    m = server.metrics()
    assert m['exaflop_generation_tokens_total{model="m"}'] - steps_before == sum(lengths)
    assert m['exaflop_requests_running{model="m"}'] == 0
    # They really ran together: some decode steps carried more than 8 sequences.
    assert m['exaflop_decode_batch_size_count{model="m"}'] - all_before > \
        m['exaflop_decode_batch_size_bucket{model="m",le="8"}'] - small_before


def test_disconnect_mid_stream_frees_the_slot(server):
    before = server.metrics().get('exaflop_requests_aborted_total{model="m"}', 0)
    body = {"model": MODEL, "prompt": "def", "max_tokens": 1000, "temperature": 0, "stream": True,
            "logit_bias": NO_SPECIALS}
    with httpx.Client(timeout=30) as c, c.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
    # The engine notices within a decode step; allow generous time on a loaded CI machine.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = server.metrics()
        if m.get('exaflop_requests_aborted_total{model="m"}', 0) > before and \
                m['exaflop_requests_running{model="m"}'] == 0:
            break
        time.sleep(0.05)
    assert m['exaflop_requests_aborted_total{model="m"}'] == before + 1
    assert m['exaflop_requests_running{model="m"}'] == 0
    # The slot is really free: a fresh request is served at once.
    r = http.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2})
    assert r.status_code == 200


def _stream_text(server, body: dict) -> tuple[list[str], str | None]:
    pieces, finish = [], None
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                pieces.append(choice["text"])
                finish = choice["finish_reason"] or finish
    return pieces, finish


def test_stop_strings_split_across_tokens_never_stream(server, tokenizer):
    base = {"model": MODEL, "max_tokens": 40, "temperature": 0, "logit_bias": NO_SPECIALS}
    checked = 0
    for prompt in ["def ", "import ", "class ", "    return "]:
        full = http.post(server.url + "/v1/completions", json={**base, "prompt": prompt}).json()
        text = full["choices"][0]["text"]
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        pieces = [tokenizer.decode([i]) for i in ids]
        # Stop strings that straddle a token boundary: the tail of token k + the head of token k+1.
        for k in range(2, len(pieces) - 1):
            if len(pieces[k]) < 2 or len(pieces[k + 1]) < 1:
                continue
            stop = pieces[k][-2:] + pieces[k + 1][:2]
            if stop not in text:
                continue
            streamed, finish = _stream_text(server, {**base, "prompt": prompt, "stop": [stop, "\x00never"]})
            joined = "".join(streamed)
            assert stop not in joined and finish == "stop"
            assert joined == text[:text.index(stop)]
            assert all(stop not in p for p in streamed)
            checked += 1
            break
    assert checked >= 2
