"""Continuous batching: one background thread per served model.

Each step the loop (1) drops sequences whose client went away, (2) admits waiting
sequences into free KV-cache slots and prefills them together — prompts of different
lengths are right-padded, which is exact because a row's queries only see keys at or
before their own position and each row's cache length is set to its real prompt
length afterwards, so the padding is overwritten before it is ever attended — and
(3) decodes one token for every running sequence in one batched forward.

A hot-reloaded checkpoint becomes `current`: new sequences start on it, while
sequences already running keep the weights (and KV cache) they started with until
they finish; then the old weights are released.

Three parts: the scheduler (serve/scheduler.py: queues, admission, slots) makes a plain
`BatchPlan` each step, the runner (serve/runner.py) computes its forward passes through the
model's `decode`, and this engine runs the loop, samples, and hands events to clients.

The loop runs in a thread, not the asyncio loop: torch releases the GIL inside
kernels, so HTTP handling continues while a batch computes.

A failure ends only the requests it belongs to: a batched forward or sampling step that
raises is retried one sequence at a time (both are idempotent until a step succeeds:
cache lengths move only after the forward), so the failing sequence gets an error
event and the rest of the batch carries on; whatever is failed is delivered in the
same loop turn, busy or idle.
"""

from __future__ import annotations

import logging
import threading
import time

import torch
from torch import Tensor

from exaflop.engine.faults import ServeFault
from exaflop.serve.metrics import Metrics
from exaflop.serve.runner import Runner
from exaflop.serve.sampling import sample_rows
from exaflop.serve.scheduler import BatchPlan, Scheduler
from exaflop.serve.sequence import Event, Sequence

log = logging.getLogger("exaflop.serve")


class Engine:
    def __init__(self, name: str, metrics: Metrics, max_running: int = 32, max_queue: int = 256,
                 prefill_tokens: int = 4096, compile: str | bool = "off", prefix_cache_mb: float = 0.0,
                 threads: int = 0, quantize: str = "none", kv_dtype: torch.dtype | None = None):
        self.name, self.metrics = name, metrics
        self.threads = threads  # torch threads of the engine thread (0: the default); serve/threads.py
        self.fault = ServeFault.from_env()  # drills only: EXAFLOP_SERVE_FAULT (engine/faults.py)
        self.scheduler = Scheduler(name, metrics, max_running, max_queue, prefill_tokens, self.fault)
        self.runner = Runner(name, metrics, compile, self.fault, prefix_bytes=int(prefix_cache_mb * (1 << 20)),
                             quantize=quantize, kv_dtype=kv_dtype)
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self._outbox: list[tuple[object, Event]] = []
        self.steps = 0

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def _compiled(self) -> bool:
        return self.runner.compiled

    @property
    def _decode_step(self):
        return self.runner.decode_step

    # -- called from the HTTP side -------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def swap(self, weights) -> None:
        """Start new sequences on `weights`; running ones finish on what they started with."""
        with self._cond:
            self.scheduler.current = weights
            self._cond.notify_all()

    def prepare(self, weights) -> None:
        """Pack `weights` and compile the decode step, before they serve or beside (serve/runner.py)."""
        self.runner.prepare(weights, self.scheduler.max_running, self.threads)

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences (QueueFull when --max-queue is reached)."""
        with self._cond:
            self.scheduler.submit(seqs)
            self._gauges()
            self._cond.notify_all()

    def wake(self) -> None:
        """Called when a client disconnects, so an idle-waiting loop notices promptly."""
        with self._cond:
            self._cond.notify_all()

    @property
    def alive(self) -> bool:
        """False once the loop thread has ended (stopped, or killed by what nothing caught)."""
        return self._thread.is_alive()

    # -- the loop ----------------------------------------------------------------
    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        sched = self.scheduler
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopped and sched.idle:
                        self._cond.wait(1.0)
                    if self._stopped:
                        return
                    sched.drop_cancelled()
                    plan = sched.schedule()
                    self._gauges()
                for s, e in plan.failed:
                    self._fail(s, e, "could not start a sequence")
                if plan.empty:
                    # Nothing to compute, but sequences that failed to start have events to
                    # hand over: without this flush a lone failed request would wait forever.
                    self._flush()
                    time.sleep(0.005)  # waiting but nothing admissible (model still loading)
                    continue
                try:
                    self._step(plan)
                except Exception as e:  # a bug outside any one sequence: fail the step, keep serving
                    log.exception("engine %s: step failed", self.name)
                    for s in sched.running + plan.prefill:
                        if s.finish_reason is None:
                            self._fail(s, e)
                    sched.running = []
                self._flush()
                self.steps += 1
                self._gauges()

    def _fail(self, s: Sequence, e: Exception, what: str = "sequence failed") -> None:
        """End one sequence with an error event (delivered at this step's flush)."""
        log.error("engine %s: %s: %s: %s", self.name, what, type(e).__name__, e, exc_info=e)
        s.finish_reason = "error"
        self._outbox.append((s.handle, Event(s.index, finish_reason="error", error=f"{type(e).__name__}: {e}")))
        self.metrics.failed.inc(model=self.name)
        self._release(s)

    def _isolated(self, run, seqs: list[Sequence], stage: str) -> None:
        """run(seqs); if the batch raises, run each sequence alone so only the culprit fails."""
        try:
            run(seqs)
            return
        except Exception as e:  # noqa: BLE001 — whatever it is, it must not reach other requests
            if len(seqs) == 1:
                self._fail(seqs[0], e, f"{stage} failed")
                return
            log.warning("engine %s: batched %s of %d failed (%s: %s); retrying one by one",
                        self.name, stage, len(seqs), type(e).__name__, e)
        for s in seqs:
            try:
                run([s])
            except Exception as e:  # noqa: BLE001
                self._fail(s, e, f"{stage} failed")

    def _gauges(self) -> None:
        self.metrics.running.set(len(self.scheduler.running), model=self.name)
        self.metrics.waiting.set(len(self.scheduler.waiting), model=self.name)
        w = self.scheduler.current
        if w is not None and w.cache is not None:
            for state, n in w.cache.usage().items():
                self.metrics.kv_blocks.set(n, model=self.name, state=state)

    # -- one step -------------------------------------------------------------
    def _step(self, plan: BatchPlan) -> None:
        for group in plan.decode:
            self._isolated(lambda seqs: self._emit(seqs, self.runner.decode(seqs)), group, "decode")
        if plan.prefill:
            self._isolated(lambda seqs: self._emit(seqs, self.runner.prefill(seqs)), plan.prefill, "prefill")
        self.scheduler.finish(plan)

    def _sample(self, logits: Tensor, seqs: list[Sequence]) -> tuple[list, list, list]:
        """sample_rows over the batch; if it raises, row by row, failing only the rows that raise."""
        try:
            if self.fault:
                self.fault.check("sample", seqs)
            ids, lps = sample_rows(logits, seqs)
            return seqs, ids, lps
        except Exception as e:  # noqa: BLE001
            if len(seqs) == 1:
                self._fail(seqs[0], e, "sampling failed")
                return [], [], []
            log.warning("engine %s: batched sampling of %d failed (%s: %s); sampling one by one",
                        self.name, len(seqs), type(e).__name__, e)
        kept, ids, lps = [], [], []
        for i, s in enumerate(seqs):
            try:
                if self.fault:
                    self.fault.check("sample", [s])
                (tok,), (lp,) = sample_rows(logits[i:i + 1], [s])
            except Exception as e:  # noqa: BLE001
                self._fail(s, e, "sampling failed")
                continue
            kept.append(s), ids.append(tok), lps.append(lp)
        return kept, ids, lps

    def _emit(self, seqs: list[Sequence], logits: Tensor) -> None:
        # Never raises for one sequence's sake: the forward it follows has already moved
        # the cache lengths, so the step must not be retried from here.
        seqs, ids, lps = self._sample(logits, seqs)
        now = time.perf_counter()
        m = self.metrics
        m.generated_tokens.inc(len(ids), model=self.name)
        gaps = []
        for s, tok, lp in zip(seqs, ids, lps, strict=True):
            if s.t_first is None:
                s.t_first = now
                m.ttft.observe(now - s.handle.arrival, model=self.name)
            else:
                gaps.append(now - s.t_last)  # type: ignore[operator]
            s.t_last = now
            try:
                ev = s.add_token(tok, lp)
            except Exception as e:  # noqa: BLE001 — decoding its text, say: this sequence only
                self._fail(s, e, "could not record a token")
                continue
            if ev is not None:
                self._outbox.append((s.handle, ev))
            if s.finish_reason is not None:
                m.e2e.observe(now - s.handle.arrival, model=self.name)
                try:
                    self.runner.keep(s)
                except Exception:  # noqa: BLE001 — a cache that cannot keep a block must not fail the reply
                    log.exception("engine %s: prefix cache store failed", self.name)
                self._release(s)
        m.itl.observe_many(gaps, model=self.name)

    def _flush(self) -> None:
        """Hand this step's events over: one thread-safe call per event loop, not per event."""
        by_loop: dict = {}
        for handle, ev in self._outbox:
            if handle.loop is None:
                handle.deliver(ev)
            else:
                by_loop.setdefault(handle.loop, []).append((handle, ev))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, items)
            except RuntimeError:  # that event loop is closed: the server is shutting down
                pass

    def _release(self, s: Sequence) -> None:
        self.scheduler.release(s)


def _deliver_all(items: list) -> None:
    for handle, ev in items:
        handle.deliver(ev)
