"""Shrink-and-continue: data-parallel replicas that lose a member re-form without it and go on.

`exaflop train CONFIG --nproc N --elastic` starts N worker processes itself (not torchrun,
whose agent stops every worker when one fails) around a TCP store that it owns, so the
store outlives any worker. Each generation of the group is a `PrefixStore("gen<g>")` of it.

When a collective fails because a peer is gone (gloo reports the closed connection at once;
a hung peer after `parallel.timeout_s`), each survivor destroys its process group, registers
for generation g+1 and waits until every member of generation g has either registered too or
been reported gone by the launcher (which watches its worker processes; a member that does
neither within 1.5 × `parallel.timeout_s` is dropped). Detection is immediate when the
collective a survivor waits in involves the dead rank's connection; a survivor waiting on
another survivor instead notices when its collective times out (`parallel.timeout_s`): that
bounds the stall. The first to finish writes the member list
(`compare_set`: one writer wins, everyone reads the same list).
Survivors re-initialise the group with new ranks in member order, the trainer re-wraps DDP
and re-splits the **same global batch** over fewer ranks from the global cursor, and the
interrupted step runs again from unchanged weights (its gradients are dropped; the optimizer
had not stepped). Nothing is read from disk: every replica already holds the weights and the
optimizer state. Only torch.distributed's own primitives are used (TCPStore, PrefixStore,
init/destroy_process_group).

Not done here: a replacement joining later (the group only shrinks), and layouts other than
plain data parallelism (FSDP2/TP/PP shards would have to be re-split: refused).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from exaflop.errors import UserError

ENV = "EXAFLOP_ELASTIC_STORE"


def launch(config: str, overrides: list[str], nproc: int, resume: bool, quiet: bool) -> int:
    """Run N workers around a store this process owns; 0 if every worker that was not killed
    by a signal finished cleanly (a lost replica does not fail the job)."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, multi_tenant=True)
    cmd = [sys.executable, "-m", "exaflop.train", config]
    for o in overrides:
        cmd += ["--set", o]
    cmd += (["--resume"] if resume else []) + (["--quiet"] if quiet else [])
    procs = [subprocess.Popen(cmd, env={**os.environ, ENV: f"127.0.0.1:{store.port}", "RANK": str(i),
                                        "LOCAL_RANK": str(i), "WORLD_SIZE": str(nproc)})
             for i in range(nproc)]
    # Tell the survivors who is gone the moment a worker exits: they wait for exactly those.
    codes: list[int | None] = [None] * nproc
    while any(c is None for c in codes):
        for i, p in enumerate(procs):
            if codes[i] is None and (c := p.poll()) is not None:
                codes[i] = c
                store.set(f"exited/{i}", str(c))
            elif codes[i] is None and store.check([f"dropped/{i}"]):
                p.kill()  # hung: the group went on without it
        time.sleep(0.05)
    failed = [c for c in codes if c > 0]
    if failed:
        return failed[0]
    return 0 if any(c == 0 for c in codes) else 1


class Elastic:
    """A worker's view of the elastic group: its fixed member id and the current members."""

    def __init__(self, addr: str, member: int, world: int, timeout: timedelta):
        host, port = addr.rsplit(":", 1)
        self.store = dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
        self.member, self.members, self.gen, self.timeout = member, list(range(world)), 0, timeout

    def init(self, rank: int, world: int) -> None:
        dist.init_process_group("gloo", store=dist.PrefixStore(f"gen{self.gen}", self.store), rank=rank,
                                world_size=world, timeout=self.timeout)

    @staticmethod
    def is_peer_failure(err: BaseException) -> bool:
        text = str(err).lower()
        return isinstance(err, dist.DistBackendError) or any(
            s in text for s in ("connection closed by peer", "connection reset", "broken pipe", "timed out"))

    def reform(self) -> dict[str, Any]:
        """Re-form the group without the members that are gone; returns the reconfigure record."""
        t0 = time.time()
        # DDP still holds the old group: abort its pending work before letting it go.
        pg = dist.distributed_c10d._get_default_group()
        for close in (pg.abort, dist.destroy_process_group):
            try:
                close()
            except Exception:  # the old group may already be half torn down
                pass
        g = self.gen + 1
        self.store.set(f"gen{g}/m/{self.member}", "1")
        # A survivor may notice only when its own collective times out (gloo does not always
        # report a peer's exit at once): wait for it somewhat longer than that.
        deadline = time.time() + 1.5 * self.timeout.total_seconds() + 5
        while True:
            waiting = [m for m in self.members
                       if not self.store.check([f"gen{g}/m/{m}"]) and not self.store.check([f"exited/{m}"])]
            if not waiting or time.time() > deadline:
                break
            time.sleep(0.05)
        view = ",".join(str(m) for m in self.members if self.store.check([f"gen{g}/m/{m}"]))
        final = self.store.compare_set(f"gen{g}/final", "", view).decode()
        members = [int(m) for m in final.split(",")]
        if self.member not in members:
            raise UserError(f"elastic: member {self.member} reached the re-formed group (generation {g}) "
                            f"after parallel.timeout_s={self.timeout.total_seconds():g}s; it stops here")
        left = [m for m in self.members if m not in members]
        for m in left:  # the launcher stops a dropped member that is still alive (hung)
            self.store.set(f"dropped/{m}", "1")
        self.members, self.gen = members, g
        self.init(members.index(self.member), len(members))
        return {"kind": "reconfigure", "left": left, "members": members, "world": len(members),
                "generation": g, "stall_s": time.time() - t0}
