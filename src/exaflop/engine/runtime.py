"""Process-level set-up: device, process group, threads, seeds, autocast."""

from __future__ import annotations

import contextlib
import os
import random
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from exaflop.engine.host_memory import keep_freed_memory


@dataclass
class Runtime:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None = fp32
    precision: Any = None  # engine.precision.Precision: what run.dtype resolved to, and why
    layout: Any = None  # engine.mesh.Layout, set by parallelize()
    mesh: Any = None  # DeviceMesh (dp_replicate, dp_shard, tp) when distributed
    expert_grads: Any = None  # engine.parallel.ExpertGrads under expert parallelism
    elastic: Any = None  # engine.elastic.Elastic under `--elastic`
    pp_tied: Any = None  # names of weights on the first and last pipeline stage (engine/pipeline.py)
    pp_chunks: Any = None  # the modules this rank's pipeline stages run (several when interleaved)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def setup(cfg) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.run.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        keep_freed_memory()  # a step's large temporaries reused, not faulted in again (engine/host_memory.py)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    elastic = None
    if world > 1 and not dist.is_initialized() and os.environ.get("EXAFLOP_ELASTIC_STORE"):
        from exaflop.engine.elastic import JOIN_ENV, Elastic

        elastic = Elastic(os.environ["EXAFLOP_ELASTIC_STORE"], rank, world, timedelta(seconds=cfg.parallel.timeout_s),
                          joining=os.environ.get(JOIN_ENV) == "1")
        if elastic.joining:
            # A replacement joins a running group later (trainer): alone until it is admitted.
            world = 1
        else:
            elastic.init(rank, world)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=cfg.parallel.timeout_s)
        dist.init_process_group(backend, timeout=timeout, store=_attempt_store(rank, world, timeout),
                                rank=rank, world_size=world,
                                device_id=device if device.type == "cuda" else None)
    seed_everything(cfg.run.seed)
    from exaflop.engine.precision import agree, resolve

    precision = resolve(cfg.run.dtype, device)
    if world > 1:
        precision = agree(precision, device)
    return Runtime(rank, world, local_rank, device, precision.dtype, precision=precision, elastic=elastic)


def _attempt_store(rank: int, world: int, timeout: timedelta):
    """The rendezvous store, namespaced by torchrun's restart count.

    torchrun shares its agent's TCP store with every attempt of the worker group. Keys the
    dead attempt left behind (gloo's peer addresses) are then read by the restarted group,
    which tries to connect to dead ports and times out. A per-attempt prefix avoids that.
    """
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr is None or port is None:
        return None  # not under torchrun: let init_process_group use its defaults
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(addr, int(port), world, is_master=not agent and rank == 0, timeout=timeout,
                          multi_tenant=not agent)
    return dist.PrefixStore(f"exaflop/attempt_{attempt}", store)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Matmul shapes (M, K, N) whose best rate is taken as the device's peak. On CPUs with
# bf16 matrix units a cache-sized matmul runs ~2x faster than a 2048^3 one, so a single
# large square matmul would understate the peak and overstate MFU.
_PEAK_SHAPES_CPU = ((1024, 1024, 1024), (2048, 384, 1024), (2048, 1024, 384), (2048, 2048, 2048))
_PEAK_SHAPES_CUDA = ((8192, 8192, 8192),)


def measure_peak_flops(device: torch.device, dtype: torch.dtype | None, seconds: float | None = None) -> float:
    """Best dense-matmul FLOP/s of this device in the training dtype (the MFU denominator),
    over `seconds` (default 0.6; EXAFLOP_PEAK_SECONDS overrides it: the test suite, which
    starts ~80 training runs and never reads MFU closely, measures for less)."""
    if seconds is None:
        seconds = float(os.environ.get("EXAFLOP_PEAK_SECONDS", "0.6"))
    dt = dtype or torch.float32
    shapes = _PEAK_SHAPES_CPU if device.type == "cpu" else _PEAK_SHAPES_CUDA
    # A private generator: measuring must not advance the training RNG (exact resume).
    gen = torch.Generator(device=device).manual_seed(0)
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dt, generator=gen)
        b = torch.randn(k, n, device=device, dtype=dt, generator=gen)
        a @ b  # warm-up
        iters, t0 = 0, time.perf_counter()
        while True:
            a @ b
            iters += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            el = time.perf_counter() - t0
            if el > seconds / len(shapes):
                break
        best = max(best, 2 * m * k * n * iters / el)
    return best


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within parallel.timeout_s: some rank is hung or gone."""


class Heartbeat:
    """Names the rank that stopped when a collective times out, instead of a bare socket error.

    Each rank records the step it starts in the rendezvous store. A rank whose collective
    times out marks itself as a waiter, gives the others a moment to time out too, and
    then names the ranks that are neither waiting nor ahead: those are the stuck ones.
    """

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.step = 0
        self.store = None
        if rt.distributed:
            from torch.distributed.distributed_c10d import _get_default_store

            self.store = _get_default_store()

    def beat(self, step: int) -> None:
        self.step = step
        if self.store is not None:
            self.store.set(f"exaflop/heartbeat/{self.rt.rank}", f"{step} {time.time():.3f}")

    def _read(self, key: str) -> str | None:
        try:
            return self.store.get(key).decode() if self.store.check([key]) else None
        except Exception:  # the store may have gone down with the failed rank
            return None

    def explain(self, step: int, timeout_s: float) -> str:
        head = (f"rank {self.rt.rank}: a collective at step {step} timed out after "
                f"parallel.timeout_s={timeout_s:g}s")
        if self.store is None:
            return head
        try:
            self.store.set(f"exaflop/waiting/{self.rt.rank}", str(step))
        except Exception:
            return head + "; the rendezvous store is gone too (the launcher or rank 0 died)"
        time.sleep(min(5.0, timeout_s / 2))  # peers blocked on the same rank time out about now
        stuck = []
        for r in range(self.rt.world):
            if self._read(f"exaflop/waiting/{r}") is not None:
                continue
            beat = self._read(f"exaflop/heartbeat/{r}")
            if beat is None:
                stuck.append(f"rank {r} (never started a step)")
            else:
                s, t = beat.split()
                stuck.append(f"rank {r} (in step {s} for {time.time() - float(t):.0f}s)")
        who = ", ".join(stuck) if stuck else "every rank is waiting on a peer (a network fault?)"
        return (f"{head}; not responding: {who}. Check that rank's log; raise parallel.timeout_s "
                "if steps are legitimately this slow")


def is_timeout(err: BaseException) -> bool:
    text = str(err).lower()
    return "timed out" in text or "timeout" in text
