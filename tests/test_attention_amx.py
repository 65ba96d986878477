"""Causal bf16 attention on AMX tiles (nn/csrc/attention_amx.cpp), what training uses on AMX CPUs:
its output and gradients are as close to fp64 as PyTorch's flash attention's, for the layouts the
model hands it (transposed views), grouped-query heads and several head sizes; training with it
follows the same loss curve; and where it does not apply (no AMX, a capped run, shapes off its
grid) attention falls back to PyTorch."""

import pytest
import torch
import torch.nn.functional as F

from exaflop.nn.layers import amx_attention, attend

needs_amx = pytest.mark.skipif(not amx_attention(), reason="needs a CPU with AMX (and the kernels built)")


def _reference(q, k, v):
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                          is_causal=True)


@needs_amx
@pytest.mark.parametrize("B,H,K,T,D", [(2, 4, 4, 64, 64), (3, 6, 2, 96, 32), (1, 2, 1, 128, 128)])
def test_output_and_gradients_as_close_to_fp64_as_flash(B, H, K, T, D):
    torch.manual_seed(0)
    # As the model makes them: (B, T, heads, D) projections viewed as (B, heads, T, D).
    q, k, v = (torch.randn(B, T, n, D).bfloat16().transpose(1, 2) for n in (H, K, K))
    g = torch.randn(B, H, T, D).bfloat16()
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    ref = _reference(*exact)
    ref.backward(g.double())
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attend(*ours, None, True)
    assert out.grad_fn is not None and "AMX" in type(out.grad_fn).__name__, "the AMX kernel did not run"
    out.backward(g)
    flash = [t.clone().requires_grad_() for t in (q, k, v)]
    fout = _reference(*flash)
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
    assert not amx_attention()
    monkeypatch.setenv("EXAFLOP_AMX_ATTENTION", "1")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # a run capped below AMX
    assert not amx_attention()


def _losses(amx: bool, bf16: bool, monkeypatch) -> list[float]:
    from exaflop.config import OptimConfig
    from exaflop.engine.optim import build_optimizer
    from exaflop.lm.config import ModelConfig
    from exaflop.lm.model import LM

    monkeypatch.setenv("EXAFLOP_AMX_ATTENTION", "1" if amx else "0")
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
    """20 steps in bf16 with the AMX kernel against flash attention (same seed and batches): no
    further apart than bf16 is from fp32 on the same run (x2, floor 0.01 nats)."""
    ours = _losses(True, True, monkeypatch)
    flash = _losses(False, True, monkeypatch)
    fp32 = _losses(False, False, monkeypatch)
    assert flash[-1] < flash[0] - 1.0, "the run did not learn: the comparison would be vacuous"
    noise = max(abs(a - b) for a, b in zip(flash, fp32, strict=True))
    gap = max(abs(a - b) for a, b in zip(ours, flash, strict=True))
    assert gap <= max(2 * noise, 0.01), f"AMX vs flash {gap:.4f} nats; bf16 vs fp32 {noise:.4f}"


@needs_amx
@pytest.mark.compile
def test_compiled_calls_the_same_kernel():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 64, 4, 64).bfloat16().transpose(1, 2) for _ in range(3))
    g = torch.randn(2, 4, 64, 64).bfloat16()
    results = []
    for fn in (lambda *a: attend(*a, None, True), torch.compile(lambda *a: attend(*a, None, True))):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*ins)
        out.backward(g)
        results.append([out.detach(), *(t.grad for t in ins)])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
