"""Automatic prefix caching (serve/prefix.py) on real servers, and the block store itself."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from exaflop.nn.paged import PagedKVCache
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
    # All of it: its full blocks shared, the partial last one copied (turn 1's reply continued it).
    assert shared % BLOCK and shared <= r2.usage.prompt_tokens_details.cached_tokens < len(prompt2)
    assert r1.usage.prompt_tokens == len(prompt1) and r2.usage.prompt_tokens == len(prompt2)
    metrics = {line.split(" ")[0]: float(line.split(" ")[1])
               for line in httpx.get(server.url + "/metrics").text.splitlines() if line and line[0] != "#"}
    assert metrics[f'exaflop_prefix_cache_hit_tokens_total{{model="{MODEL}"}}'] >= shared // BLOCK * BLOCK
    blocks = {s: metrics[f'exaflop_kv_cache_blocks{{model="{MODEL}",state="{s}"}}'] for s in ("used", "cached", "free")}
    assert blocks["cached"] >= len(prompt2) // BLOCK and blocks["free"] > 0  # both turns' blocks kept, idle


def test_greedy_outputs_are_the_same_with_caching_off(run_dir, start_server, client):
    off = openai.OpenAI(base_url=start_server([run_dir], "--prefix-cache-mb", "0").url + "/v1", api_key="x")
    convs = [turn2(a) for a in ("It encodes objects.", "A string.", "JSON text")]
    for conv in convs * 2:  # the second pass runs on a warm cache
        kw = {"model": MODEL, "messages": conv, "max_tokens": 24, "temperature": 0.0}
        a, b = client.chat.completions.create(**kw), off.chat.completions.create(**kw)
        assert a.choices[0].message.content == b.choices[0].message.content
        assert b.usage.prompt_tokens_details.cached_tokens == 0
    assert a.usage.prompt_tokens_details.cached_tokens > 0


def _metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ")[1])
    return 0.0


def test_32_concurrent_streams_sharing_a_prefix_equal_one_at_a_time_and_share_its_blocks(server, client):
    def msgs(i: int) -> list[dict]:
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}?"}]

    def one(i: int) -> str:
        return client.chat.completions.create(model=MODEL, messages=msgs(i), max_tokens=16,
                                              temperature=0.0).choices[0].message.content

    alone = [one(i) for i in range(32)]
    # While the 32 run together, watch how many KV blocks running sequences hold: the shared
    # prompt's blocks once, not 32 times.
    used, done = [], threading.Event()

    def watch() -> None:
        while not done.is_set():
            used.append(_metric(server, f'exaflop_kv_cache_blocks{{model="{MODEL}",state="used"}}'))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(32) as pool:
            together = list(pool.map(one, range(32)))
    finally:
        done.set()
        watcher.join()
    assert together == alone
    prompt = len(httpx.post(server.url + "/tokenize", json={"model": MODEL, "messages": msgs(0)}).json()["tokens"])
    unshared = 32 * -(-(prompt + 16) // BLOCK)  # every sequence with its own copy of the prompt
    assert prompt > 10 * BLOCK and 0 < max(used) < unshared / 4, (max(used), unshared)


def pool(slots: int = 2, max_len: int = 128, extra_blocks: int = 0) -> tuple[PagedKVCache, PrefixCache]:
    c = PagedKVCache(n_layer=2, slots=slots, n_kv_head=2, max_len=max_len, head_dim=4, extra_blocks=extra_blocks)
    return c, PrefixCache(c)


def fill(c: PagedKVCache, row: int, n: int) -> None:
    """Row `row` holds n positions (its own blocks), as a prefill would leave it."""
    c.reserve([row], [n])
    c.lengths[row] = n


def test_attach_shares_the_longest_indexed_chain_copies_the_tail_and_leaves_a_token():
    c, pc = pool()
    ids = list(range(70))
    fill(c, 0, 70)
    for layer in range(2):
        c.keys[layer].normal_(), c.values[layer].normal_()
    pc.register(0, ids)  # 4 full blocks of 16
    assert len(pc.entries) == 4
    # 64 tokens: at most 63 reusable -> 3 blocks shared, 15 positions of the 4th copied
    assert pc.attach(1, ids[:64]) == 63 and pc.copied == 15
    assert int(c.lengths[1]) == 63
    assert c.owned[1][:3] == c.owned[0][:3] and torch.equal(c.table[1, :3], c.table[0, :3])  # the same blocks
    own, src = c.owned[1][3], c.owned[0][3]
    assert own not in c.owned[0] and int(c.table[1, 3]) == own  # the 4th: a copy of the row's own
    assert all(torch.equal(pool[own], pool[src]) for pool in (*c.keys, *c.values))
    assert [c.refs[b] for b in c.owned[0]] == [2, 2, 2, 1, 1] and c.refs[own] == 1
    c.release(1)
    assert pc.attach(1, [*ids[:20], 999, *ids[21:]]) == 20  # block 1's first 4 tokens, then a change
    c.release(1)
    assert pc.attach(1, [5, *ids[1:]]) == 0  # nothing indexed starts with 5
    c.release(1)
    assert pc.attach(1, ids[:2]) == 1  # one token reusable, copied from block 0


def test_a_copied_tail_decodes_like_a_computed_one():
    """A prompt that ends mid-block, seen before as the start of a longer sequence: its last
    partial block comes from the cache (copied) and one token is computed; the logits are the
    ones the whole prompt's prefill gives, and the block it was copied from is left as it was."""
    from exaflop.lm.config import ModelConfig
    from exaflop.lm.model import LM
    from exaflop.nn.packed import pack_for_inference

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=128, vocab_size=300, seq_len=96,
                      init_std=0.1, tie_embeddings=False)
    m = pack_for_inference(LM(cfg).eval())
    c = PagedKVCache(cfg.n_layer, 2, cfg.n_kv_head, 96, cfg.head_dim, extra_blocks=8)
    pc = PrefixCache(c)
    seq = torch.randint(0, 300, (40,))
    with torch.inference_mode():
        c.reserve([0], [40])
        m.decode(seq[None], c, torch.tensor([0]), torch.tensor([40]))
        pc.register(0, seq.tolist())  # blocks 0-1 (32 tokens) indexed
        before = [p[c.owned[0][1]].clone() for p in (*c.keys, *c.values)]
        prompt = seq[:27].tolist()  # ends mid-block 1
        assert pc.attach(1, prompt) == 26
        c.reserve([1], [27])
        got = m.decode(torch.tensor([prompt[26:]]), c, torch.tensor([1]), torch.tensor([1]))
        want, _ = m(torch.tensor([prompt]))
    torch.testing.assert_close(got[0], want[0, -1], atol=1e-5, rtol=1e-5)
    assert all(torch.equal(p[c.owned[0][1]], b) for p, b in zip((*c.keys, *c.values), before, strict=True))


def test_a_shared_block_outlives_its_first_row_and_unindexed_blocks_are_freed():
    c, pc = pool()
    fill(c, 0, 40)  # blocks: 2 full (indexed) + 1 partial (not)
    pc.register(0, list(range(40)))
    free = len(c.free)
    c.release(0)
    assert len(c.free) == free + 1  # only the partial block went back; the indexed two stay
    assert c.usage() == {"used": 0, "cached": 2, "free": c.n_blocks - 3}
    assert pc.attach(1, list(range(40))) == 32 and pc.cached_blocks == 0
    assert c.usage()["used"] == 2 and c.usage()["cached"] == 0


def test_eviction_under_pressure_reuses_least_recently_used_leaves_first():
    c, pc = pool(slots=1, max_len=128, extra_blocks=2)  # room for one full row + 2 kept blocks
    fill(c, 0, 128)
    pc.register(0, list(range(128)))  # 8 indexed blocks, one chain
    c.release(0)
    assert pc.cached_blocks == 8 and len(c.free) == 2
    other = [7, *range(1000, 1127)]
    fill(c, 0, 128)  # 8 blocks wanted, 2 free: 6 evicted, the deepest of the chain first
    assert pc.cached_blocks == 2 and len(pc.entries) == 2 and c.usage() == {"used": 8, "cached": 2, "free": 0}
    pc.register(0, other)
    c.release(0)
    assert pc.attach(0, list(range(128))) == 2 * BLOCK  # the old chain's start is still reachable
    c.release(0)
    assert pc.attach(0, other) > 0


def test_moving_a_row_moves_its_table_not_its_keys():
    c, _ = pool(slots=3)
    fill(c, 2, 33)
    blocks = list(c.owned[2])
    c.keys[0][blocks[0]].fill_(3.0)
    c.move_row(2, 0)
    assert c.owned[0] == blocks and c.owned[2] == [] and int(c.lengths[0]) == 33
    assert torch.equal(c.table[0, :3], torch.tensor(blocks)) and c.keys[0][c.owned[0][0]].eq(3.0).all()
