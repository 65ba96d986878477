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

from torch import nn

from exaflop.errors import UserError
from exaflop.nn import Block


def blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.blocks)


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
    # After each sub-layer: reduce-scatter to this rank's sequence part (SP) or all-reduce.
    between = Shard(1) if sp else Replicate()
    # Layouts for Block.forward's arguments after x (rope, kv): plain values, left alone.
    rest = (None,) * (len(inspect.signature(Block.forward).parameters) - 2)
    for block in model.blocks:
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
        parallelize_module(model.blocks[0], tp_mesh, PrepareModuleInput(
            input_layouts=(Replicate(), *rest), desired_input_layouts=(Shard(1), *rest),
            use_local_output=True))
        # ...and the last hands the full sequence to the replicated final norm and LM head.
        parallelize_module(model.norm, tp_mesh, PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True))

