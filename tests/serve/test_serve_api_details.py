"""API details a client relies on, each pinned to a value (found by mutation testing:
tools/mutation_sample.py on serve/api.py): defaults, roles, stop strings, logprobs,
usage in streams, and the exact shape of errors."""

from __future__ import annotations

import openai
import pytest

MODEL = "m"
NO_SPECIALS = {str(i): -100 for i in range(6)}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_completions_default_to_16_tokens(client):
    r = client.completions.create(model=MODEL, prompt="def ", temperature=0, logit_bias=NO_SPECIALS)
    assert r.usage.completion_tokens == 16  # OpenAI's default for /v1/completions


def test_a_developer_message_is_a_system_message(client):
    def say(role: str) -> list[float]:  # the first token's distribution tells the prompts apart
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": role, "content": "be brief"}, {"role": "user", "content": "hi"}],
            max_tokens=1, temperature=0, logprobs=True, top_logprobs=5)
        return [t.logprob for t in r.choices[0].logprobs.content[0].top_logprobs]
    assert say("developer") == say("system")
    assert say("developer") != say("user")  # the role reaches the prompt at all


def test_stop_as_a_string_is_one_stop(client):
    kw = dict(model=MODEL, prompt="import os\n", max_tokens=24, temperature=0, logit_bias=NO_SPECIALS)
    free = client.completions.create(**kw).choices[0].text
    word = free[3:5]
    assert word and word in free
    one, listed = (client.completions.create(**kw, stop=s).choices[0] for s in (word, [word]))
    assert one.text == listed.text == free[:free.index(word)] and one.finish_reason == "stop"


def test_logprobs_without_top_logprobs_have_no_alternatives(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                       temperature=0, logprobs=True, logit_bias=NO_SPECIALS)
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(t.top_logprobs == [] and t.logprob <= 0 for t in content)


def test_streamed_usage_counts_every_token(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=7, temperature=0, n=2,
        logit_bias=NO_SPECIALS, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 14  # 2 choices x 7
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 14


def test_errors_name_their_parameter_and_say_what_to_do(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x")
    assert e.value.body == {"message": "The model `nope` does not exist", "type": "invalid_request_error",
                            "param": "model", "code": "model_not_found"}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", stream_options={"include_usage": True})
    assert e.value.body["message"] == "stream_options: only allowed when stream is true"
    assert e.value.body["param"] == "stream_options"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", n=1, extra_body={"best_of": 2})
    assert e.value.status_code == 400 and e.value.body["param"] == "best_of"
