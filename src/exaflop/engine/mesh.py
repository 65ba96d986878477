"""The process layout: how `parallel.*` in the config splits the world into a DeviceMesh.

    world = pp × dp_replicate × dp_shard × tp   (tp innermost: its ranks are neighbours)

`dp_replicate` ranks hold full copies (DDP, or the replicate dim of HSDP),
`dp_shard` ranks split parameters, gradients and optimizer state (FSDP2), and
`tp` ranks split each matmul (tensor parallel). Ranks that differ only in their
tp coordinate read the same samples, so the data stream sees
dp_replicate × dp_shard data-parallel ranks. `pp` ranks hold consecutive pipeline stages
(outermost: a stage's data-parallel and tensor-parallel groups stay together); the ranks
of one pipeline read the same samples too.

Expert parallelism borrows from those data-parallel ranks (torchtitan's "dp2ep"): the
dp ranks are regrouped as edp × ep, consecutive dp ranks forming an `ep` group that
splits the experts between them, the `edp` ranks with the same ep coordinate holding
the same experts (their expert gradients are summed, like DDP's). A second mesh
(edp, ep, tp) over the same ranks names those groups; everything else uses the first.

Resolution is pure arithmetic (no process group), so it is testable anywhere and
the error for a layout that does not divide names the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from exaflop.errors import UserError

Wrap = Literal["none", "ddp", "fsdp"]


@dataclass(frozen=True)
class Layout:
    world: int
    dp_replicate: int
    dp_shard: int
    tp: int
    wrap: Wrap  # what wraps the model for data parallelism
    ep: int = 1  # expert-parallel degree, a divisor of dp
    pp: int = 1  # pipeline ranks
    pp_virtual: int = 1  # stages per pipeline rank (> 1: the interleaved schedule)

    def stage_of(self, rank: int) -> int:
        """The pipeline rank (position on the pp mesh dim, the outermost) of `rank`."""
        return rank // (self.dp * self.tp)

    @property
    def n_stages(self) -> int:
        return self.pp * self.pp_virtual

    def stages_of(self, rank: int) -> list[int]:
        """The stages `rank` runs: its pipeline position, plus pp, 2·pp, ... when interleaved."""
        first = self.stage_of(rank)
        return [first + k * self.pp for k in range(self.pp_virtual)]

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def dp_rank(self, rank: int) -> int:
        """Index of `rank` among the data-parallel ranks (tp innermost, pp outermost)."""
        return (rank // self.tp) % self.dp

    def describe(self) -> str:
        parts = [f"{self.wrap}" if self.wrap != "none" else "no data-parallel wrapper",
                 f"dp_replicate={self.dp_replicate}", f"dp_shard={self.dp_shard}", f"tp={self.tp}"]
        if self.ep > 1:
            parts.append(f"ep={self.ep}")
        if self.pp > 1:
            parts.append(f"pp={self.pp}" + (f" (interleaved, {self.pp_virtual} stages each)"
                                             if self.pp_virtual > 1 else ""))
        return f"{self.world} ranks: " + ", ".join(parts)


def resolve_layout(par, world: int) -> Layout:
    """Fill in `dp_shard = -1` and pick the wrapper; refuse layouts that do not multiply to `world`."""
    rep, shard, tp, mode, pp = par.dp_replicate, par.dp_shard, par.tp, par.mode, par.pp
    fixed = rep * tp * pp
    if world % fixed:
        what = f"dp_replicate={rep} × tp={tp}" + (f" × pp={pp}" if pp > 1 else "")
        raise UserError(f"parallel: {what} = {fixed} does not divide the world "
                        f"size {world}; choose values whose product divides {world}")
    if shard == -1:
        shard = world // fixed
        if mode == "ddp" and shard > 1:  # plain DDP: the leftover ranks replicate, they do not shard
            rep, shard = rep * shard, 1
    if rep * shard * tp * pp != world:
        what = f"dp_replicate={rep} × dp_shard={shard} × tp={tp}" + (f" × pp={pp}" if pp > 1 else "")
        raise UserError(f"parallel: {what} = {rep * shard * tp * pp} "
                        f"but the world size is {world}; make the product equal {world} "
                        "(or set parallel.dp_shard=-1 to use the rest)")
    if mode == "ddp" and shard > 1:
        raise UserError(f"parallel.mode=ddp cannot shard (dp_shard={shard}); set parallel.mode=fsdp "
                        "or parallel.dp_shard=1")
    if mode == "fsdp" or shard > 1:
        wrap: Wrap = "fsdp"
    elif rep > 1:
        # DDP cannot hold tensor-parallel DTensors, nor follow a pipeline schedule's many
        # forwards before backward; HSDP with a shard dim of 1 is the same all-reduce of
        # gradients, so use that when tp or pp is on.
        wrap = "fsdp" if tp > 1 or pp > 1 else "ddp"
    else:
        wrap = "none"
    ep = par.ep
    if (rep * shard) % ep:
        raise UserError(f"parallel.ep={ep} does not divide the {rep * shard} data-parallel ranks "
                        f"(dp_replicate={rep} × dp_shard={shard}); pick an ep that divides {rep * shard}")
    if pp > 1 and ep > 1:
        raise UserError(f"parallel.pp={pp} with parallel.ep={ep}: pipeline and expert parallel "
                        "do not compose yet; set one of them to 1")
    if pp > 1 and mode == "ddp" and rep > 1:
        raise UserError("parallel.mode=ddp cannot run a pipeline (pp > 1); set parallel.mode=auto "
                        "(HSDP replicas instead)")
    virtual = par.pp_virtual if pp > 1 and par.pp_schedule == "interleaved" else 1
    return Layout(world, rep, shard, tp, wrap, ep, pp, virtual)


def build_mesh(layout: Layout, device_type: str):
    """A 4-D DeviceMesh named (pp, dp_replicate, dp_shard, tp); None for a single process."""
    if layout.world == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (layout.pp, layout.dp_replicate, layout.dp_shard, layout.tp),
                            mesh_dim_names=("pp", "dp_replicate", "dp_shard", "tp"))


def build_expert_mesh(layout: Layout, device_type: str):
    """The (edp, ep, tp) DeviceMesh over the same ranks, or None without expert parallelism.
    Row-major like the first, so a rank's dp index is edp_index × ep + ep_index."""
    if layout.ep == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (layout.dp // layout.ep, layout.ep, layout.tp),
                            mesh_dim_names=("edp", "ep", "tp"))
