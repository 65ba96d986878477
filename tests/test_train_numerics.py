"""The training step's fused path (the chunked LM head + cross-entropy of nn/loss.py, which computes
the gradients during the forward) trains like the plain reference: full fp32 logits and
`F.cross_entropy` through autograd.

The tolerance is bf16's own noise on the same run: the reference in bf16 against the reference in
fp32 (same seed, same batches). The fast path must stay as close to the bf16 reference as bf16 is
to fp32 (x2, plus a floor of 0.01 nats for runs where bf16 happens to track fp32 very closely).
"""

import pytest
import torch
import torch.nn.functional as F

from exaflop.config import OptimConfig
from exaflop.engine.optim import build_optimizer
from exaflop.lm.config import ModelConfig
from exaflop.lm.model import LM

STEPS = 20


def _losses(fast: bool, bf16: bool) -> list[float]:
    torch.manual_seed(0)
    m = LM(ModelConfig(n_layer=2, d_model=128, n_head=4, vocab_size=512, seq_len=64))
    opt = build_optimizer(m, OptimConfig(lr=3e-3), torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    # A learnable stream (a noisy repeating pattern), so the loss falls and the curves mean something.
    base = torch.randint(0, 512, (64,), generator=gen)
    out = []
    for _ in range(STEPS):
        x = base.roll(int(torch.randint(0, 64, (1,), generator=gen))).repeat(8, 2)[:, :65].clone()
        noise = torch.rand(x.shape, generator=gen) < 0.1
        x[noise] = torch.randint(0, 512, (int(noise.sum()),), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if fast:
                _, loss = m(x[:, :-1], x[:, 1:])
            else:
                logits = m.lm_head(m.norm(m.hidden(x[:, :-1]))).float()
                loss = F.cross_entropy(logits.reshape(-1, 512), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="bf16 on CPU needs oneDNN")
def test_fast_training_step_stays_within_bf16_noise_of_the_reference():
    fast = _losses(True, True)
    ref = _losses(False, True)
    ref32 = _losses(False, False)
    assert ref[-1] < ref[0] - 1.0, "the reference did not learn: the comparison would be vacuous"
    noise = max(abs(a - b) for a, b in zip(ref, ref32, strict=True))
    gap = max(abs(a - b) for a, b in zip(fast, ref, strict=True))
    assert gap <= max(2 * noise, 0.01), f"fast vs reference {gap:.4f} nats; bf16 vs fp32 {noise:.4f}"


def test_fp32_fast_step_matches_the_reference_closely():
    """In fp32 the two agree to float rounding (the fused loss sums its chunks in another order)."""
    fast = _losses(True, False)
    ref = _losses(False, False)
    assert max(abs(a - b) for a, b in zip(fast, ref, strict=True)) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_causal_attention_backward_matches_flash(dtype):
    """The attention a compiled training step uses on CPU (flash forward, matmul backward from the
    forward's log-sum-exp; nn/layers.py) gives flash attention's output and gradients. Called
    directly here (eagerly): the arithmetic is the same as when the compiler fuses it."""
    from exaflop.nn.layers import _CausalAttentionCPU

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(2, 3, 40, 16, dtype=dtype)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*ref, is_causal=True).backward(g.double())
    got = _CausalAttentionCPU.apply(q, k, v)
    got.backward(g)
    flash = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*flash, is_causal=True).backward(g)
    for ours, theirs, exact in zip((q, k, v), flash, ref, strict=True):
        # No further from the fp64 answer than flash attention itself (plus rounding slack).
        err_ours = (ours.grad.double() - exact.grad).abs().max()
        err_flash = (theirs.grad.double() - exact.grad).abs().max()
        assert err_ours <= 2 * err_flash + (1e-6 if dtype == torch.float32 else 1e-2)


def test_clipping_through_the_fused_optimizer_equals_scaling_the_gradients():
    """engine/step.py clips by handing the fused AdamW the norm as its `grad_scale` instead of
    scaling every gradient in place first: the same update to float rounding, reported norm as
    fp64's, and `grad_scale` gone after the step (the next step must not divide by it)."""
    from types import SimpleNamespace

    from exaflop.engine.step import clip, train_step

    runs = []
    for fused in (True, False):
        torch.manual_seed(0)
        m = LM(ModelConfig(n_layer=2, d_model=128, n_head=4, vocab_size=512, seq_len=64))
        opt = build_optimizer(m, OptimConfig(lr=3e-3, fused=fused), torch.device("cpu"))
        assert all(bool(g.get("fused")) == fused for g in opt.param_groups)
        gen = torch.Generator().manual_seed(1)
        batches = iter([{"input": x[:, :-1], "target": x[:, 1:]}
                        for x in torch.randint(0, 512, (3, 8, 65), generator=gen)])
        task = SimpleNamespace(loss=lambda model, b: (model(b["input"], b["target"])[1], {}))
        rt = SimpleNamespace(distributed=False, device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", enabled=False))
        norms = []
        for step in range(3):
            out = train_step(m, opt, task, batches, 1, rt, step, 3e-3, grad_clip=0.05)
            assert not hasattr(opt, "grad_scale")
            norms.append(out.grad_norm)
        runs.append((norms, [p.detach().clone() for p in m.parameters()]))
    (norms_f, params_f), (norms_u, params_u) = runs
    assert min(norms_u) > 0.05, "the gradients were never clipped: the comparison would be vacuous"
    assert max(abs(a - b) / b for a, b in zip(norms_f, norms_u, strict=True)) < 1e-5
    assert max(float((a - b).abs().max()) for a, b in zip(params_f, params_u, strict=True)) < 1e-5
    # The reported norm: fp64's over every gradient.
    grads = [torch.randn(1000) * 10 ** i for i in range(-3, 3)]
    exact = float(torch.linalg.vector_norm(torch.cat([g.double() for g in grads])))
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    assert abs(clip(SimpleNamespace(parameters=lambda: params), 0.0, SimpleNamespace(distributed=False)) - exact) \
        <= 1e-6 * exact
