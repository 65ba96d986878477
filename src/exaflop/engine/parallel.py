"""Wrap a model for the process layout in the config (single process: unchanged).

Order matters and follows what the torch.distributed composable APIs expect:
tensor parallel first (it turns weights into DTensors on the tp mesh), then
activation checkpointing inside each block, then FSDP2 per block and at the root
(it shards those DTensors again over the data-parallel mesh), or DDP.

What a block is and how its matmuls split is task knowledge: the engine asks the
task object (engine/task.py's optional methods) for

    blocks(model) -> list[nn.Module]                 # repeated units: FSDP + checkpointing
    apply_tp(model, tp_mesh, sequence_parallel)      # parallelize_module with its plan
    apply_ep(model, mesh) -> list[nn.Parameter]      # split experts over mesh["ep"] (and "tp")

so the engine itself never learns what attention or a token is. Expert-parallel
parameters are kept out of DDP/FSDP (their gradients are already sums over the ep group,
from the all-to-all's backward); `ExpertGrads` finishes their reduction over the ranks
holding the same experts.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from exaflop.engine.mesh import Layout, build_expert_mesh, build_mesh, resolve_layout
from exaflop.engine.runtime import Runtime
from exaflop.errors import UserError


def data_parallel_size(cfg, rt: Runtime) -> tuple[int, int]:
    """(dp world size, this rank's dp index): ranks that consume different samples."""
    layout = resolve_layout(cfg.parallel, rt.world)
    return layout.dp, layout.dp_rank(rt.rank)


def model_blocks(model: nn.Module, task, cfg) -> list[nn.Module]:
    fn = getattr(task, "blocks", None)
    if fn is not None:
        return list(fn(model))
    for attr in ("blocks", "layers"):  # the common convention, so a new task works unchanged
        mods = getattr(model, attr, None)
        if isinstance(mods, nn.ModuleList):
            return list(mods)
    return []


def parallelize(model: nn.Module, task, cfg, rt: Runtime) -> nn.Module:
    par = cfg.parallel
    layout = resolve_layout(par, rt.world)
    rt.layout = layout
    model.to(rt.device)
    if layout.pp > 1:  # first: everything below applies to this rank's stage(s) only
        model = split_stages(model, task, cfg, layout, rt)
    # The modules a pipeline stage runs (several under the interleaved schedule): TP and the
    # FSDP root apply to each, since each is called on its own.
    roots = rt.pp_chunks or [model]
    blocks = model_blocks(model, task, cfg)
    if par.activation_checkpoint != "none":
        if not blocks:
            raise UserError(f"parallel.activation_checkpoint={par.activation_checkpoint}: task "
                            f"{cfg.task!r} exposes no blocks; set it to none")
        for b in blocks:
            checkpoint_block(b, par.activation_checkpoint)
    if layout.world == 1:
        return model
    mesh = build_mesh(layout, rt.device.type)
    rt.mesh = mesh
    if layout.tp > 1:
        apply_tp = getattr(task, "apply_tp", None)
        if apply_tp is None:
            raise UserError(f"parallel.tp={layout.tp}: task {cfg.task!r} has no tensor-parallel plan "
                            "(its task object has no apply_tp); set parallel.tp=1")
    expert: list[nn.Parameter] = []
    if layout.ep > 1:  # before tp: the expert weights take their (ep, tp) placements at once
        apply_ep = getattr(task, "apply_ep", None)
        if apply_ep is None:
            raise UserError(f"parallel.ep={layout.ep}: task {cfg.task!r} has no experts to split "
                            "(its task object has no apply_ep); set parallel.ep=1")
        emesh = build_expert_mesh(layout, rt.device.type)
        expert = apply_ep(model, emesh["ep", "tp"] if layout.tp > 1 else emesh["ep"])
        edp = emesh["edp"].get_group() if layout.dp > layout.ep else None
        rt.expert_grads = ExpertGrads(expert, edp, layout.dp)
    if layout.tp > 1:
        apply_tp = getattr(task, "apply_tp", None)
        if apply_tp is None:
            raise UserError(f"parallel.tp={layout.tp}: task {cfg.task!r} has no tensor-parallel plan "
                            "(its task object has no apply_tp); set parallel.tp=1")
        for root in roots:
            apply_tp(root, mesh["tp"], par.sequence_parallel)
    if layout.wrap == "ddp":
        if expert:
            ids = {id(p) for p in expert}
            DDP._set_params_and_buffers_to_ignore_for_model(
                model, [n for n, p in model.named_parameters() if id(p) in ids])
        return DDP(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    if layout.wrap == "fsdp":
        _fully_shard(roots, blocks, layout, mesh, rt, set(expert))
    return model


def split_stages(model: nn.Module, task, cfg, layout: Layout, rt: Runtime) -> nn.Module:
    """This rank's pipeline stage(s) of `model` (task.split_stage prunes a model to one stage).

    One stage: the pruned model itself. Interleaved (several stages per rank): one pruned
    shallow copy per stage, each run by its own PipelineStage, and a `StageChunks` module
    holding all their weights under the unsplit model's names, which the optimizer, gradient
    clipping and checkpoints see (so checkpoints reshard across schedules and degrees)."""
    split = getattr(task, "split_stage", None)
    if split is None:
        raise UserError(f"parallel.pp={layout.pp}: task {cfg.task!r} cannot be split into pipeline "
                        "stages (its task object has no split_stage); set parallel.pp=1")
    stages = layout.stages_of(rt.rank)
    if len(stages) == 1:
        rt.pp_tied = split(model, stages[0], layout.n_stages)
        rt.pp_chunks = [model]
        return model
    chunks = [_shallow_copy(model) for _ in stages]
    tied = [split(c, s, layout.n_stages, ranks=layout.pp) for c, s in zip(chunks, stages, strict=True)]
    rt.pp_tied = sorted({n for t in tied for n in t})
    rt.pp_chunks = chunks
    return StageChunks(chunks)


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A module object sharing `module`'s submodules, parameters and buffers, whose own child
    registrations (and forward) can change without touching the original."""
    c = copy.copy(module)
    for attr in ("_modules", "_parameters", "_buffers"):
        object.__setattr__(c, attr, dict(getattr(module, attr)))
    c._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    return c


class StageChunks(nn.Module):
    """A rank's stages under the interleaved schedule, as one module for the optimizer, the
    gradient clip and checkpoints. It registers the stages' own children (module dicts such as
    the blocks keyed by global index are merged), so parameter names are the unsplit model's.
    Its forward is never called: each stage runs on its own."""

    def __init__(self, chunks: list[nn.Module]):
        super().__init__()
        self.cfg = getattr(chunks[0], "cfg", None)
        for c in chunks:
            for name, child in c.named_children():
                if isinstance(child, nn.ModuleDict):
                    if name not in self._modules:
                        self.add_module(name, nn.ModuleDict())
                    self._modules[name].update(child)
                elif name not in self._modules:
                    self.add_module(name, child)

    def forward(self, *args, **kwargs):
        raise RuntimeError("StageChunks holds interleaved pipeline stages; run them through engine/pipeline.py")


@dataclass
class ExpertGrads:
    """Gradients of expert-parallel parameters. After backward each rank's expert gradient is
    already the sum over its ep group's tokens (the dispatch all-to-all carries it back); the
    sum over the `edp` replicas of the same experts completes the global batch, and dividing
    by the data-parallel size makes it the same mean DDP/FSDP take for every other weight."""

    params: list[nn.Parameter]
    group: Any  # the edp process group, None when every dp rank is in one ep group
    dp: int

    @torch.no_grad()
    def reduce(self) -> None:
        grads = [local_tensor(p.grad) for p in self.params if p.grad is not None]
        if self.group is not None:
            flat = torch.cat([g.flatten() for g in grads])  # one collective, not one per weight
            torch.distributed.all_reduce(flat, group=self.group)
            torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)])
        torch._foreach_div_(grads, float(self.dp))


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: in-place changes reach it); a plain tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _fully_shard(roots: list[nn.Module], blocks: list[nn.Module], layout: Layout, mesh, rt: Runtime,
                 ignored: set[nn.Parameter]) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # HSDP when there is a replicate dim: shard inside a group, all-reduce across groups.
    dp_mesh = mesh["dp_replicate", "dp_shard"] if layout.dp_replicate > 1 else mesh["dp_shard"]
    if layout.pp > 1 and layout.dp == 1:
        return  # a pipeline alone: nothing to shard
    # bf16 compute with fp32 master weights (the sharded parameters stay fp32, so AdamW
    # updates fp32) and fp32 gradient reduction so the sum over many ranks does not lose bits.
    mp = MixedPrecisionPolicy(param_dtype=rt.dtype, reduce_dtype=torch.float32) if rt.dtype else None
    kw: dict[str, Any] = {"mesh": dp_mesh, "ignored_params": ignored}
    if mp is not None:
        kw["mp_policy"] = mp
    for i, b in enumerate(blocks):
        # The last block's parameters are needed again right away by backward: keep them.
        fully_shard(b, reshard_after_forward=i < len(blocks) - 1, **kw)
    for root in roots:  # the model, or each interleaved pipeline stage (each runs forward itself)
        fully_shard(root, reshard_after_forward=False, **kw)


# -- activation checkpointing ----------------------------------------------------------

_SAVE_OPS = {"mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_cudnn_attention", "linear"}


def _selective_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    # Matmul and attention outputs are expensive to recompute and cheap to keep relative to the
    # pointwise ops (norms, activations, rotary) around them, which are recomputed.
    name = getattr(op, "__name__", str(op)).split(".")[0]
    return CheckpointPolicy.MUST_SAVE if name in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_block(block: nn.Module, mode: str) -> None:
    """Recompute this block's activations in backward. Done by replacing `forward` on the
    instance (not by a wrapper module) so parameter names, and so checkpoints, do not change."""
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    inner = block.forward
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _selective_policy)

    def forward(*args, **kw):
        return checkpoint(inner, *args, **kwargs, **kw)

    block.forward = forward  # type: ignore[method-assign]


# -- gradient clipping across meshes ----------------------------------------------------

def clip_grad_norm(params: list[nn.Parameter], max_norm: float, group=None,
                   skip: set[int] | None = None) -> float:
    """Global L2 norm of the gradients (clipped to max_norm when > 0), for any mix of plain
    tensors and DTensors on different meshes (TP blocks next to replicated embeddings).

    Pipeline stages: `group` sums the squared norms of every stage, and `skip` (ids) leaves
    out a copy counted elsewhere (the tied embedding on the last stage); it is still clipped."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    total_sq = 0.0
    for ps in groups.values():
        grads = [p.grad for p in ps if not skip or id(p) not in skip]
        if not grads:
            continue
        n = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if hasattr(n, "full_tensor"):
            n = n.full_tensor()
        total_sq += float(n) ** 2
    if group is not None:
        t = torch.tensor([total_sq], dtype=torch.float64)
        torch.distributed.all_reduce(t, group=group)
        total_sq = float(t.item())
    total = math.sqrt(total_sq)
    if max_norm > 0 and math.isfinite(total):
        coef = max_norm / (total + 1e-6)
        if coef < 1:
            for ps in groups.values():
                torch._foreach_mul_([p.grad for p in ps], coef)
    return total


def set_grad_sync(model: nn.Module, sync: bool):
    """Context for one micro-batch: skip the gradient reduction on all but the last."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    if not sync and hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    return _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself under torch.compile and DDP wrappers (FSDP2 and TP keep the module)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    return model.module if isinstance(model, DDP) else model
