"""Known effects of parallel plans that any credible cost model must reproduce."""

from __future__ import annotations

from exaflop.plan.cost import SOFTWARE, Job, Plan, step_cost


def job(catalog, model: str = "gpt3-175b", batch: int = 512, accel: str = "a100-80gb") -> Job:
    m = catalog.model(model)
    a = catalog.accelerator(accel)
    return Job(m, a, catalog.default_network(a), batch, m.seq_len, SOFTWARE["modern"])


def test_pp_bubble_shrinks_with_more_micro_batches(catalog):
    j = job(catalog)
    plan = Plan(tp=8, pp=8, dp=1, micro_batch=1, recompute="full")
    shares = [step_cost(j, plan, m).breakdown["pp_bubble"] / step_cost(j, plan, m).step_s for m in (8, 32, 128)]
    assert shares[0] > shares[1] > shares[2]
    assert abs(shares[0] - 7 / (8 + 7)) < 0.02  # (p-1)/(m+p-1) for 1F1B


def test_interleaving_shrinks_the_bubble(catalog):
    j = job(catalog)
    plain = step_cost(j, Plan(tp=8, pp=8, dp=1, vp=1, recompute="full"), 16)
    inter = step_cost(j, Plan(tp=8, pp=8, dp=1, vp=4, recompute="full"), 16)
    assert inter.breakdown["pp_bubble"] < plain.breakdown["pp_bubble"] / 3


def test_tp_beyond_scale_up_domain_is_slower(catalog):
    j = job(catalog)  # A100: 8 GPUs per NVLink domain; same 128 GPUs, same work per step
    inside = step_cost(j, Plan(tp=8, pp=8, dp=2, recompute="full"))
    across = step_cost(j, Plan(tp=16, pp=8, dp=1, recompute="full"))
    # Twice the micro-batches per replica, and each all-reduce now also crosses the NICs.
    assert across.breakdown["tp_comm"] > 3 * inside.breakdown["tp_comm"]
    assert across.step_s > 1.1 * inside.step_s


def test_recompute_trades_time_for_memory(catalog):
    j = job(catalog)
    costs = {r: step_cost(j, Plan(tp=8, pp=8, dp=1, recompute=r), 64) for r in ("none", "full")}
    assert costs["full"].step_s > costs["none"].step_s
    assert costs["full"].memory["activations"] < costs["none"].memory["activations"] / 5


def test_expert_parallel_shards_expert_weights(catalog):
    j = job(catalog, "grok-1", batch=256, accel="h100-sxm")
    one = step_cost(j, Plan(tp=8, pp=4, dp=8, ep=1, zero_stage=1))
    eight = step_cost(j, Plan(tp=8, pp=4, dp=8, ep=8, zero_stage=1))
    assert eight.memory["weights"] < one.memory["weights"] / 3
    assert eight.breakdown["ep_comm"] > 0 == one.breakdown["ep_comm"]
