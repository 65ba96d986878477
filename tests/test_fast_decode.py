"""Serving's fast decode path computes what the model defines: packed / fused weights are bit-identical,
and greedy decoding through the serving path (packed weights, right-padded batched prompts, one
token per row per step, shared per-step indices) equals greedy decoding by the plain full forward."""

import copy
import os

import pytest
import torch

from exaflop.lm.config import ModelConfig
from exaflop.lm.model import LM
from exaflop.nn.packed import PackedLinear, pack_for_inference


def _model(dtype: torch.dtype, **extra) -> LM:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=3, d_model=96, n_head=6, n_kv_head=2, d_ff=256, vocab_size=500, seq_len=96,
                      init_std=0.1, tie_embeddings=False, **extra)
    return LM(cfg).eval().to(dtype)


def _serve_greedy(m: LM, prompts: list[torch.Tensor], n: int) -> torch.Tensor:
    """What the engine does: one right-padded prefill of every prompt, then one token per row per step."""
    lens = torch.tensor([len(p) for p in prompts])
    x = torch.zeros(len(prompts), int(lens.max()), dtype=torch.long)
    for i, p in enumerate(prompts):
        x[i, :len(p)] = p
    cache = m.new_cache(len(prompts), 96)
    out = [m.decode(x, cache, None, lens).argmax(-1)]
    for _ in range(n - 1):
        out.append(m.decode(out[-1][:, None], cache).argmax(-1))
    return torch.stack(out, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_are_bit_identical(dtype):
    """bf16 (oneDNN's reordered weights): bit-identical. fp32 (fused matrices, plain matmuls):
    bit-identical where the BLAS computes a column the same whatever the matrix's width (MKL's
    AVX-512 kernels); MKL's AVX2 kernels block the reduction by width, so there within a few
    ulps (measured: 2.5e-6 on logits of ~1e-2..1; MKL_ENABLE_INSTRUCTIONS=AVX2)."""
    avx512 = "AVX512" in torch.backends.cpu.get_cpu_capability() and "MKL_ENABLE_INSTRUCTIONS" not in os.environ
    tol = 0.0 if dtype == torch.bfloat16 or avx512 else 1e-5
    m = _model(dtype)
    packed = pack_for_inference(copy.deepcopy(m))
    assert isinstance(packed.lm_head, PackedLinear) and packed.blocks[0].attn.fused is not None
    assert not hasattr(packed.blocks[0].attn, "wq")  # the unfused copies are released
    x = torch.randint(0, 500, (3, 11))
    with torch.inference_mode():
        a, b = m.new_cache(3), packed.new_cache(3)
        torch.testing.assert_close(packed.decode(x, b), m.decode(x, a), rtol=0, atol=tol)
        step = torch.randint(0, 500, (3, 1))
        torch.testing.assert_close(packed.decode(step, b), m.decode(step, a), rtol=0, atol=tol)


def test_packing_a_moe_model_leaves_its_experts_alone():
    from exaflop.nn.packed import f32_rows_kernel

    m = _model(torch.float32, n_experts=4, top_k=2)
    packed = pack_for_inference(copy.deepcopy(m))
    x = torch.randint(0, 500, (2, 9))
    # Bit for bit, except where the fp32 decode kernel (AVX2 dispatch) computes the head's rows: it
    # sums in another order than MKL (within a few ulps).
    tol = 1e-5 if f32_rows_kernel() else 0.0
    with torch.inference_mode():
        torch.testing.assert_close(packed.decode(x, packed.new_cache(2)), m.decode(x, m.new_cache(2)),
                                   rtol=0, atol=tol)


def test_serving_greedy_equals_the_full_forward_token_for_token():
    """fp32: the serving path (packed weights, batched rows of different lengths, incremental
    decode) picks exactly the tokens that recomputing the whole sequence with the plain model
    picks, for every row and step."""
    m = _model(torch.float32)
    torch.manual_seed(1)
    prompts = [torch.randint(0, 500, (n,)) for n in (3, 14, 7)]
    n = 40
    with torch.inference_mode():
        got = _serve_greedy(pack_for_inference(copy.deepcopy(m)), prompts, n)
        for r, p in enumerate(prompts):
            seq = p.clone()
            for t in range(n):
                logits, _ = m(seq[None])
                nxt = logits[0, -1].argmax()
                assert int(got[r, t]) == int(nxt), f"row {r} step {t}"
                seq = torch.cat([seq, nxt[None]])


def test_bf16_serving_logits_track_the_full_forward():
    """bf16 differs from the full forward by rounding only (attention through SDPA, fp32 inside)."""
    m = _model(torch.bfloat16)
    ref = _model(torch.float32)
    torch.manual_seed(2)
    seq = torch.randint(0, 500, (2, 30))
    with torch.inference_mode():
        fast = pack_for_inference(m)
        cache = fast.new_cache(2, 96)
        fast.decode(seq[:, :10], cache)
        got = torch.stack([fast.decode(seq[:, t:t + 1], cache) for t in range(10, 29)], 1)
        want, _ = ref(seq[:, :29])
    torch.testing.assert_close(got, want[:, 10:29].float(), atol=0.15, rtol=0.05)


def test_int8_matrices_are_the_weights_rounded_per_row():
    """`quantize="int8"`: each matrix is q * scale with |w - q*scale| <= scale/2 per row (rounding
    to the nearest step, the scale itself stored in bf16), and both kernels — `_weight_int8pack_mm`
    below INT8_KERNEL_ROWS rows, the widened matmul from there on — compute that matrix's product."""
    from exaflop.nn.packed import INT8_KERNEL_ROWS, quantize_int8

    torch.manual_seed(3)
    w = (torch.randn(80, 96) * torch.linspace(0.01, 2, 80)[:, None]).bfloat16()
    w[5] = 0  # a zero row quantizes to zeros, not NaN
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and q.abs().max() <= 127
    deq = q.float() * scale.float()[:, None]
    assert bool(((w.float() - deq).abs() <= scale.float()[:, None] / 2 + 1e-6).all())
    assert bool((deq[5] == 0).all())
    lin = PackedLinear([w[:48], w[48:]], quantize="int8")
    assert lin.packed is None and lin.weight is None  # no bf16 copy kept: half the bytes
    for rows in (1, INT8_KERNEL_ROWS - 1, INT8_KERNEL_ROWS, 37):
        x = torch.randn(rows, 96).bfloat16()
        want = x.float() @ deq.T
        got = torch.cat(lin(x), -1).float()
        # bf16 output rounding (2^-8 relative) of sums of 96 products
        torch.testing.assert_close(got, want, atol=0.05 * float(want.abs().max()) / 8, rtol=0.02)
    with pytest.raises(ValueError, match="quantize"):
        PackedLinear([w], quantize="int4")


def test_int8_serving_stays_close_to_bf16():
    """The whole model with int8 matrices: logits within a few percent of bf16's, decode and prefill
    (the two kernels) agreeing on the same positions."""
    m = _model(torch.bfloat16)
    torch.manual_seed(4)
    seq = torch.randint(0, 500, (2, 24))
    with torch.inference_mode():
        ref = pack_for_inference(copy.deepcopy(m))
        q8 = pack_for_inference(copy.deepcopy(m), quantize="int8")
        assert q8.quantized == "int8" and q8.blocks[0].attn.fused.qweight.dtype == torch.int8
        want = ref.decode(seq, ref.new_cache(2, 96), None, torch.tensor([24, 24]))
        prefill = q8.decode(seq, q8.new_cache(2, 96), None, torch.tensor([24, 24]))  # 48 rows: widened
        cache = q8.new_cache(2, 96)
        q8.decode(seq[:, :23], cache)
        step = q8.decode(seq[:, 23:], cache)  # 2 rows: the int8 kernel
    rel = (prefill.float() - want.float()).norm() / want.float().norm()
    assert rel < 0.05, rel
    torch.testing.assert_close(step.float(), prefill.float(), atol=0.1, rtol=0.05)


def _ulps_bf16(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bf16 steps between two bf16 tensors of the same sign pattern."""
    ia, ib = (t.view(torch.int16).to(torch.int32) for t in (a, b))
    return int((ia - ib).abs().max())


@pytest.mark.skipif(not __import__("exaflop.nn.packed", fromlist=["row_kernel"]).row_kernel(),
                    reason="the single-row kernel needs AVX512-BF16 (and PyTorch dispatching to AVX-512)")
def test_single_row_kernel_computes_the_product():
    """One row through exaflop's kernel (csrc/linear_row.cpp): within one bf16 step of oneDNN's
    kernel on the same row (another summation order, same fp32 sums), for widths that fill its
    passes of eight matrix rows and widths that leave a tail; more rows, and K not a multiple of
    32, stay on oneDNN; a whole bf16 model packed for serving decodes one row within rounding
    of the same row decoded in a batch."""
    torch.manual_seed(5)
    for n in (8, 13, 300, 2304):
        w = torch.randn(n, 768).bfloat16()
        fast, ref = PackedLinear([w], single_row=True), PackedLinear([w], single_row=False)
        assert fast.row is not None and ref.row is None
        x = torch.randn(1, 1, 768).bfloat16()
        with torch.inference_mode():
            got, want = fast(x), ref(x)
        assert got.shape == (1, 1, n) and _ulps_bf16(got, want) <= 1
        torch.testing.assert_close(got.float(), (x.float() @ w.float().T), atol=0.05, rtol=0.01)
        x3 = torch.randn(3, 768).bfloat16()
        with torch.inference_mode():
            assert torch.equal(fast(x3), ref(x3))  # several rows: oneDNN, bit for bit
    assert PackedLinear([torch.randn(64, 40).bfloat16()], single_row=True).row is None  # K % 32 != 0
    assert PackedLinear([torch.randn(64, 64)], single_row=True).row is None  # fp32: MKL, unchanged

    m = pack_for_inference(_model(torch.bfloat16))
    assert m.blocks[0].attn.fused.row is not None and m.lm_head.row is not None  # the default here
    seq = torch.randint(0, 500, (2, 12))
    with torch.inference_mode():
        batched = m.decode(seq, m.new_cache(2, 96))  # (2, V): logits after each row's last token
        cache = m.new_cache(1, 96)
        m.decode(seq[:1, :11], cache)
        alone = m.decode(seq[:1, 11:], cache)  # one row: the kernel, every matrix
    torch.testing.assert_close(alone[0].float(), batched[0].float(), atol=0.05, rtol=0.05)


@pytest.mark.skipif(not __import__("exaflop.nn.packed", fromlist=["row_kernel"]).row_kernel(),
                    reason="the single-row kernel needs AVX512-BF16 (and PyTorch dispatching to AVX-512)")
def test_no_row_copies_where_memory_is_short(monkeypatch):
    """The one-row kernel's weight copies are made only while they take a modest share of the
    memory available: a model that would not fit twice is served by oneDNN alone."""
    import exaflop.nn.packed as packed

    assert pack_for_inference(_model(torch.bfloat16)).lm_head.row is not None
    monkeypatch.setattr(packed, "ROW_COPY_MEMORY_SHARE", 1e-9)
    m = pack_for_inference(_model(torch.bfloat16))
    assert m.lm_head.row is None and m.lm_head.packed is not None
    assert all(lin.row is None for lin in m.modules() if isinstance(lin, PackedLinear))


@pytest.mark.skipif(not __import__("exaflop.nn.packed", fromlist=["int8_row_kernel"]).int8_row_kernel(),
                    reason="the one-row int8 kernel needs AVX-512 (and PyTorch dispatching to it)")
def test_one_row_int8_kernel_computes_the_int8_product():
    """One row of an int8 matrix (K a multiple of 64) goes through exaflop's kernel: the same
    product as `_weight_int8pack_mm` (which two rows still use) to bf16 rounding, a tail of
    matrix rows included; a whole int8 model's one-row decode tracks its batched decode."""
    from exaflop.nn.packed import quantize_int8

    torch.manual_seed(6)
    for n in (8, 21, 768):
        w = torch.randn(n, 128).bfloat16()
        lin = PackedLinear([w], quantize="int8")
        assert lin.int8_row
        q, scale = quantize_int8(w)
        x = torch.randn(2, 128).bfloat16()
        with torch.inference_mode():
            one = lin(x[:1])
            want = torch.ops.aten._weight_int8pack_mm(x[:1], q, scale)
            both = lin(x)  # two rows: `_weight_int8pack_mm`
        assert _ulps_bf16(one, want) <= 1 and torch.equal(both, torch.ops.aten._weight_int8pack_mm(x, q, scale))
    assert not PackedLinear([torch.randn(64, 96).bfloat16()], quantize="int8").int8_row  # K % 64 != 0

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, d_model=128, n_head=4, n_kv_head=2, d_ff=256, vocab_size=500, seq_len=96,
                      init_std=0.1, tie_embeddings=False)
    m = pack_for_inference(LM(cfg).eval().to(torch.bfloat16), quantize="int8")
    assert m.blocks[0].attn.fused.int8_row
    seq = torch.randint(0, 500, (2, 12))
    with torch.inference_mode():
        batched = m.decode(seq, m.new_cache(2, 96))
        cache = m.new_cache(1, 96)
        m.decode(seq[:1, :11], cache)
        alone = m.decode(seq[:1, 11:], cache)
    torch.testing.assert_close(alone[0].float(), batched[0].float(), atol=0.1, rtol=0.05)


def _f32_kernel_runs() -> bool:
    from exaflop.nn.kernels import cpu_has, cpu_kernels

    return cpu_has("avx2") and cpu_has("fma") and cpu_kernels()


@pytest.mark.skipif(not _f32_kernel_runs(), reason="the fp32 decode kernel needs AVX2 + FMA and a C++ compiler")
def test_fp32_decode_kernel_is_the_product_and_batch_invariant(monkeypatch):
    """exaflop's fp32 decode kernel (csrc/linear_f32.cpp): the product within fp32 rounding of
    MKL's, for every tiling and scheme it picks (1, 2-23, 24+ rows, one or two panels of x rows,
    K in one chunk or several; widths that leave tails), and each row's result bit for bit the
    same whatever rows come with it; a model packed with it decodes a sequence alone exactly as
    in a batch, and stays within rounding of MKL's decode."""
    import exaflop.nn.packed as packed

    torch.manual_seed(6)
    for n, k in ((13, 768), (2304, 768), (50, 96), (20, 2048)):
        w = torch.randn(n, k)
        x = torch.randn(50, 1, k)
        got = torch.ops.exaflop.linear_f32_rows(x, w)
        torch.testing.assert_close(got, torch.nn.functional.linear(x, w), atol=1e-4, rtol=1e-5)
        for rows in (1, 2, 3, 5, 8, 9, 17, 23, 24, 32, 49):
            part = torch.ops.exaflop.linear_f32_rows(x[:rows], w)
            assert torch.equal(part, got[:rows]), (n, k, rows)
        fused = torch.ops.exaflop.linear_f32_rows(x, torch.cat([w, w[:7]]))
        assert torch.equal(fused[..., :n], got)  # a fused matrix's columns are the unfused ones

    monkeypatch.setattr(packed, "f32_rows_kernel", lambda: True)  # AVX2 dispatch picks it; here forced
    m = pack_for_inference(_model(torch.float32))
    assert m.lm_head.f32_rows and m.blocks[0].attn.fused.f32_rows
    ref = pack_for_inference(_model(torch.float32), pack=False)
    ref.lm_head.f32_rows = False
    for lin in ref.modules():
        if isinstance(lin, PackedLinear):
            lin.f32_rows = False
    prompts = [torch.randint(0, 500, (n,)) for n in (5, 9, 3, 12)]
    with torch.inference_mode():
        batched = _serve_greedy(m, prompts, 12)
        alone = torch.cat([_serve_greedy(m, [p], 12) for p in prompts])
        assert torch.equal(batched, alone)
        x = torch.randint(0, 500, (4, 1))
        cache_a, cache_b = m.new_cache(4, 96), ref.new_cache(4, 96)
        torch.testing.assert_close(m.decode(x, cache_a), ref.decode(x, cache_b), atol=1e-4, rtol=1e-4)
