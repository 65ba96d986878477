"""An engine failure reaches its client, fast, and only its client.

Failures are real exceptions raised inside the engine thread of a real `exaflop serve`
(the EXAFLOP_SERVE_FAULT drill hook, engine/faults.py): at a sequence's start, in a
batched prefill, in a batched decode after a few tokens, and in sampling. Every client
call has a timeout, so a regression that loses an error event fails instead of hanging.
"""

from __future__ import annotations

import threading
import time

import openai
import pytest
from conftest import MODEL

NO_SPECIALS = {str(i): -100 for i in range(6)}  # special tokens are ids 0-5: never end early
PROMPTS = ["def", "import json\n", "class Decoder(object):\n    "]
STAGES = ("start", "prefill", "decode", "sample")


@pytest.fixture(scope="module")
def faulty(run_dir, start_server):
    return start_server([run_dir], "--max-running", "8", env={"EXAFLOP_SERVE_FAULT": "start,prefill,decode@2,sample@1"})


def _client(server, timeout: float = 30) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=timeout)


def _complete(client: openai.OpenAI, prompt: str, user: str | None = None, n: int = 24) -> str:
    kw = {"user": user} if user else {}
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0,
                                     logit_bias=NO_SPECIALS, **kw).choices[0].text


@pytest.mark.parametrize("stage", STAGES)
def test_a_lone_failing_request_gets_a_500_at_once(faulty, stage):
    # Nothing else runs, so no other request's step would flush the error for it.
    client = _client(faulty, timeout=20)
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError) as e:
        _complete(client, "def", user=f"exaflop-fault:{stage}")
    assert time.monotonic() - t0 < 10
    assert e.value.status_code == 500 and f"injected {stage} fault" in e.value.message
    assert e.value.body["type"] == "server_error"  # the OpenAI error shape


def test_a_failing_stream_ends_with_an_error_event(faulty):
    client = _client(faulty, timeout=20)
    stream = client.completions.create(model=MODEL, prompt="def", max_tokens=24, temperature=0,
                                       logit_bias=NO_SPECIALS, stream=True, user="exaflop-fault:decode")
    got = []
    with pytest.raises(openai.APIError, match="injected decode fault"):
        for chunk in stream:
            got.append(chunk.choices[0].text)
    assert len(got) <= 2  # decode@2: the prefill token and one decoded token, at most, came first


def test_failures_end_only_their_own_requests(faulty):
    client = _client(faulty)
    alone = [_complete(client, p) for p in PROMPTS]
    before = faulty.metrics()
    results: dict[str, object] = {}

    def run(name: str, prompt: str, user: str | None) -> None:
        try:
            results[name] = _complete(client, prompt, user)
        except openai.APIError as e:
            results[name] = e

    # Ordinary requests and one failing request per stage, all at once: they share
    # prefill and decode batches, so each failure happens inside a batch with others in it.
    jobs = [(f"ok{i}", p, None) for i, p in enumerate(PROMPTS)] + \
           [(s, "x = ", f"exaflop-fault:{s}") for s in STAGES]
    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a request hung"
    for stage in STAGES:
        err = results[stage]
        assert isinstance(err, openai.InternalServerError) and f"injected {stage} fault" in err.message, err
    # The others finished exactly as they do alone (fp32: batch shape does not change the bits).
    assert [results[f"ok{i}"] for i in range(len(PROMPTS))] == alone
    after = faulty.metrics()
    key = 'exaflop_sequences_failed_total{model="m"}'
    assert after[key] - before.get(key, 0) == len(STAGES)
    assert after.get('exaflop_requests_running{model="m"}', 0) == 0  # every slot given back
    assert _complete(client, PROMPTS[0]) == alone[0]  # and the server goes on serving
