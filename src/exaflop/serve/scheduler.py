"""Admission and packing: which sequences run in the next engine step.

The scheduler owns the queues and the KV-cache slots; each step it hands the engine a
`BatchPlan` — plain data naming the decode groups and the prompts to prefill — and the
runner (serve/runner.py) computes it. Policies plug in here: how many prompts a step may
prefill, which waiting request goes first, and (to come) reuse of cached prefixes.

It is not thread-safe on its own: the engine calls it under its lock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from exaflop.engine.faults import ServeFault
from exaflop.serve.metrics import Metrics
from exaflop.serve.sequence import Sequence


class QueueFull(Exception):
    pass


@dataclass
class BatchPlan:
    """One engine step. Sequences on different weights (a hot reload in flight) never share a
    forward, so decoding is one group per weights; prefill runs on the current weights."""

    decode: list[list[Sequence]] = field(default_factory=list)
    prefill: list[Sequence] = field(default_factory=list)
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)  # could not start

    @property
    def empty(self) -> bool:
        return not (self.decode or self.prefill)


class Scheduler:
    def __init__(self, name: str, metrics: Metrics, max_running: int = 32, max_queue: int = 256,
                 prefill_tokens: int = 4096, fault: ServeFault | None = None) -> None:
        self.name, self.metrics, self.fault = name, metrics, fault
        self.max_running, self.max_queue, self.prefill_tokens = max_running, max_queue, prefill_tokens
        self.current = None  # Weights new sequences start on; None while loading
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def idle(self) -> bool:
        return not (self.running or self.waiting)

    def submit(self, seqs: list[Sequence]) -> None:
        free_slots = max(0, self.max_running - len(self.running))
        if len(self.waiting) + len(seqs) > self.max_queue + free_slots:
            raise QueueFull(f"{len(self.waiting)} sequences already waiting (--max-queue {self.max_queue})")
        self.waiting.extend(seqs)

    def drop_cancelled(self) -> None:
        """Forget sequences whose client went away, freeing their slots."""
        for s in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(s)
            self.metrics.aborted.inc(model=self.name)
        for s in [s for s in self.running if s.cancelled]:
            self.running.remove(s)
            self.release(s)
            self.metrics.aborted.inc(model=self.name)

    def schedule(self) -> BatchPlan:
        """The next step: every running sequence decodes, and waiting ones are admitted into
        free slots while the prefill batch (padded to its longest prompt) stays within
        `prefill_tokens`, so running sequences are not stalled long by a burst of prompts."""
        plan = BatchPlan()
        by_weights: dict[int, list[Sequence]] = {}
        for s in self.running:
            by_weights.setdefault(id(s.weights), []).append(s)
        plan.decode = list(by_weights.values())
        w = self.current
        if w is None:
            return plan
        longest = 0
        while self.waiting and len(self.running) + len(plan.prefill) < self.max_running:
            s = self.waiting[0]
            longest_if = max(longest, len(s.prompt_ids))
            if plan.prefill and longest_if * (len(plan.prefill) + 1) > self.prefill_tokens:
                break  # the rest prefill next step
            self.waiting.popleft()
            longest = longest_if
            s.weights, s.slot = w, w.take_slot(s, self.max_running)  # so a failed start can free it
            try:
                if self.fault:
                    self.fault.check("start", [s])
                s.start(w, s.slot, w.device)
            except Exception as e:  # noqa: BLE001 — the engine fails this request, never itself
                plan.failed.append((s, e))
                continue
            plan.prefill.append(s)
        return plan

    def finish(self, plan: BatchPlan) -> None:
        """After the step: what did not finish keeps running."""
        self.running = [s for s in self.running + plan.prefill if s.finish_reason is None]

    def release(self, s: Sequence) -> None:
        if s.weights is not None and s.slot >= 0:
            s.weights.free_slot(s.slot)
            s.slot = -1
