"""RMSNorm's kernel for eager training on CPU (nn/csrc/rmsnorm.cpp, through nn/layers.py's RMSNorm and
Block): output and gradients (input, branch, weight) as close to fp64 as PyTorch's ops, with and
without the residual add before it, in bf16 autocast and in fp32; where it does not apply
(switched off, no grad, compiled) PyTorch's ops run."""

import pytest
import torch

from exaflop.nn.kernels import cpu_kernels
from exaflop.nn.layers import RMSNorm

pytestmark = pytest.mark.skipif(not cpu_kernels(), reason="exaflop's CPU kernels did not build here")


def _run(norm, x, y, autocast, gh, gs):
    """Forward (x + y, norm) or norm(x), backward with given output gradients; returns output, grads."""
    x = x.clone().requires_grad_()
    y = None if y is None else y.clone().requires_grad_()
    norm.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        s, h = norm.add_forward(x, y) if y is not None else (None, norm(x))
    loss = (h.float() * gh).sum() + ((s * gs).sum() if s is not None else 0)
    loss.backward()
    return h, [h.detach().double(), x.grad.double(), None if y is None else y.grad.double(), norm.weight.grad.double()]


@pytest.mark.parametrize("autocast", [True, False], ids=["bf16", "fp32"])
@pytest.mark.parametrize("branch", [None, torch.bfloat16, torch.float32], ids=["norm", "add-bf16", "add-fp32"])
def test_as_close_to_fp64_as_pytorch(branch, autocast, monkeypatch):
    torch.manual_seed(0)
    norm = RMSNorm(96)
    norm.weight.data = torch.rand(96) + 0.5
    x = torch.randn(3, 40, 96) * 3
    y = None if branch is None else torch.randn(3, 40, 96).to(branch)
    gh, gs = torch.randn(3, 40, 96), torch.randn(3, 40, 96)
    # fp64 reference
    xd, wd = x.double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    yd = None if y is None else y.double().requires_grad_()
    sd = xd if yd is None else xd + yd
    hd = sd * torch.rsqrt(sd.pow(2).mean(-1, keepdim=True) + norm.eps) * wd
    ((hd * gh.double()).sum() + ((sd * gs.double()).sum() if yd is not None else 0)).backward()
    exact = [hd.detach(), xd.grad, None if yd is None else yd.grad, wd.grad]

    h, ours = _run(norm, x, y, autocast, gh, gs)
    assert "RMSNormCPU" in type(h.grad_fn).__name__, "the kernel did not run"
    assert h.dtype == (torch.bfloat16 if autocast else torch.float32)
    monkeypatch.setenv("EXAFLOP_RMSNORM_KERNEL", "0")
    h_ref, torch_ = _run(norm, x, y, autocast, gh, gs)
    assert "RMSNormCPU" not in type(h_ref.grad_fn).__name__
    for name, a, p, e in zip(("output", "dx", "dy", "dw"), ours, torch_, exact, strict=True):
        if e is None:
            continue
        scale = e.abs().max()
        err, ref_err = float((a - e).abs().max() / scale), float((p - e).abs().max() / scale)
        # One rounding to the output / branch dtype at most; fp32 work otherwise.
        assert err <= 2 * ref_err + 1e-6, f"{name}: kernel {err:.2e} vs PyTorch {ref_err:.2e}"


def test_inference_keeps_pytorchs_ops():
    norm = RMSNorm(64)
    x = torch.randn(2, 32, 64, requires_grad=True)
    with torch.no_grad():
        assert norm(x).grad_fn is None
    assert "RMSNormCPU" in type(norm(x).grad_fn).__name__
    x32, y = torch.randn(2, 32, 64), torch.randn(2, 32, 64).bfloat16()
    s, h = norm.add_forward(x32, y)
    assert torch.equal(s, x32 + y)


def test_bad_input_is_refused_with_the_operators_name():
    with pytest.raises(RuntimeError, match="rmsnorm: x must be fp32"):
        torch.ops.exaflop.rmsnorm_fwd(torch.randn(4, 8).bfloat16(), None, torch.ones(8), 1e-5, torch.float32)
    with pytest.raises(RuntimeError, match="rmsnorm: y must be a contiguous CPU"):
        torch.ops.exaflop.rmsnorm_fwd(torch.randn(4, 8), torch.randn(8, 4).t(), torch.ones(8), 1e-5, torch.float32)
