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

Growing back (`--max-restarts N` with `--elastic`: up to N replacements). The launcher starts
a replacement for a lost replica with a new member id. It builds its model and optimizer, then
registers (`join/count`, `join/id/<n>`) and waits. Rank 0 reads the count at every step
boundary and adds it to the all-reduce the ranks already make there (the stop flag), so every
member decides to grow at the same step. They destroy the group and write the new member list
(`compare_set` again), the joiner reads its admission (`join/admit/<member>`), and generation
g+1 starts with the joiner last. Its weights come from rank 0 through DDP's own
construction-time broadcast; the optimizer state, the step (= data cursor), the skipped-step
count and the RNG state through `share_state`'s broadcasts. Nothing is read from disk.

Not done here: layouts other than plain data parallelism (FSDP2/TP/PP shards would have to be
re-split: refused).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from exaflop.errors import UserError

ENV = "EXAFLOP_ELASTIC_STORE"
JOIN_ENV = "EXAFLOP_ELASTIC_JOIN"  # set on a replacement: it joins a running group


def launch(config: str, overrides: list[str], nproc: int, resume: bool, quiet: bool, replacements: int = 0) -> int:
    """Run N workers around a store this process owns; 0 if every worker that was not killed
    by a signal finished cleanly (a lost replica does not fail the job). Up to `replacements`
    lost replicas are replaced by a new worker that joins the running group."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, multi_tenant=True)
    cmd = [sys.executable, "-m", "exaflop.train", config]
    for o in overrides:
        cmd += ["--set", o]
    cmd += (["--resume"] if resume else []) + (["--quiet"] if quiet else [])

    def spawn(member: int, join: bool) -> subprocess.Popen:
        env = {**os.environ, ENV: f"127.0.0.1:{store.port}", "RANK": str(member), "LOCAL_RANK": str(member),
               "WORLD_SIZE": str(nproc)}
        if join:
            env[JOIN_ENV] = "1"
        return subprocess.Popen(cmd, env=env)

    procs = [spawn(i, False) for i in range(nproc)]
    joiners: set[int] = set()
    # Tell the survivors who is gone the moment a worker exits: they wait for exactly those.
    codes: list[int | None] = [None] * nproc
    finished = False
    while any(c is None for c in codes):
        for i, p in enumerate(list(procs)):
            if codes[i] is None and (c := p.poll()) is not None:
                codes[i] = c
                store.set(f"exited/{i}", str(c))
                alive = [j for j, cj in enumerate(codes) if cj is None]
                if c != 0 and replacements > 0 and alive and not finished:
                    replacements -= 1
                    member = len(procs)
                    procs.append(spawn(member, True))
                    codes.append(None)
                    joiners.add(member)
            elif codes[i] is None and store.check([f"dropped/{i}"]):
                p.kill()  # hung: the group went on without it
        # A replacement still waiting when every member has finished has nothing to join.
        waiting = {j for j in joiners if codes[j] is None and not store.check([f"join/admit/{j}"])}
        if not finished and all(c is not None for j, c in enumerate(codes) if j not in waiting):
            store.set("finished", "1")
            finished = True
        time.sleep(0.05)
    failed = [c for c in codes if c is not None and c > 0]
    if failed:
        return failed[0]
    return 0 if any(c == 0 for c in codes) else 1


class Elastic:
    """A worker's view of the elastic group: its fixed member id and the current members."""

    def __init__(self, addr: str, member: int, world: int, timeout: timedelta, joining: bool = False):
        host, port = addr.rsplit(":", 1)
        self.store = dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
        self.member, self.members, self.gen, self.timeout = member, list(range(world)), 0, timeout
        self.joining = joining  # a replacement that has not been admitted yet
        self.admitted = 0  # replacements admitted so far, in registration order (join/count)

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
        return {"kind": "reconfigure", "left": left, "joined": [], "members": members, "world": len(members),
                "generation": g, "stall_s": time.time() - t0}

    # -- growing back -------------------------------------------------------------------------

    def join(self) -> dict[str, Any] | None:
        """A replacement: register and wait until the group admits it (then init the new group),
        or None when the run finished first."""
        n = self.store.add("join/count", 1)
        self.store.set(f"join/id/{n}", str(self.member))
        key = f"join/admit/{self.member}"
        while not self.store.check([key]):
            if self.store.check(["finished"]):
                return None
            time.sleep(0.05)
        info = json.loads(self.store.get(key))
        self.members, self.gen, self.admitted, self.joining = info["members"], info["generation"], info["admitted"], False
        self.init(self.members.index(self.member), len(self.members))
        return info

    def registered(self, step: int, rank: int) -> int:
        """Replacements registered so far (rank 0 reads the store; the others say 0 and learn
        the number from the all-reduce at the step boundary)."""
        if _await_join_at() == step:  # drill: hold this boundary until a replacement has registered
            deadline = time.time() + 120
            while int(self.store.add("join/count", 0)) == 0 and time.time() < deadline:
                time.sleep(0.05)
        return int(self.store.add("join/count", 0)) if rank == 0 else 0

    def grow(self, registered: int) -> dict[str, Any]:
        """Every member, at the same step boundary: admit the replacements registered up to
        `registered` (those still alive) and re-initialise the group with them last."""
        t0 = time.time()
        new = [int(self.store.get(f"join/id/{k}")) for k in range(self.admitted + 1, registered + 1)]
        new = [m for m in new if not self.store.check([f"exited/{m}"])]
        dist.destroy_process_group()
        g = self.gen + 1
        final = self.store.compare_set(f"gen{g}/final", "", ",".join(map(str, self.members + new))).decode()
        members = [int(m) for m in final.split(",")]
        joined = [m for m in members if m not in self.members]
        info = json.dumps({"members": members, "generation": g, "admitted": registered})
        for m in joined:
            self.store.set(f"join/admit/{m}", info)
        self.members, self.gen, self.admitted = members, g, registered
        self.init(members.index(self.member), len(members))
        return {"kind": "reconfigure", "left": [], "joined": joined, "members": members, "world": len(members),
                "generation": g, "stall_s": time.time() - t0}


def _await_join_at() -> int | None:
    """EXAFLOP_FAULT=...,await_join@stepN: a drill for the rejoin test (engine/faults.py)."""
    m = re.search(r"await_join@step(\d+)", os.environ.get("EXAFLOP_FAULT", ""))
    return int(m.group(1)) if m else None


def admit(rt, heartbeat) -> dict[str, Any] | None:
    """A replacement's side of growing back (`rt`: the trainer's engine.runtime.Runtime): wait to be
    admitted into the running group, then take its ranks and rank 0's precision. None if the run
    finished before a step boundary let it in. Its collectives pair with `rewrap` on the members."""
    from torch.distributed.distributed_c10d import _get_default_store

    from exaflop.engine.precision import agree

    info = rt.elastic.join()
    if info is None:
        return None
    rt.rank, rt.world = dist.get_rank(), dist.get_world_size()
    rt.precision = agree(rt.precision, rt.device)
    rt.dtype = rt.precision.dtype
    heartbeat.store = _get_default_store()
    return info


def rewrap(rec: dict[str, Any], parallel_cfg, rt, model: torch.nn.Module, optimizer, meta: dict[str, Any]):
    """The model wrapped for the re-formed group (`rec` from Elastic.reform or .grow; `meta`: step,
    skipped-step count and RNG state to hand a replacement). When the group grew, the replacements
    get the state here, in the same collective order as their side (`admit`, the trainer's
    parallelize, `share_state`): rank 0's precision choice, its weights (DDP's construction-time
    broadcast), its optimizer state, step and RNG."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from exaflop.engine.mesh import resolve_layout
    from exaflop.engine.precision import agree

    t0 = time.time()
    rt.rank, rt.world = dist.get_rank(), dist.get_world_size()
    rt.layout = resolve_layout(parallel_cfg, rt.world)
    if rec["joined"]:
        rt.precision = agree(rt.precision, rt.device)
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper; elastic runs plain DDP replicas
    inner = inner.module if isinstance(inner, DDP) else inner
    model = DDP(inner, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None) if rt.world > 1 else inner
    if rec["joined"]:
        _, rec["state_bytes"] = share_state(optimizer, meta)
        rec["state_from"] = rt.elastic.members[0]
    rec["stall_s"] += time.time() - t0
    return model


def share_state(optimizer: torch.optim.Optimizer, meta: dict[str, Any] | None) -> tuple[dict[str, Any], int]:
    """Rank 0's optimizer state and `meta` (step, counters, RNG) to every rank, by broadcast.

    Rank 0 sends the state's layout first (keys, shapes, dtypes, the non-tensor entries);
    then every rank takes part in one broadcast per dtype of the flattened tensors (gloo: CPU
    tensors). The other survivors already hold the same values and only take part; a
    replacement (`meta` None) loads what it received. Returns rank 0's meta and the bytes sent.
    """
    sd = optimizer.state_dict() if dist.get_rank() == 0 else None
    head: list[Any] = [None]
    if sd is not None:
        tensors = {i: {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in st.items()
                       if torch.is_tensor(v)} for i, st in sd["state"].items()}
        values = {i: {k: v for k, v in st.items() if not torch.is_tensor(v)} for i, st in sd["state"].items()}
        head = [{"tensors": tensors, "values": values, "groups": sd["param_groups"], "meta": meta}]
    dist.broadcast_object_list(head, src=0)
    tensors, state = head[0]["tensors"], head[0]["values"]
    slots = [(i, k, shape, dtype) for i in sorted(tensors) for k, (shape, dtype) in sorted(tensors[i].items())]
    sent = 0
    for dtype in sorted({d for *_, d in slots}):
        mine = [s for s in slots if s[3] == dtype]
        if sd is not None:
            flat = torch.cat([sd["state"][i][k].detach().reshape(-1).cpu() for i, k, _, _ in mine])
        else:
            flat = torch.empty(sum(_numel(shape) for *_, shape, _ in mine), dtype=getattr(torch, dtype))
        dist.broadcast(flat, src=0)
        sent += flat.numel() * flat.element_size()
        offset = 0
        for i, k, shape, _ in mine:
            state[i][k] = flat[offset:offset + _numel(shape)].view(shape).clone()
            offset += _numel(shape)
    if meta is None:  # a replacement: take what rank 0 has
        optimizer.load_state_dict({"state": state, "param_groups": head[0]["groups"]})
    return head[0]["meta"], sent


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
