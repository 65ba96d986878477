"""The paged KV cache (nn/paged.py): its decode-attention kernel and the gather fallback equal
dense attention, and a model decoding through it picks exactly the tokens the full forward picks."""

import copy

import pytest
import torch

import exaflop.nn.paged as paged
from exaflop.lm.config import ModelConfig
from exaflop.lm.model import LM
from exaflop.nn.decode import _decode_attention
from exaflop.nn.packed import pack_for_inference
from exaflop.nn.paged import BLOCK, PagedKVCache, paged_decode, paged_kernel


@pytest.fixture(params=["kernel", "gather"])
def path(request, monkeypatch):
    """Both ways decode attention reads a paged cache: the C++ kernel, and gathering blocks
    (what runs where the kernel cannot be built)."""
    if request.param == "kernel":
        assert paged_kernel(), "the kernel must build here (g++ and ninja are installed)"
    else:
        monkeypatch.setattr(paged, "_kernel", False)
    return request.param


@pytest.mark.parametrize("dtype,pairs", [(torch.float32, False), (torch.bfloat16, True)])  # the layouts PagedKVCache makes
@pytest.mark.parametrize("D", [64, 40])  # register-held sums (64) and the general loop (40)
def test_paged_decode_equals_dense_attention(path, dtype, pairs, D):
    g = torch.Generator().manual_seed(0)
    B, H, K = 4, 6, 2
    lens = torch.tensor([1, 17, 50, 33])  # a lone key, a block and a position, several blocks
    nb = -(-int(lens.max()) // BLOCK)
    n_blocks = 1 + B * nb + 5
    keys_t = torch.randn(n_blocks, K, D, BLOCK, generator=g).to(dtype)
    values = torch.randn(n_blocks, K, BLOCK, D, generator=g).to(dtype)
    if pairs:  # bf16's layout in PagedKVCache: (N, K, D/2, BLOCK, 2) and (N, K, BLOCK/2, D, 2)
        keys_t = keys_t.view(n_blocks, K, D // 2, 2, BLOCK).transpose(-1, -2).contiguous()
        values = values.view(n_blocks, K, BLOCK // 2, 2, D).transpose(-1, -2).contiguous()
    table = (1 + torch.randperm(n_blocks - 1, generator=g)[:B * nb]).view(B, nb)  # scattered blocks
    q = torch.randn(B, H, D, generator=g).to(dtype)
    got = paged_decode(q, keys_t, values, table, lens)
    k, v = paged.gather(keys_t, values, table, nb)
    mask = (torch.arange(nb * BLOCK)[None, :] < lens[:, None])[:, None, None]
    want = _decode_attention(q.float()[:, :, None], k.float(), v.float(), mask)[:, :, 0]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def _model(**extra) -> LM:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=3, d_model=96, n_head=6, n_kv_head=2, d_ff=256, vocab_size=500, seq_len=96,
                      init_std=0.1, tie_embeddings=False, **extra)
    return LM(cfg).eval()


def test_paged_greedy_equals_the_full_forward_token_for_token(path):
    """fp32, what the server does: rows of different lengths right-padded into one prefill, blocks
    reserved as rows grow, rows packed after one ends (a table moved), then a row restarted on
    blocks it shares with another (a prefix-cache hit) — every token the full forward's."""
    m = _model()
    fast = pack_for_inference(copy.deepcopy(m))
    c = m.cfg
    cache = PagedKVCache(c.n_layer, 3, c.n_kv_head, 96, c.head_dim)
    torch.manual_seed(1)
    prompts = [torch.randint(0, 500, (n,)) for n in (3, 37, 20)]
    seqs = [p.clone() for p in prompts]

    def reference(seq: torch.Tensor) -> int:
        logits, _ = m(seq[None])
        return int(logits[0, -1].argmax())

    with torch.inference_mode():
        lens = torch.tensor([len(p) for p in prompts])
        x = torch.zeros(3, int(lens.max()), dtype=torch.long)
        for i, p in enumerate(prompts):
            x[i, :len(p)] = p
        cache.reserve([0, 1, 2], lens.tolist())
        nxt = fast.decode(x, cache, torch.arange(3), lens).argmax(-1)
        rows = [0, 1, 2]
        for t in range(30):
            for r, i in enumerate(rows):
                assert int(nxt[r]) == reference(seqs[i]), f"sequence {i} step {t}"
                seqs[i] = torch.cat([seqs[i], nxt[r:r + 1]])
            if t == 10:  # sequence 0 ends; the last row moves into its slot
                cache.release(0)
                cache.move_row(2, 0)
                rows = [2, 1]
                nxt = nxt[[2, 1]]
            n = len(rows)
            cache.reserve(list(range(n)), [int(cache.lengths[r]) + 1 for r in range(n)])
            nxt = fast.decode(nxt[:, None], cache).argmax(-1)
        # Sequence 1 again, in slot 2, its first two blocks shared with slot 1's (refcounted).
        shared = cache.owned[1][:2]
        cache.attach(2, shared)
        assert all(cache.refs[b] == 2 for b in shared)
        rest = seqs[1][2 * BLOCK:]
        cache.reserve([2], [len(seqs[1])])
        got = fast.decode(rest[None], cache, torch.tensor([2]))
        assert int(got.argmax()) == reference(seqs[1])


def test_bf16_paged_decoding_tracks_the_dense_cache(path):
    """bf16 (the pair layout): logits through the paged cache stay within bf16 rounding of the
    dense cache's over a prefill and 30 decode steps of rows of different lengths."""
    m = pack_for_inference(_model().to(torch.bfloat16))
    c = m.cfg
    paged_cache = PagedKVCache(c.n_layer, 2, c.n_kv_head, 96, c.head_dim, dtype=torch.bfloat16)
    assert paged_cache.pairs
    dense = m.new_cache(2, 96)
    torch.manual_seed(3)
    x = torch.randint(0, 500, (2, 21))
    lens = torch.tensor([21, 9])
    with torch.inference_mode():
        paged_cache.reserve([0, 1], lens.tolist())
        a, b = m.decode(x, dense, torch.arange(2), lens), m.decode(x, paged_cache, torch.arange(2), lens)
        for _ in range(30):
            tok = a.argmax(-1, keepdim=True)
            paged_cache.reserve([0, 1], [n + 1 for n in paged_cache.lengths.tolist()])
            a, b = m.decode(tok, dense), m.decode(tok, paged_cache)
            assert (a - b).abs().max() <= 0.05 * a.abs().max()


def test_bf16_cache_of_an_fp32_model_is_read_exactly(path):
    """An fp32 model's bf16 cache (`serve --kv-dtype bf16`) keeps the fp32 layout in half the
    bytes: attention over it is bit for bit attention over fp32 pools holding the same rounded
    keys and values (widening bf16 is exact), through the kernel and the gather path alike."""
    g = torch.Generator().manual_seed(0)
    B, H, K, D = 3, 6, 2, 64
    lens = torch.tensor([5, 40, 17])
    nb = -(-int(lens.max()) // BLOCK)
    keys = torch.randn(1 + B * nb, K, D, BLOCK, generator=g).bfloat16()
    values = torch.randn(1 + B * nb, K, BLOCK, D, generator=g).bfloat16()
    table = 1 + torch.randperm(B * nb, generator=g).view(B, nb)
    q = torch.randn(B, H, D, generator=g)
    got = paged_decode(q, keys, values, table, lens)
    assert got.dtype == torch.float32
    assert torch.equal(got, paged_decode(q, keys.float(), values.float(), table, lens))


@pytest.mark.parametrize("model_dtype,kv_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_a_model_decodes_through_a_cache_of_the_other_dtype(path, model_dtype, kv_dtype):
    """`serve --kv-dtype`: a cache in another dtype than the model's. fp32 model, bf16 cache: the fp32
    layout in bf16 (not the pair layout, which is for bf16 queries), half the bytes per block. bf16
    model, fp32 cache: the fp32 layout. Either way the logits over a prefill and 30 decode steps stay
    within rounding of the same model decoding through a cache of its own dtype."""
    m = pack_for_inference(_model().to(model_dtype))
    c = m.cfg
    caches = [PagedKVCache(c.n_layer, 2, c.n_kv_head, 96, c.head_dim, dtype=dt, compute_dtype=model_dtype)
              for dt in (model_dtype, kv_dtype)]
    assert not caches[1].pairs and caches[1].keys[0].dtype == kv_dtype
    assert caches[1].keys[0].shape == (caches[1].n_blocks, c.n_kv_head, c.head_dim, BLOCK)
    assert (PagedKVCache.block_bytes(c.n_layer, c.n_kv_head, c.head_dim, torch.bfloat16) * 2
            == PagedKVCache.block_bytes(c.n_layer, c.n_kv_head, c.head_dim, torch.float32))
    torch.manual_seed(3)
    x = torch.randint(0, 500, (2, 21))
    lens = torch.tensor([21, 9])
    tol = 0.02 if model_dtype == torch.float32 else 0.05
    with torch.inference_mode():
        for cache in caches:
            cache.reserve([0, 1], lens.tolist())
        a, b = (m.decode(x, cache, torch.arange(2), lens) for cache in caches)
        assert a.dtype == b.dtype
        for _ in range(30):
            tok = a.argmax(-1, keepdim=True)
            for cache in caches:
                cache.reserve([0, 1], [n + 1 for n in cache.lengths.tolist()])
            a, b = m.decode(tok, caches[0]), m.decode(tok, caches[1])
            assert (a.float() - b.float()).abs().max() <= tol * a.float().abs().max()
        if model_dtype == torch.float32:
            assert not torch.equal(a, b)  # the bf16 cache rounds: not the same logits, only close


def _fused_vs_unfused_run(m: LM, kv_dtype: torch.dtype, compiled: bool = False) -> tuple[torch.Tensor, list]:
    """Logits of a prefill, a one-token prefill of a row attached to shared blocks, and 20 decode
    steps (packed rows, then rows given), with the pools at the end."""
    c = m.cfg
    cache = PagedKVCache(c.n_layer, 3, c.n_kv_head, 96, c.head_dim, dtype=kv_dtype, compute_dtype=torch.float32)
    step = torch.compile(LM.logits_at, dynamic=True) if compiled else None
    torch.manual_seed(2)
    x = torch.randint(0, 500, (2, 35))
    lens = torch.tensor([35, 18])
    out = []
    with torch.inference_mode():
        cache.reserve([0, 1], lens.tolist())
        out.append(m.decode(x, cache, torch.arange(2), lens))
        cache.attach(2, cache.owned[0][:2])  # row 2 starts on row 0's first 32 positions
        cache.reserve([2], [33])
        out.append(m.decode(x[:1, 32:33], cache, torch.tensor([2])))  # a one-token prefill
        tok = out[0].argmax(-1, keepdim=True)
        for t in range(20):
            rows = None if t < 10 else torch.tensor([1, 0])  # packed (the compiled step), then gathered
            order = [0, 1] if rows is None else [1, 0]
            cache.reserve(order, [int(cache.lengths[r]) + 1 for r in order])
            lg = m.decode(tok if rows is None else tok[[1, 0]], cache, rows, step=step if rows is None else None)
            out.append(lg if rows is None else lg[[1, 0]])
            tok = out[-1].argmax(-1, keepdim=True)
    return torch.cat(out), [p.clone() for p in cache.keys + cache.values]


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_attention_is_the_unfused_one_bit_for_bit(monkeypatch, kv_dtype):
    """The fp32 step's RoPE, cache write and attention in one kernel (`paged_decode_rope`) give
    the logits and the pools of RoPE, the indexed write and `paged_decode` run one after the
    other, bit for bit: grouped heads, a one-token prefill on shared blocks, packed and gathered
    rows, fp32 and bf16 pools."""
    assert paged_kernel(), "the kernel must build here (g++ and ninja are installed)"
    m = pack_for_inference(_model())
    fused, pools = _fused_vs_unfused_run(m, kv_dtype)
    monkeypatch.setattr(paged, "_fused_ready", lambda: False)
    unfused, pools_unfused = _fused_vs_unfused_run(m, kv_dtype)
    assert torch.equal(fused, unfused)
    assert all(torch.equal(a, b) for a, b in zip(pools, pools_unfused, strict=True))


@pytest.mark.compile
def test_compiled_fused_decode_attention_is_the_unfused_one_bit_for_bit(monkeypatch):
    """The same through a compiled decode step (what `serve` runs): the operator mutates the
    pools in place, and the compiled step's logits and pools are the unfused step's."""
    assert paged_kernel()
    m = pack_for_inference(_model())
    fused, pools = _fused_vs_unfused_run(m, torch.float32, compiled=True)
    monkeypatch.setattr(paged, "_fused_ready", lambda: False)
    torch._dynamo.reset()
    unfused, pools_unfused = _fused_vs_unfused_run(m, torch.float32, compiled=True)
    assert torch.equal(fused, unfused)
    assert all(torch.equal(a, b) for a, b in zip(pools, pools_unfused, strict=True))
