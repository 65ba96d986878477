"""Collective times on a two-level network: a fast scale-up domain, a slower scale-out fabric.

Ranks are laid out with tensor parallel innermost, then context, data, and pipeline
outermost (Megatron's order), so a group is described by its size and its stride
(the product of the dimensions inside it). A group whose members share a scale-up
domain talks over NVLink/ICI; one that spans domains runs hierarchically: reduce
inside each domain, then across domains on each accelerator's own NIC with 1/k of
the data, where k members share a domain. Beyond `pod_size` accelerators the top
network tier is oversubscribed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from exaflop.plan.catalog import Network


@dataclass(frozen=True)
class Fabric:
    net: Network
    net_eff: float

    @property
    def up_bps(self) -> float:  # bytes/s per accelerator per direction inside the domain
        return self.net.scaleup_gbps_per_dir * 1e9 * self.net_eff

    def out_bps(self, span: int) -> float:
        """Scale-out bytes/s per accelerator for a group spanning `span` consecutive ranks."""
        bps = self.net.scaleout_gbit_per_accel / 8 * 1e9 * self.net_eff
        if span > self.net.pod_size:
            bps /= max(self.net.oversubscription, 1.0)
        return bps

    def split(self, size: int, stride: int) -> tuple[int, int]:
        """(members per domain, number of domains) for a group of `size` with `stride`."""
        domain = max(self.net.scaleup_domain, 1)
        if stride >= domain:
            return 1, size
        k = min(size, domain // stride)
        return k, math.ceil(size / k)

    def latency(self, size: int) -> float:
        # Tree/ring-hybrid algorithms pay a latency that grows like log2 of the group.
        return 2 * math.log2(size) * self.net.latency_us * 1e-6

    def all_reduce(self, nbytes: float, size: int, stride: int) -> float:
        if size <= 1 or nbytes <= 0:
            return 0.0
        k, outer = self.split(size, stride)
        t = self.latency(size)
        if k > 1:
            t += 2 * (k - 1) / k * nbytes / self.up_bps
        if outer > 1:
            t += 2 * (outer - 1) / outer * (nbytes / k) / self.out_bps(size * stride)
        return t

    def reduce_scatter(self, nbytes: float, size: int, stride: int) -> float:
        """Reduce-scatter (or all-gather) of a full buffer of `nbytes`: half an all-reduce."""
        return self.all_reduce(nbytes, size, stride) / 2

    def all_to_all(self, nbytes: float, size: int, stride: int) -> float:
        """Each rank sends `nbytes` spread evenly over the group."""
        if size <= 1 or nbytes <= 0:
            return 0.0
        k, _ = self.split(size, stride)
        inside = nbytes * (k - 1) / size
        outside = nbytes * (size - k) / size
        t_out = outside / self.out_bps(size * stride) if outside else 0.0
        return self.latency(size) + max(inside / self.up_bps, t_out)

    def node_limited_all_to_all(self, nbytes: float, size: int, stride: int, top_k: int, node_limit: int) -> float:
        """An expert dispatch that sends each token once per destination node (at most
        `node_limit` of them) and fans it out to its experts inside the node: of `nbytes`
        (top_k copies of every token) only min(top_k, nodes, limit) / top_k crosses the network."""
        if size <= 1 or nbytes <= 0:
            return 0.0
        k, domains = self.split(size, stride)
        if domains <= 1:
            return self.all_to_all(nbytes, size, stride)
        remote = min(top_k, node_limit, domains - 1)
        outside = nbytes * remote / top_k
        inside = nbytes * (k - 1) / size
        return self.latency(size) + max(inside / self.up_bps, outside / self.out_bps(size * stride))

    def p2p(self, nbytes: float, stride: int) -> float:
        """Send to the rank `stride` away (pipeline neighbours)."""
        if nbytes <= 0:
            return 0.0
        inside = stride < self.net.scaleup_domain
        bps = self.up_bps if inside else self.out_bps(2 * stride)
        return self.net.latency_us * 1e-6 + nbytes / bps
