"""exaflop's AMX kernels for bf16 training (on CPUs with AMX; skipped elsewhere).

Causal attention (nn/csrc/attention_amx.cpp): output and gradients as close to fp64 as PyTorch's
flash attention's, for the layouts the model hands it (transposed views), grouped-query heads and
several head sizes. Linear layers' weight gradient (nn/csrc/wgrad_amx.cpp): closer to fp64 than
oneDNN's bf16 product, through nn/layers.py's Linear under autocast. Training with both follows
the same loss curve as without; where they do not apply (no AMX, a capped run, shapes off their
grid) PyTorch's paths run."""

import pytest
import torch
import torch.nn.functional as F

from exaflop.nn.layers import Linear, amx_attention, amx_wgrad, apply_rope, attend, rope_tables

needs_amx = pytest.mark.skipif(not amx_attention(), reason="needs a CPU with AMX (and the kernels built)")


def _reference(q, k, v, rope=None):
    if rope is not None:  # in the inputs' precision, as the model's fallback path rotates
        q, k = (apply_rope(x, *(t.to(x.dtype if x.dtype == torch.float64 else torch.float32) for t in rope))
                for x in (q, k))
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                          is_causal=True)


@needs_amx
@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rope"])
@pytest.mark.parametrize("B,H,K,T,D", [(2, 4, 4, 64, 64), (3, 6, 2, 96, 32), (1, 2, 1, 128, 128)])
def test_output_and_gradients_as_close_to_fp64_as_flash(B, H, K, T, D, rope):
    """With RoPE tables the kernel rotates q and k itself and rotates their gradients back: the
    same bounds against fp64 as PyTorch's rotation followed by flash attention."""
    torch.manual_seed(0)
    # As the model makes them: (B, T, heads, D) projections viewed as (B, heads, T, D).
    q, k, v = (torch.randn(B, T, n, D).bfloat16().transpose(1, 2) for n in (H, K, K))
    g = torch.randn(B, H, T, D).bfloat16()
    tables = tuple(t[:T] for t in rope_tables(D, 2 * T)) if rope else None  # a model's, sliced to T
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    ref = _reference(*exact, rope=tables)
    ref.backward(g.double())
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attend(*ours, None, True, rope=tables)
    assert out.grad_fn is not None and "AMX" in type(out.grad_fn).__name__, "the AMX kernel did not run"
    out.backward(g)
    flash = [t.clone().requires_grad_() for t in (q, k, v)]
    fout = _reference(*flash, rope=tables)
    fout.backward(g)
    # One bf16 rounding of the output, and gradients no further from fp64 than flash's (x2 slack:
    # the two round P and dS to bf16 at different points).
    assert (out.double() - ref).abs().max() <= 2 * (fout.double() - ref).abs().max() + 1e-3
    for a, f, e in zip(ours, flash, exact, strict=True):
        assert a.grad.shape == e.grad.shape
        assert (a.grad.double() - e.grad).abs().max() <= 2 * (f.grad.double() - e.grad).abs().max() + 1e-3


@needs_amx
def test_off_grid_shapes_and_fp32_fall_back_to_pytorch():
    q, k, v = (torch.randn(1, 2, 40, 32).bfloat16().requires_grad_() for _ in range(3))  # T % 32 != 0
    assert "AMX" not in type(attend(q, k, v, None, True).grad_fn).__name__
    q, k, v = (torch.randn(1, 2, 64, 32, requires_grad=True) for _ in range(3))  # fp32
    assert "AMX" not in type(attend(q, k, v, None, True).grad_fn).__name__


@needs_amx
def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("EXAFLOP_AMX_ATTENTION", "0")
    assert not amx_attention() and amx_wgrad()
    monkeypatch.setenv("EXAFLOP_AMX_ATTENTION", "1")
    monkeypatch.setenv("EXAFLOP_AMX", "0")
    assert not amx_attention() and not amx_wgrad()
    monkeypatch.setenv("EXAFLOP_AMX", "1")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # a run capped below AMX
    assert not amx_attention() and not amx_wgrad()


def _losses(amx: bool, bf16: bool, monkeypatch) -> list[float]:
    from exaflop.config import OptimConfig
    from exaflop.engine.optim import build_optimizer
    from exaflop.lm.config import ModelConfig
    from exaflop.lm.model import LM

    monkeypatch.setenv("EXAFLOP_AMX", "1" if amx else "0")
    torch.manual_seed(0)
    m = LM(ModelConfig(n_layer=2, d_model=128, n_head=4, n_kv_head=2, vocab_size=512, seq_len=64))
    opt = build_optimizer(m, OptimConfig(lr=3e-3), torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    base = torch.randint(0, 512, (64,), generator=gen)  # a learnable, noisy repeating stream
    out = []
    for _ in range(20):
        x = base.roll(int(torch.randint(0, 64, (1,), generator=gen))).repeat(8, 2)[:, :65].clone()
        noise = torch.rand(x.shape, generator=gen) < 0.1
        x[noise] = torch.randint(0, 512, (int(noise.sum()),), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, loss = m(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


@needs_amx
def test_training_follows_the_same_loss_curve(monkeypatch):
    """20 steps in bf16 with the AMX kernels against PyTorch's paths (same seed and batches): no
    further apart than bf16 is from fp32 on the same run (x2, floor 0.01 nats)."""
    ours = _losses(True, True, monkeypatch)
    flash = _losses(False, True, monkeypatch)
    fp32 = _losses(False, False, monkeypatch)
    assert flash[-1] < flash[0] - 1.0, "the run did not learn: the comparison would be vacuous"
    noise = max(abs(a - b) for a, b in zip(flash, fp32, strict=True))
    gap = max(abs(a - b) for a, b in zip(ours, flash, strict=True))
    assert gap <= max(2 * noise, 0.01), f"AMX vs PyTorch {gap:.4f} nats; bf16 vs fp32 {noise:.4f}"


@needs_amx
@pytest.mark.compile
def test_compiled_calls_the_same_kernel():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 64, 4, 64).bfloat16().transpose(1, 2) for _ in range(3))
    g = torch.randn(2, 4, 64, 64).bfloat16()
    tables = rope_tables(64, 64)
    results = []
    for fn in (lambda *a: attend(*a, None, True, rope=tables),
               torch.compile(lambda *a: attend(*a, None, True, rope=tables))):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*ins)
        out.backward(g)
        results.append([out.detach(), *(t.grad for t in ins)])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@needs_amx
@pytest.mark.parametrize("M,N,K", [(2048, 384, 384), (512, 1024, 384), (256, 96, 1024), (64, 2048, 64)])
def test_weight_gradient_closer_to_fp64_than_onednn(M, N, K):
    torch.manual_seed(0)
    g, x = torch.randn(M, N).bfloat16(), torch.randn(M, K).bfloat16()
    exact = g.double().t() @ x.double()
    ours = torch.ops.exaflop.linear_wgrad_amx(g, x)
    assert ours.dtype == torch.float32 and ours.shape == (N, K)
    # fp32 accumulation of exact bf16 products: rounding of fp32 sums only, far below bf16's output rounding.
    assert (ours.double() - exact).abs().max() < 1e-4 * exact.abs().max()
    assert (ours.double() - exact).abs().max() < (g.t() @ x).double().sub(exact).abs().max()
    # a strided view (a slice of wider rows) reads the same numbers
    wide = torch.randn(M, N + 32).bfloat16()
    wide[:, :N] = g
    assert torch.equal(torch.ops.exaflop.linear_wgrad_amx(wide[:, :N], x), ours)


@needs_amx
def test_linear_under_autocast_matches_nn_linear():
    torch.manual_seed(0)
    ours, ref = Linear(384, 1024, bias=False), torch.nn.Linear(384, 1024, bias=False)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(8, 64, 384)
    outs = []
    for m in (ours, ref):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(xi)
        (y.float() ** 2).mean().backward()
        outs.append((y, xi.grad, m.weight.grad))
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = outs
    assert y.grad_fn is not None and "AMX" in type(y.grad_fn).__name__
    assert torch.equal(y, y_ref)  # the same bf16 product (oneDNN) forward
    assert dx.dtype == torch.float32 and torch.equal(dx, dx_ref)  # and input gradient
    assert dw.dtype == torch.float32
    # the reference's weight gradient was rounded to bf16 before its cast back: within that rounding
    assert (dw - dw_ref).abs().max() <= 2 ** -7 * dw_ref.abs().max()


@needs_amx
def test_linear_falls_back_off_its_grid():
    m = Linear(384, 100, bias=False)  # N % 32 != 0
    x = torch.randn(64, 384, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "AMX" not in type(m(x).grad_fn).__name__
    m = Linear(384, 128, bias=False)
    assert "AMX" not in type(m(x).grad_fn).__name__  # fp32: no autocast, no bf16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(x).grad_fn is None


def test_swiglu_kernel_closer_to_fp64_than_pytorch():
    """SwiGLU's elementwise part while training in bf16 (nn/csrc/swiglu.cpp; any CPU): output and
    both gradients no further from fp64 than PyTorch's bf16 ops, and the module takes it."""
    from exaflop.nn.cpu_ops import swiglu_kernel
    from exaflop.nn.layers import SwiGLU

    if not swiglu_kernel():
        pytest.skip("exaflop's CPU kernels are not built here")
    torch.manual_seed(0)
    g, u, dy = (torch.randn(64, 1024).bfloat16() for _ in range(3))
    exact = [t.double().requires_grad_() for t in (g, u)]
    ref = F.silu(exact[0]) * exact[1]
    ref.backward(dy.double())
    ours = torch.ops.exaflop.swiglu_fwd(g, u)
    dg, du = torch.ops.exaflop.swiglu_bwd(dy, g, u)
    torch_in = [t.clone().requires_grad_() for t in (g, u)]
    theirs = F.silu(torch_in[0]) * torch_in[1]
    theirs.backward(dy)
    assert (ours.double() - ref).abs().max() <= (theirs.double() - ref).abs().max()
    for a, b, e in ((dg, torch_in[0].grad, exact[0].grad), (du, torch_in[1].grad, exact[1].grad)):
        assert (a.double() - e).abs().max() <= 1.01 * (b.double() - e).abs().max()
    m = SwiGLU(128, 256)
    x = torch.randn(4, 32, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_swiglu_kernel_keeps_the_sigmoid_limits():
    """The sigmoid's reciprocal (csrc/swiglu.cpp: on AVX-512 an estimate refined by a Newton step)
    keeps silu's limits where 1 + exp(-x) overflows - 0, not inf * 0 = NaN - and, in fp32, is no
    further from fp64 than PyTorch's own fp32 ops, from -1e30 to 1e30."""
    from exaflop.nn.cpu_ops import swiglu_kernel

    if not swiglu_kernel():
        pytest.skip("exaflop's CPU kernels are not built here")
    torch.manual_seed(0)
    special = torch.tensor([-1e30, -200.0, -100.0, -88.5, -80.0, -1e-30, 0.0, 1e-30, 20.0, 80.0, 100.0, 1e30])
    g = torch.cat([special, torch.randn(52) * 8]).repeat(16)  # vector lanes and the tail alike
    u, dy = torch.randn_like(g), torch.randn_like(g)
    exact = [t.double().requires_grad_() for t in (g, u)]
    ref = exact[0] * torch.sigmoid(exact[0]) * exact[1]
    ref.backward(dy.double())
    torch_in = [t.clone().requires_grad_() for t in (g, u)]
    theirs = F.silu(torch_in[0]) * torch_in[1]
    theirs.backward(dy)
    ours = torch.ops.exaflop.swiglu_fwd(g, u)
    dg, du = torch.ops.exaflop.swiglu_bwd(dy, g, u)
    for a, b, e in ((ours, theirs.detach(), ref.detach()), (dg, torch_in[0].grad, exact[0].grad),
                    (du, torch_in[1].grad, exact[1].grad)):
        assert torch.isfinite(a).all()
        assert (a.double() - e).abs().max() <= 1.01 * (b.double() - e).abs().max()
    assert ours[:5].abs().max() < 1e-30  # silu(x) -> 0 for x -> -inf
