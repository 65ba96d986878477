"""/tokenize, /detokenize and /v1/embeddings on a real server (embeddings via the openai client)."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from tests.serve.conftest import MODEL


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_tokenize_matches_the_tokenizer_and_detokenize_inverts_it(server, tokenizer):
    text = "def parse(s):\n    return json.loads(s)  # é ✓"
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": text}).json()
    assert r["tokens"] == tokenizer.encode(text, add_special_tokens=False).ids
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 1024
    back = httpx.post(server.url + "/detokenize", json={"model": MODEL, "tokens": r["tokens"]}).json()
    assert back == {"prompt": text}


def test_tokenize_messages_counts_what_a_chat_request_is_charged(server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is json?"}]
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL, "messages": messages}).json()
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert r["count"] == chat.usage.prompt_tokens


def test_tokenize_mistakes_are_400s(server):
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(server.url + "/detokenize", json={"model": MODEL, "tokens": [10**6]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(server.url + "/tokenize", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_embeddings_are_pooled_states_independent_of_batching(client):
    texts = ["import json", "def f(x):\n    return x * 2\n", "import json"]
    many = client.embeddings.create(model=MODEL, input=texts)
    assert [d.index for d in many.data] == [0, 1, 2] and many.usage.prompt_tokens > 0
    vecs = np.array([d.embedding for d in many.data])
    assert vecs.shape == (3, 64) and np.isfinite(vecs).all()
    alone = np.array(client.embeddings.create(model=MODEL, input=texts[1]).data[0].embedding)
    # The same text alone or in a padded batch, or twice: the same vector (fp32 rounding only).
    assert np.abs(alone - vecs[1]).max() < 1e-5 and np.abs(vecs[0] - vecs[2]).max() < 1e-6
    assert np.abs(vecs[0] - vecs[1]).max() > 1e-3
    b64 = client.embeddings.create(model=MODEL, input=texts[1], encoding_format="base64")
    raw = b64.data[0].embedding
    decoded = np.frombuffer(base64.b64decode(raw), dtype=np.float32) if isinstance(raw, str) else np.array(raw)
    assert np.abs(decoded - alone).max() < 1e-6


def test_embeddings_of_token_ids_equal_those_of_the_text(client, tokenizer):
    text = "return json.dumps(obj)"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    a = client.embeddings.create(model=MODEL, input=text).data[0].embedding
    b = client.embeddings.create(model=MODEL, input=ids).data[0].embedding
    assert np.abs(np.array(a) - np.array(b)).max() < 1e-6


def test_embedding_mistakes_are_400s(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MODEL, input="x", dimensions=3)
    assert e.value.body["param"] == "dimensions"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MODEL, input="x" * 10**6)
    assert e.value.body["param"] == "input"


def test_embeddings_leave_no_openmp_team_behind(start_server, run_dir):
    """serve/threads.py: only the engine thread keeps an OpenMP team. An embedding forward
    with 2 torch threads used to leave its executor thread holding a team (an idle OpenMP
    worker) for good, making the engine's decode waits throttle; now it runs in a thread
    that ends with it. Counted from the server's own /proc entry."""
    import os
    import time

    s = start_server([run_dir], "--threads", "2")
    c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def threads() -> int:  # the least over a second: a reload poll's short-lived thread may be up
        counts = []
        for _ in range(10):
            counts.append(len(os.listdir(f"/proc/{s.proc.pid}/task")))
            time.sleep(0.1)
        return min(counts)

    c.completions.create(model=MODEL, prompt="def", max_tokens=4)  # the engine's own team exists
    before = threads()
    for text in ("import json", "def f(x):\n    return x\n", "class A:\n    pass\n"):
        c.embeddings.create(model=MODEL, input=[text] * 4)
    # + the idle executor thread that queues embedding requests; a team would add its worker too.
    assert threads() == before + 1
