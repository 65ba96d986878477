"""The process layout: how `parallel.*` in the config splits the world into a DeviceMesh.

    world = dp_replicate × dp_shard × tp        (tp innermost: its ranks are neighbours)

`dp_replicate` ranks hold full copies (DDP, or the replicate dim of HSDP),
`dp_shard` ranks split parameters, gradients and optimizer state (FSDP2), and
`tp` ranks split each matmul (tensor parallel). Ranks that differ only in their
tp coordinate read the same samples, so the data stream sees
dp_replicate × dp_shard data-parallel ranks.

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

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def dp_rank(self, rank: int) -> int:
        """Index of `rank` among the data-parallel ranks (tp is the innermost mesh dim)."""
        return rank // self.tp

    def describe(self) -> str:
        parts = [f"{self.wrap}" if self.wrap != "none" else "no data-parallel wrapper",
                 f"dp_replicate={self.dp_replicate}", f"dp_shard={self.dp_shard}", f"tp={self.tp}"]
        if self.ep > 1:
            parts.append(f"ep={self.ep}")
        return f"{self.world} ranks: " + ", ".join(parts)


def resolve_layout(par, world: int) -> Layout:
    """Fill in `dp_shard = -1` and pick the wrapper; refuse layouts that do not multiply to `world`."""
    rep, shard, tp, mode = par.dp_replicate, par.dp_shard, par.tp, par.mode
    fixed = rep * tp
    if world % fixed:
        raise UserError(f"parallel: dp_replicate={rep} × tp={tp} = {fixed} does not divide the world "
                        f"size {world}; choose values whose product divides {world}")
    if shard == -1:
        shard = world // fixed
        if mode == "ddp" and shard > 1:  # plain DDP: the leftover ranks replicate, they do not shard
            rep, shard = rep * shard, 1
    if rep * shard * tp != world:
        raise UserError(f"parallel: dp_replicate={rep} × dp_shard={shard} × tp={tp} = {rep * shard * tp} "
                        f"but the world size is {world}; make the product equal {world} "
                        "(or set parallel.dp_shard=-1 to use the rest)")
    if mode == "ddp" and shard > 1:
        raise UserError(f"parallel.mode=ddp cannot shard (dp_shard={shard}); set parallel.mode=fsdp "
                        "or parallel.dp_shard=1")
    if mode == "fsdp" or shard > 1:
        wrap: Wrap = "fsdp"
    elif rep > 1:
        # DDP cannot hold tensor-parallel DTensors; HSDP with a shard dim of 1 is the same
        # all-reduce of gradients, so use that when tp is on.
        wrap = "fsdp" if tp > 1 else "ddp"
    else:
        wrap = "none"
    ep = par.ep
    if (rep * shard) % ep:
        raise UserError(f"parallel.ep={ep} does not divide the {rep * shard} data-parallel ranks "
                        f"(dp_replicate={rep} × dp_shard={shard}); pick an ep that divides {rep * shard}")
    return Layout(world, rep, shard, tp, wrap, ep)


def build_mesh(layout: Layout, device_type: str):
    """A 3-D DeviceMesh named (dp_replicate, dp_shard, tp); None for a single process."""
    if layout.world == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (layout.dp_replicate, layout.dp_shard, layout.tp),
                            mesh_dim_names=("dp_replicate", "dp_shard", "tp"))


def build_expert_mesh(layout: Layout, device_type: str):
    """The (edp, ep, tp) DeviceMesh over the same ranks, or None without expert parallelism.
    Row-major like the first, so a rank's dp index is edp_index × ep + ep_index."""
    if layout.ep == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (layout.dp // layout.ep, layout.ep, layout.tp),
                            mesh_dim_names=("edp", "ep", "tp"))
