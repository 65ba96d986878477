"""How the language model splits for the engine's parallel layouts (see engine/parallel.py).

Tensor parallel, Megatron style: q/k/v and the MLP's gate/up projections are split
by output features (column-wise: each rank owns whole heads / a slice of the
hidden units), the attention output and MLP down projections by input features
(row-wise), so each sub-layer needs one reduction. With sequence parallelism the
norms and residual stream between sub-layers hold 1/tp of the sequence each
(reduce-scatter + all-gather instead of an all-reduce: same traffic, 1/tp of the
activation memory). Embedding, final norm and LM head stay replicated: the head is
tied to the embedding, and the two would need opposite splits.
"""

from __future__ import annotations

import inspect
import types

import torch.nn.functional as F
from torch import Tensor, nn

from exaflop.errors import UserError
from exaflop.nn import Block


def blocks(model: nn.Module) -> list[nn.Module]:
    # A pipeline stage holds its blocks in a ModuleDict keyed by their global index.
    b = model.blocks
    return list(b.values()) if isinstance(b, nn.ModuleDict) else list(b)


# -- pipeline stages (engine/pipeline.py) ---------------------------------------------

def stage_layers(cfg, n_stages: int, ranks: int = 0) -> list[range]:
    """Consecutive layers per stage (see stage_split)."""
    return stage_split(cfg, n_stages, ranks)[0]


def stage_split(cfg, n_stages: int, ranks: int = 0) -> tuple[list[range], list[float]]:
    """Consecutive layers per stage, and each stage's share of the FLOPs, balancing each stage's matmul FLOPs per token: the blocks
    (attention projections and scores, MLP; MoE: the active experts), with the LM head's
    2·C·V counted on the last stage (the embedding lookup has no matmul). Among the splits
    with the smallest maximum, the most even.

    Interleaved (`ranks` pipeline ranks holding n_stages / ranks stages each, rank r stages
    r, r + ranks, ...): a step takes m micro-batches of the busiest rank's load plus
    ranks - 1 fill/drain slots of one stage, so the busiest rank's sum comes first, then the
    largest stage. (lm-124m, 2 ranks x 2: 4+3+4+1 layers, ranks 8 and 4 + head, instead of
    the per-stage optimum 3+4+4+1 whose second rank carries 8 + head.)"""
    L = cfg.n_layer
    if n_stages > L:
        raise UserError(f"parallel.pp={n_stages} exceeds model.n_layer={L}; each stage needs a layer "
                        "(interleaved: parallel.pp × parallel.pp_virtual stages)")
    C, kv = cfg.d_model, cfg.n_kv_head * cfg.head_dim
    block = 2 * C * (2 * C + 2 * kv) + 4 * cfg.seq_len * C + 6 * C * cfg.d_ff * max(1, cfg.top_k if cfg.n_experts > 1 else 1)
    head = 2 * C * cfg.vocab_size
    # Smallest maximum stage cost first, then the most even spread (sum of squares).
    best: tuple[tuple[float, ...], list[int]] | None = None

    per_rank = ranks if 0 < ranks < n_stages else 0

    def search(start: int, left: int, cuts: list[int], costs: list[float]) -> None:
        nonlocal best
        if left == 1:
            done = [*costs, (L - start) * block + head]
            key = (max(done), sum(c * c for c in done))
            if per_rank:
                loads = [sum(done[r::per_rank]) for r in range(per_rank)]
                key = (max(loads), max(done), sum(x * x for x in loads))
            if best is None or key < best[0]:
                best = (key, [*cuts, L])
            return
        for end in range(start + 1, L - left + 2):
            search(end, left - 1, [*cuts, end], [*costs, (end - start) * block])

    search(0, n_stages, [], [])
    assert best is not None
    bounds = [0, *best[1]]
    stages = [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
    costs = [len(r) * block for r in stages]
    costs[-1] += head
    return stages, [c / sum(costs) for c in costs]


def split_stage(model: nn.Module, stage: int, n_stages: int, ranks: int = 0) -> list[str]:
    """Keep only stage `stage`'s part of the LM, under the unsplit model's parameter names.

    The blocks become a ModuleDict keyed by their global index ("blocks.3.attn.wq.weight"
    stays that), the embedding lives on the first stage, the final norm and LM head on the
    last; with tied embeddings the last stage keeps `tok_emb` too (the head's weight is it),
    and that weight's name is returned for the engine to keep it equal on both."""
    if getattr(model.cfg, "n_experts", 1) > 1:
        raise UserError("parallel.pp > 1 with a mixture-of-experts model (model.n_experts > 1) is not "
                        "supported yet; set parallel.pp=1 (expert parallel: parallel.ep)")
    layers = stage_layers(model.cfg, n_stages, ranks)[stage]
    first, last = stage == 0, stage == n_stages - 1
    model.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
    tied = model.cfg.tie_embeddings
    if not first and not (last and tied):
        model.tok_emb = None
    if not last:
        model.norm = None
        model.lm_head = None
    model.pp_first, model.pp_last = first, last
    model.forward = types.MethodType(_stage_forward, model)
    return ["tok_emb.weight"] if tied and n_stages > 1 and (first or last) else []


def _stage_forward(self, x: Tensor) -> Tensor:
    """A stage's forward: token ids (first stage) or hidden states in, hidden states or
    fp32 logits (last stage) out."""
    if self.pp_first:
        x = self.tok_emb(x)
    # Under sequence parallelism a later stage receives its peer's part of the sequence.
    T = x.shape[1] * (1 if self.pp_first else getattr(self, "seq_shards", 1))
    rope = (self.rope_cos[:T], self.rope_sin[:T])
    for block in self.blocks.values():
        x = block(x, rope, None)
    if self.pp_last:
        return self.lm_head(self.norm(x)).float()
    return x


def pipeline_loss(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))


def check_tp(cfg, tp: int, sequence_parallel: bool) -> None:
    """Refuse splits that do not divide, naming the numbers."""
    need = {"model.n_head": cfg.n_head, "model.n_kv_head": cfg.n_kv_head, "model.d_ff": cfg.d_ff}
    if sequence_parallel:
        need["model.seq_len"] = cfg.seq_len
    for field, value in need.items():
        if value % tp:
            hint = " or set parallel.sequence_parallel=false" if field == "model.seq_len" else ""
            raise UserError(f"parallel.tp={tp} does not divide {field}={value}; pick a tp that "
                            f"divides it{hint}")


# The tensor-parallel split of each stacked expert weight: gate/up (E, C, F) by hidden
# units, down (E, F, C) by its input.
_EXPERT_TP_DIM = {"w1": 2, "w3": 2, "w2": 1}


def check_ep(cfg, ep: int) -> None:
    n = cfg.n_experts
    if n == 1:
        raise UserError(f"parallel.ep={ep}: the model has no experts (model.n_experts=1); set parallel.ep=1")
    if n % ep:
        raise UserError(f"parallel.ep={ep} does not divide model.n_experts={n}; pick an ep that divides {n}")


def apply_ep(model: nn.Module, mesh) -> list[nn.Parameter]:
    """Split every MoE layer's experts over the mesh's `ep` dim (Shard(0) of the stacked
    weights; with a `tp` dim too, each also splits like apply_tp's). Returns the expert
    parameters, which the engine keeps out of DDP/FSDP and reduces itself."""
    from torch.distributed.tensor import Shard, distribute_tensor

    names = mesh.mesh_dim_names
    check_ep(model.cfg, mesh["ep"].size())
    out = []
    for block in model.blocks:
        mlp = block.mlp
        mlp.ep_group = mesh["ep"].get_group()
        for name, dim in _EXPERT_TP_DIM.items():
            placements = [Shard(0)] + ([Shard(dim)] if "tp" in names else [])
            p = nn.Parameter(distribute_tensor(getattr(mlp, name).data, mesh, placements))
            setattr(mlp, name, p)
            out.append(p)
    return out


def apply_tp(model: nn.Module, tp_mesh, sequence_parallel: bool) -> None:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleInputOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    check_tp(model.cfg, tp_mesh.size(), sequence_parallel)
    sp = sequence_parallel
    model.seq_shards = tp_mesh.size() if sp else 1
    # After each sub-layer: reduce-scatter to this rank's sequence part (SP) or all-reduce.
    between = Shard(1) if sp else Replicate()
    # Layouts for Block.forward's arguments after x (rope, kv): plain values, left alone.
    rest = (None,) * (len(inspect.signature(Block.forward).parameters) - 2)
    for block in blocks(model):
        plan: dict = {
            "attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=between),
        }
        moe = hasattr(block.mlp, "expert_bias")
        if moe:
            # Stacked experts split like the dense MLP, all at once: gate/up by their hidden
            # units (Shard(2) of (E, C, F)), down by its input (Shard(1) of (E, F, C)). The
            # MoE computes on the local shards and reduces its output itself (nn/moe.py): one
            # all-reduce for all experts, not one per expert. Routing runs on the full
            # tokens with the replicated router on every rank.
            mlp = block.mlp
            mlp.tp_group = tp_mesh.get_group()
            for name, dim in _EXPERT_TP_DIM.items():
                p = getattr(mlp, name)
                if mlp.ep_group is None:  # under expert parallel, apply_ep has placed them
                    setattr(mlp, name, nn.Parameter(distribute_tensor(p.data, tp_mesh, [Shard(dim)])))
            if sp:  # gather the sequence in, keep this rank's part of the (replicated) result out
                plan["mlp"] = PrepareModuleInputOutput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
                    output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),), use_local_output=True)
        else:
            plan.update({"mlp.w1": ColwiseParallel(), "mlp.w3": ColwiseParallel(),
                         "mlp.w2": RowwiseParallel(output_layouts=between)})
        if sp:
            plan.update({
                "attn_norm": SequenceParallel(), "mlp_norm": SequenceParallel(),
                "attn": PrepareModuleInput(input_layouts=(Shard(1), *rest),
                                           desired_input_layouts=(Replicate(), *rest)),
            })
            if not moe:
                plan["mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        parallelize_module(block, tp_mesh, plan)
    if sp:
        # The residual stream is a plain tensor holding this rank's part of the sequence. The
        # embedding output is the full sequence on every rank: the first block keeps its part.
        # (A pipeline stage after the first receives its part from the previous stage's peer.)
        first = blocks(model)[0]
        if getattr(model, "pp_first", True):
            parallelize_module(first, tp_mesh, PrepareModuleInput(
                input_layouts=(Replicate(), *rest), desired_input_layouts=(Shard(1), *rest),
                use_local_output=True))
        # ...and the last hands the full sequence to the replicated final norm and LM head.
        if model.norm is not None:
            parallelize_module(model.norm, tp_mesh, PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True))

