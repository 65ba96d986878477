"""Automatic prefix caching (serve/prefix.py) on real servers, and the block store itself."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from exaflop.nn.decode import KVCache
from exaflop.serve.prefix import BLOCK, PrefixCache
from tests.serve.conftest import MODEL

SYSTEM = "You answer questions about the json module. " * 12  # a long shared prefix


def turn2(a_text: str = "It encodes objects.") -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What does dumps do?"},
            {"role": "assistant", "content": a_text}, {"role": "user", "content": "And loads?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_second_turn_reuses_the_first_turns_blocks(server, client):
    first = turn2()[:2]
    r1 = client.chat.completions.create(model=MODEL, messages=first, max_tokens=12, temperature=0.0)
    prompt1 = httpx.post(server.url + "/tokenize", json={"model": MODEL, "messages": first}).json()["tokens"]
    r2 = client.chat.completions.create(model=MODEL, messages=turn2(), max_tokens=12, temperature=0.0)
    prompt2 = httpx.post(server.url + "/tokenize", json={"model": MODEL, "messages": turn2()}).json()["tokens"]
    shared = next(i for i, (a, b) in enumerate(zip(prompt1 + [-1], prompt2, strict=False)) if a != b)
    assert shared == len(prompt1) > 300  # turn 1's whole prompt starts turn 2
    assert r2.usage.prompt_tokens_details.cached_tokens == shared // BLOCK * BLOCK
    assert r1.usage.prompt_tokens == len(prompt1) and r2.usage.prompt_tokens == len(prompt2)


def test_greedy_outputs_are_the_same_with_caching_off(run_dir, start_server, client):
    off = openai.OpenAI(base_url=start_server([run_dir], "--prefix-cache-mb", "0").url + "/v1", api_key="x")
    convs = [turn2(a) for a in ("It encodes objects.", "A string.", "JSON text")]
    for conv in convs * 2:  # the second pass runs on a warm cache
        kw = {"model": MODEL, "messages": conv, "max_tokens": 24, "temperature": 0.0}
        a, b = client.chat.completions.create(**kw), off.chat.completions.create(**kw)
        assert a.choices[0].message.content == b.choices[0].message.content
        assert b.usage.prompt_tokens_details.cached_tokens == 0
    assert a.usage.prompt_tokens_details.cached_tokens > 0


def test_32_concurrent_streams_sharing_a_prefix_equal_one_at_a_time(client):
    def one(i: int) -> str:
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}?"}]
        return client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16,
                                              temperature=0.0).choices[0].message.content

    alone = [one(i) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(one, range(32)))
    assert together == alone


def cache(slots: int = 2, max_len: int = 256) -> KVCache:
    c = KVCache(n_layer=2, slots=slots, n_kv_head=2, max_len=max_len, head_dim=4)
    for kc, vc in zip(c.k, c.v, strict=True):  # position p of row r holds r*1000 + p: checkable
        pos = torch.arange(max_len, dtype=torch.float32)
        for r in range(slots):
            kc[r] = (r * 1000 + pos)[None, :, None]
            vc[r] = -(r * 1000 + pos)[None, :, None]
    return c


def test_restore_copies_the_longest_stored_chain_and_leaves_a_token():
    c = cache()
    c.lengths[0] = 70
    pc = PrefixCache(budget_bytes=1 << 20)
    ids = list(range(70))
    pc.store(c, 0, ids)  # 4 full blocks of 16
    assert len(pc.blocks) == 4
    assert pc.restore(c, 1, ids[:64]) == 48  # 64 tokens: at most 63 restorable -> 3 blocks
    assert int(c.lengths[1]) == 48
    assert torch.equal(c.k[1][1, :, :48], c.k[0][0, :, :48]) and torch.equal(c.v[0][1, :, :48], c.v[0][0, :, :48])
    assert pc.restore(c, 1, [*ids[:20], 999, *ids[21:]]) == 16  # a change in block 2 ends the chain
    assert pc.restore(c, 1, [5, *ids[1:]]) == 0


def test_eviction_keeps_the_budget_and_takes_leaves_first():
    c = cache(max_len=512)
    c.lengths[0] = 512
    one_block = 2 * 2 * (2 * BLOCK * 4 * 4)  # layers x (k, v) x K*block*D fp32 bytes
    pc = PrefixCache(budget_bytes=5 * one_block)
    pc.store(c, 0, list(range(128)))  # 8 blocks of one chain: the 3 deepest go
    assert pc.bytes <= 5 * one_block and len(pc.blocks) == 5
    assert pc.restore(c, 1, list(range(128))) == 5 * BLOCK  # the kept ones are the chain's start
    pc.store(c, 0, [7, *range(1, 64)])  # a new chain: the old chain's leaves go before its root
    assert pc.bytes <= 5 * one_block
    assert pc.restore(c, 1, list(range(128))) >= BLOCK  # the old chain still starts reachable
