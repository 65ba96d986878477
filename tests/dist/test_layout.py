"""Layout arithmetic and refusals: no processes needed."""

from __future__ import annotations

import re

import pytest

from exaflop.config import ParallelConfig, load_config
from exaflop.engine.mesh import resolve_layout
from exaflop.errors import UserError


def layout(world, **kw):
    return resolve_layout(ParallelConfig(**kw), world)


def test_defaults_and_wrappers():
    assert layout(1).wrap == "none"
    two = layout(2)
    assert (two.dp_replicate, two.dp_shard, two.tp, two.wrap) == (1, 2, 1, "fsdp")
    assert layout(4, mode="ddp").dp_replicate == 4 and layout(4, mode="ddp").wrap == "ddp"
    hsdp = layout(8, dp_replicate=2, tp=2)
    assert (hsdp.dp_shard, hsdp.dp, hsdp.wrap) == (2, 4, "fsdp")
    assert [hsdp.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert layout(2, tp=2).wrap == "none"  # tensor parallel alone needs no data-parallel wrapper
    assert layout(4, dp_replicate=2, tp=2).wrap == "fsdp"  # DDP cannot hold DTensors: HSDP(shard=1)


@pytest.mark.parametrize("world,kw,needle", [
    (6, {"tp": 4}, "tp=4 = 4 does not divide the world size 6"),
    (4, {"dp_replicate": 3}, "dp_replicate=3 × tp=1 = 3 does not divide the world size 4"),
    (8, {"dp_shard": 3}, "dp_shard=3 × tp=1 = 3 but the world size is 8"),
    (2, {"mode": "ddp", "dp_shard": 2}, "parallel.mode=ddp cannot shard (dp_shard=2)"),
    (4, {"tp": 2, "ep": 4}, "parallel.ep=4 does not divide the 2 data-parallel ranks"),
    (6, {"ep": 4}, "parallel.ep=4 does not divide the 6 data-parallel ranks"),
])
def test_non_dividing_layouts_are_refused(world, kw, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        layout(world, **kw)


def test_tp_must_divide_heads_and_sequence():
    from exaflop.lm.parallel_plan import check_tp

    model = load_config("lm-tiny").model  # 4 heads, 2 kv heads, seq 256
    check_tp(model, 2, True)
    with pytest.raises(UserError, match="parallel.tp=4 does not divide model.n_kv_head=2"):
        check_tp(model, 4, True)
    odd = load_config("lm-tiny", ["model.seq_len=255"]).model
    with pytest.raises(UserError, match="model.seq_len=255.*sequence_parallel=false"):
        check_tp(odd, 2, True)
    check_tp(odd, 2, False)


def test_expert_parallel_layouts():
    hybrid = layout(8, tp=2, ep=2)  # 4 dp ranks: 2 ep groups of 2, each expert half on 2 replicas
    assert (hybrid.dp, hybrid.ep, hybrid.wrap) == (4, 2, "fsdp") and "ep=2" in hybrid.describe()
    assert layout(4, mode="ddp", ep=4).wrap == "ddp"


def test_expert_parallel_must_divide_the_experts():
    from exaflop.lm.parallel_plan import check_ep

    check_ep(load_config("lm-moe-tiny").model, 4)  # 8 experts
    with pytest.raises(UserError, match=re.escape("parallel.ep=4 does not divide model.n_experts=6")):
        check_ep(load_config("lm-moe-tiny", ["model.n_experts=6"]).model, 4)
    with pytest.raises(UserError, match=re.escape("parallel.ep=2: the model has no experts")):
        check_ep(load_config("lm-tiny").model, 2)


def test_pipeline_layouts():
    pp = layout(8, pp=2, tp=2)  # stages outermost: ranks 0-3 run stage 0, 4-7 stage 1
    assert (pp.dp, pp.pp, pp.wrap) == (2, 2, "fsdp") and "pp=2" in pp.describe()
    assert [pp.stage_of(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [pp.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]  # stages read the same samples
    assert layout(2, pp=2).wrap == "none"
    assert layout(4, pp=2, dp_replicate=2, dp_shard=1).wrap == "fsdp"  # HSDP replicas: DDP cannot pipeline


@pytest.mark.parametrize("world,kw,needle", [
    (6, {"pp": 4}, "dp_replicate=1 × tp=1 × pp=4 = 4 does not divide the world size 6"),
    (4, {"pp": 2, "ep": 2}, "parallel.pp=2 with parallel.ep=2: pipeline and expert parallel do not compose"),
    (4, {"pp": 2, "mode": "ddp"}, "parallel.mode=ddp cannot run a pipeline"),
])
def test_non_dividing_pipeline_layouts_are_refused(world, kw, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        layout(world, **kw)


def test_stages_balance_matmul_cost_counting_the_head():
    from exaflop.lm.parallel_plan import stage_layers, stage_split

    even = load_config("lm-tiny", ["model.n_layer=4", "model.vocab_size=64"]).model  # head ~ free
    assert stage_layers(even, 2) == [range(0, 2), range(2, 4)]
    # A large vocabulary makes the head worth more than a block: the last stage gets fewer layers.
    heavy = load_config("lm-tiny", ["model.n_layer=4", "model.vocab_size=32768"]).model
    assert stage_layers(heavy, 2) == [range(0, 3), range(3, 4)]
    big = load_config("lm-124m").model  # 12 layers, vocab 50304: the head costs ~3.5 blocks
    assert [len(r) for r in stage_layers(big, 4)] == [3, 4, 4, 1]
    assert [len(r) for r in stage_layers(big, 2)] == [8, 4]
    # Interleaved, 2 ranks x 2 stages (rank 0: stages 0 and 2, rank 1: 1 and 3 + the head):
    # the ranks' loads are balanced, not the stages (3+4+4+1 would load rank 1 with 5 + head).
    assert [len(r) for r in stage_layers(big, 4, ranks=2)] == [3, 3, 5, 1]
    _, shares = stage_split(big, 4, ranks=2)
    assert max(shares[0] + shares[2], shares[1] + shares[3]) < 0.52
    with pytest.raises(UserError, match=re.escape("parallel.pp=8 exceeds model.n_layer=4")):
        stage_layers(even, 8)


def test_a_pipeline_step_gets_at_least_pp_micro_batches():
    from exaflop.engine.pipeline import pipeline_micro_batch as _pipeline_micro

    assert _pipeline_micro(16, 16, 2) == 8  # lm-tiny's one micro-batch of 16 becomes two of 8
    assert _pipeline_micro(8, 2, 2) == 2  # already 4 micro-batches: unchanged
    assert _pipeline_micro(12, 5, 4) == 3  # largest size <= 5 that divides 12 into >= 4
    assert _pipeline_micro(1, 1, 2) == 1  # smaller than pp: left to the schedule's own check
