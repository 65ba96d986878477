"""The fp32 decode step as one operator (lm/fused_step.py, nn/csrc/decode_f32.cpp): what `serve`
decodes with where `auto` serves fp32 (PyTorch dispatching to AVX2). It computes the model's
step: logits within fp32 rounding of the layer-by-layer step, the same greedy tokens as the
plain full forward, the same keys and values written, on grouped heads, tied embeddings, fp32
and bf16 caches, shared prefix blocks and batches that change size."""

import copy
import functools

import pytest
import torch

from exaflop.lm.config import ModelConfig
from exaflop.lm.fused_step import fused_step, fused_step_applies
from exaflop.lm.model import LM
from exaflop.nn.kernels import cpu_has, cpu_kernels
from exaflop.nn.packed import pack_for_inference
from exaflop.nn.paged import PagedKVCache, gather

pytestmark = pytest.mark.skipif(not (cpu_has("avx2") and cpu_has("fma") and cpu_kernels()),
                                reason="the operator needs AVX2 + FMA and exaflop's kernels built")


def _model(**extra) -> LM:
    torch.manual_seed(0)
    cfg = dict(n_layer=3, d_model=96, n_head=6, n_kv_head=2, d_ff=256, vocab_size=500, seq_len=96, init_std=0.1,
               tie_embeddings=False)
    return LM(ModelConfig(**{**cfg, **extra})).eval()


def _paged(m: LM, slots: int, dtype: torch.dtype = torch.float32) -> PagedKVCache:
    c = m.cfg
    return PagedKVCache(c.n_layer, slots, c.n_kv_head, c.seq_len, c.head_dim, extra_blocks=8, dtype=dtype,
                        compute_dtype=torch.float32)


def _prefill(m: LM, cache: PagedKVCache, prompts: list[torch.Tensor]) -> torch.Tensor:
    lens = torch.tensor([len(p) for p in prompts])
    x = torch.zeros(len(prompts), int(lens.max()), dtype=torch.long)
    for i, p in enumerate(prompts):
        x[i, :len(p)] = p
    cache.reserve(list(range(len(prompts))), lens.tolist())
    return m.decode(x, cache, None, lens)


@pytest.mark.parametrize("kv", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_fused_step_is_the_layer_by_layer_step(kv, tied):
    """Rows of different lengths, then batches of 5, 3 and 1 rows: logits within fp32 rounding of
    the unfused step's (RMSNorm and SiLU sum and round in another order; products and attention
    are the same kernels), and the pools hold the same keys and values."""
    m = pack_for_inference(_model(tie_embeddings=tied))
    # bf16 pools: a key an ulp apart in fp32 can round to the neighbouring bf16 value (2^-8
    # relative), which moves logits of ~1 by ~1e-3 (measured up to 1.04e-3).
    tol = 1e-5 if kv == torch.float32 else 1e-2
    torch.manual_seed(1)
    prompts = [torch.randint(0, 500, (n,)) for n in (3, 17, 9, 1, 30)]
    with torch.inference_mode():
        a, b = _paged(m, 5, kv), _paged(m, 5, kv)
        torch.testing.assert_close(_prefill(m, a, prompts), _prefill(m, b, prompts), rtol=0, atol=0)
        x = torch.randint(0, 500, (5, 1))
        for B in [5] * 4 + [3] * 4 + [1] * 4:
            for c in (a, b):
                c.reserve(list(range(B)), (c.lengths[:B] + 1).tolist())
            want = m.decode(x[:B], a)
            got = m.decode(x[:B], b, step=fused_step)
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
            x = want.argmax(-1, keepdim=True).repeat(5 // B + 1, 1)[:5]
        assert torch.equal(a.lengths, b.lengths)
        n = int(a.lengths.max())
        for la in range(m.cfg.n_layer):
            ka, va = gather(a.keys[la], a.values[la], a.table[:5], -(-n // a.block))
            kb, vb = gather(b.keys[la], b.values[la], b.table[:5], -(-n // b.block))
            for r, length in enumerate(a.lengths.tolist()):
                torch.testing.assert_close(kb[r, :, :length].float(), ka[r, :, :length].float(), rtol=tol, atol=tol)
                torch.testing.assert_close(vb[r, :, :length].float(), va[r, :, :length].float(), rtol=tol, atol=tol)


def test_fused_step_greedy_equals_the_full_forward_token_for_token():
    """The serving contract: one right-padded prefill, then one token per row per step through the
    operator, picks exactly what recomputing each whole sequence with the plain model picks."""
    m = _model()
    fast = pack_for_inference(copy.deepcopy(m))
    torch.manual_seed(2)
    prompts = [torch.randint(0, 500, (n,)) for n in (3, 14, 7)]
    steps = 40
    with torch.inference_mode():
        cache = _paged(fast, 3)
        out = [_prefill(fast, cache, prompts).argmax(-1)]
        for _ in range(steps - 1):
            cache.reserve([0, 1, 2], (cache.lengths[:3] + 1).tolist())
            out.append(fast.decode(out[-1][:, None], cache, step=fused_step).argmax(-1))
        got = torch.stack(out, 1)
        for r, p in enumerate(prompts):
            seq = p.clone()
            for t in range(steps):
                nxt = m(seq[None])[0][0, -1].argmax()
                assert int(got[r, t]) == int(nxt), f"row {r} step {t}"
                seq = torch.cat([seq, nxt[None]])


@pytest.mark.parametrize("rows", [3, 4, 8, 16, 20, 24])
def test_products_streamed_for_huge_pages_give_the_same_bits(rows):
    """The operator's two ways of streaming its weights (nn/csrc/linear_f32.h wide_scheme: as for
    2 MB pages, as for 4 KB ones) give the same logits and caches, bit for bit. The shapes make
    the 2 MB-page way take the long single-chunk products (gate/up: 2048 rows, the head: 2048, K
    64) at 4-12 and 20+ rows, with one thread or two."""
    m = pack_for_inference(_model(d_model=64, n_head=4, n_kv_head=2, d_ff=1024, vocab_size=2048))
    torch.manual_seed(3)
    prompts = [torch.randint(0, 2048, (int(n),)) for n in torch.randint(1, 40, (rows,))]
    with torch.inference_mode():
        caches = {huge: _paged(m, rows) for huge in (False, True)}
        for cache in caches.values():
            _prefill(m, cache, prompts)
        x = torch.randint(0, 2048, (rows, 1))
        for _ in range(3):
            out = {}
            for huge, cache in caches.items():
                cache.reserve(list(range(rows)), (cache.lengths[:rows] + 1).tolist())
                out[huge] = m.decode(x, cache, step=functools.partial(fused_step, huge_pages=huge))
            assert torch.equal(out[False], out[True])
            x = out[True].argmax(-1, keepdim=True)
        a, b = caches[False], caches[True]
        assert torch.equal(a.lengths, b.lengths)
        nb = -(-int(a.lengths.max()) // a.block)
        for layer in range(m.cfg.n_layer):
            ka, va = gather(a.keys[layer], a.values[layer], a.table[:rows], nb)
            kb, vb = gather(b.keys[layer], b.values[layer], b.table[:rows], nb)
            for r, length in enumerate(a.lengths[:rows].tolist()):
                assert torch.equal(ka[r, :, :length], kb[r, :, :length])
                assert torch.equal(va[r, :, :length], vb[r, :, :length])


def test_fused_step_reads_shared_prefix_blocks():
    """A row whose first blocks are another row's (the prefix cache attaches them, nn/paged.py)
    decodes through the operator like a row that computed them."""
    m = pack_for_inference(_model())
    torch.manual_seed(3)
    prompt = torch.randint(0, 500, (40,))  # two full blocks and a part
    with torch.inference_mode():
        cache, ref = _paged(m, 2), _paged(m, 2)
        _prefill(m, cache, [prompt])
        _prefill(m, ref, [prompt, prompt])
        cache.attach(1, cache.table[0, :2].tolist())  # row 1 shares row 0's first 32 positions
        assert int(cache.lengths[1]) == 32
        cache.reserve([1], [40])
        m.decode(prompt[None, 32:], cache, torch.tensor([1]))
        x = torch.randint(0, 500, (2, 1))
        for _ in range(6):
            for c in (cache, ref):
                c.reserve([0, 1], (c.lengths[:2] + 1).tolist())
            got = m.decode(x, cache, step=fused_step)
            want = m.decode(x, ref)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            x = want.argmax(-1, keepdim=True)


def test_what_the_operator_does_not_take_goes_through_the_model():
    """A prompt chunk, gathered rows, a dense cache or an MoE model: `fused_step` is `LM.logits_at`
    there (the runner hands it every decode)."""
    moe = pack_for_inference(_model(n_experts=4, top_k=2))
    assert not fused_step_applies(moe)
    m = pack_for_inference(_model())
    with torch.inference_mode():
        x = torch.randint(0, 500, (2, 1))
        for model in (moe, m):
            dense_a, dense_b = model.new_cache(2, 96), model.new_cache(2, 96)
            torch.testing.assert_close(model.decode(x, dense_b, step=fused_step), model.decode(x, dense_a),
                                       rtol=0, atol=0)
        a, b = _paged(m, 3), _paged(m, 3)
        for c in (a, b):
            c.reserve([0, 1, 2], [4, 4, 4])
        prompt = torch.randint(0, 500, (3, 4))
        torch.testing.assert_close(m.decode(prompt, b, step=fused_step), m.decode(prompt, a), rtol=0, atol=0)
        rows = torch.tensor([2, 0])
        for c in (a, b):
            c.reserve([0, 2], [5, 5])
        torch.testing.assert_close(m.decode(x, b, rows, step=fused_step), m.decode(x, a, rows), rtol=0, atol=0)


def test_bad_shapes_are_refused_with_the_field_named():
    m = pack_for_inference(_model())
    from exaflop.lm.fused_step import _weights

    w = _weights(m)
    cache = _paged(m, 2)
    cache.reserve([0, 1], [1, 1])
    args = dict(cos=m.rope_cos, sin=m.rope_sin, keys=cache.keys, values=cache.values, table=cache.table,
                start=cache.lengths[:2], n_head=6, n_kv_head=2, eps=1e-5)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="6 weights per layer"):
            torch.ops.exaflop.decode_f32(torch.tensor([1, 2]), m.tok_emb.weight, w[:-1], **args)
        with pytest.raises(RuntimeError, match="out of the vocabulary"):
            torch.ops.exaflop.decode_f32(torch.tensor([1, 500]), m.tok_emb.weight, w, **args)
        with pytest.raises(RuntimeError, match="past the cache"):
            torch.ops.exaflop.decode_f32(torch.tensor([1, 2]), m.tok_emb.weight, w,
                                         **{**args, "start": torch.tensor([0, 10_000])})
