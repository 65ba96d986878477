"""The stacked-expert MoE against a plain per-token computation, its gradients, balancing
and capacity; the LM's validation loss without the balance term."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from exaflop.lm.config import ModelConfig
from exaflop.lm.model import LM
from exaflop.nn.moe import MoE, grouped_mm


def reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: what the MoE computes, written the slow way."""
    x2 = x.reshape(-1, x.shape[-1])
    logits = F.linear(x2.float(), moe.router.weight.float())
    probs = logits.softmax(-1)
    out = torch.zeros_like(x2)
    for t in range(x2.shape[0]):
        chosen = (logits[t] + moe.expert_bias).topk(moe.top_k).indices
        g = probs[t, chosen] / probs[t, chosen].sum()
        for e, w in zip(chosen.tolist(), g, strict=True):
            h = F.silu(x2[t] @ moe.w1[e]) * (x2[t] @ moe.w3[e])
            out[t] += w * (h @ moe.w2[e])
    return out.view(x.shape)


@pytest.mark.parametrize("dim,hidden", [(16, 32), (6, 10)], ids=["grouped_mm", "bmm-fallback"])
def test_moe_equals_the_per_token_computation_with_gradients(dim, hidden):
    torch.manual_seed(0)
    moe = MoE(dim, hidden, n_experts=4, top_k=2)
    x = torch.randn(3, 5, dim, requires_grad=True)
    got, want = moe(x), reference(moe, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(got)
    params = [x, moe.w1, moe.w3, moe.w2, moe.router.weight]
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_grouped_mm_handles_empty_groups_both_ways():
    torch.manual_seed(0)
    for k, n in ((8, 12), (6, 5)):  # aligned: torch._grouped_mm; not: the batched fallback
        x = torch.randn(9, k, requires_grad=True)
        w = torch.randn(4, k, n, requires_grad=True)
        counts = torch.tensor([0, 4, 0, 5])
        y = grouped_mm(x, w, counts)
        torch.testing.assert_close(y, torch.cat([x[:4] @ w[1], x[4:] @ w[3]]))
        y.sum().backward()
        assert w.grad[0].abs().max() == 0 and w.grad[2].abs().max() == 0 and w.grad[1].abs().max() > 0


def test_an_expert_no_token_chose_still_gets_a_zero_gradient():
    torch.manual_seed(0)
    moe = MoE(16, 32, n_experts=4, top_k=2)
    moe.expert_bias[3] = -100.0  # expert 3 is never chosen
    moe(torch.randn(2, 8, 16)).sum().backward()
    for p in (moe.w1, moe.w3, moe.w2):
        assert p.grad is not None and p.grad[3].abs().max() == 0 and p.grad[:3].abs().max() > 0


def test_capacity_drops_copies_beyond_it():
    torch.manual_seed(0)
    moe = MoE(16, 32, n_experts=4, top_k=1, capacity_factor=1.0).train()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0  # every token prefers expert 0
    x = torch.rand(1, 16, 16) + 0.5
    y = moe(x)
    # capacity = ceil(1.0 * 16 tokens * 1 / 4) = 4: 12 of the 16 copies are dropped,
    # and their tokens' outputs are zero.
    assert moe.dropped == 12
    assert (y[0].abs().sum(-1) > 0).sum() == 4
    assert (moe.eval()(x)[0].abs().sum(-1) > 0).sum() == 16  # inference drops nothing


def test_bias_balancing_evens_out_a_skewed_router():
    torch.manual_seed(0)
    moe = MoE(16, 32, n_experts=4, top_k=1).train()
    with torch.no_grad():
        moe.router.weight.normal_(std=0.3)
        moe.router.weight[0] += 0.5  # with positive inputs expert 0 wins almost every token
    loads = []
    with torch.no_grad():
        for _ in range(100):
            moe(torch.rand(8, 32, 16))
            load = moe.take_load()
            loads.append(float(load.max() / load.mean()))
            moe.balance(load, rate=0.05)
    assert loads[0] >= 3
    assert max(loads[-10:]) <= 1.5, loads[-10:]


def test_validation_loss_has_no_balance_term():
    from exaflop.lm.task import LMTask

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=2, vocab_size=64, seq_len=16, n_experts=4, top_k=2,
                      moe_aux_coef=0.5)
    model = LM(cfg).eval()
    task = LMTask.__new__(LMTask)
    task.mcfg = cfg
    x = torch.randint(0, 64, (2, 17))
    batch = {"input": x[:, :-1], "target": x[:, 1:]}
    ce = F.cross_entropy(model(batch["input"])[0].reshape(-1, 64), batch["target"].reshape(-1))
    model.train()
    loss, metrics = task.loss(model, batch)
    assert metrics["aux_loss"] > 0 and loss.item() == pytest.approx(metrics["ce_loss"] + metrics["aux_loss"])
    assert metrics["ce_loss"] == pytest.approx(ce.item(), rel=1e-5)  # training logs the CE itself
    model.eval()
    _, val = model(batch["input"], batch["target"])
    assert val.item() == pytest.approx(ce.item(), rel=1e-6)  # what evaluate() averages
