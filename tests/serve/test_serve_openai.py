"""The official `openai` client, unmodified, against a real server: sync, async, streaming."""

from __future__ import annotations

import asyncio

import openai
import pytest

MODEL = "m"  # the run name of the conftest model


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def aclient(server):
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models_lists_the_run_with_its_step(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].checkpoint_step == 5  # extension field, passed through by the client
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_sync(client):
    r = client.completions.create(model=MODEL, prompt="def load(", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_stream_with_usage_matches_non_stream(client):
    kw = dict(model=MODEL, prompt="import json\n", max_tokens=12, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")


def test_chat_sync_and_stream(client):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    text = r.choices[0].message.content
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=10,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_async_client_stream_and_not(aclient):
    async def go():
        r = await aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                  max_tokens=6, temperature=0)
        s = await aclient.completions.create(model=MODEL, prompt="class ", max_tokens=6, temperature=0,
                                             stream=True)
        parts = [c.choices[0].text async for c in s]
        return r, parts

    r, parts = asyncio.run(go())
    assert r.choices[0].finish_reason in ("stop", "length")
    assert parts


def test_seed_repeats_and_n_choices_differ(client):
    kw = dict(model=MODEL, prompt="def ", max_tokens=12, temperature=1.0, top_p=0.95, seed=7, n=3,
              extra_body={"top_k": 50})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert len({c.text for c in a.choices}) > 1  # seed+i per choice


def test_logprobs_bounded_and_shaped(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3,
                                       logit_bias={str(i): -100 for i in range(6)})
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob <= 0 and t.top_logprobs[0].logprob >= t.logprob for t in content)  # greedy = top-1
    c = openai.OpenAI(base_url=client.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], logprobs=True,
                                  top_logprobs=21)
    assert e.value.body["param"] == "top_logprobs"
    r = client.completions.create(model=MODEL, prompt="a", max_tokens=3, logprobs=2, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) <= 3


def test_penalties_change_greedy_output(client):
    kw = dict(model=MODEL, prompt="def f", max_tokens=24, temperature=0,
              logit_bias={str(i): -100 for i in range(6)})
    plain = client.completions.create(**kw).choices[0].text
    penalized = client.completions.create(**kw, frequency_penalty=2.0, presence_penalty=2.0).choices[0].text
    assert plain != penalized


def test_client_errors_are_openai_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=5000)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", extra_body={"max_token": 3})
    assert "max_token" in e.value.body["message"] and e.value.body["param"] == "max_token"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", stop=["a", "b", "c", "d", "e"])


@pytest.mark.parametrize("stream", [False, True])
def test_logit_bias_past_the_vocabulary_is_a_400(server, stream):
    # The vocabulary is 300: id 300 is one past it. Were the API to let it through, the
    # engine would fail the request (test_serve_faults covers that path); either way the
    # client must not wait: the timeout turns a hang into a failure.
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=20)
    for key in ("300", "99999"):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=MODEL, prompt="x", max_tokens=3, logit_bias={key: 5}, stream=stream)
        assert e.value.body["param"] == "logit_bias" and key in e.value.body["message"]
    ok = c.completions.create(model=MODEL, prompt="x", max_tokens=3, temperature=0, logit_bias={"299": 5})
    assert ok.choices[0].finish_reason in ("length", "stop")
