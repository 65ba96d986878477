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
from collections import deque

import torch
from torch import Tensor

from exaflop.engine.faults import ServeFault
from exaflop.serve.metrics import Metrics
from exaflop.serve.sampling import sample_rows
from exaflop.serve.sequence import Event, Sequence

log = logging.getLogger("exaflop.serve")


class QueueFull(Exception):
    pass


class Engine:
    def __init__(self, name: str, metrics: Metrics, max_running: int = 32, max_queue: int = 256,
                 prefill_tokens: int = 4096, compile: bool = False):
        self.name, self.metrics = name, metrics
        self.max_running, self.max_queue, self.prefill_tokens = max_running, max_queue, prefill_tokens
        # The decode step, optionally compiled (see `prepare`); prefill stays eager: its
        # shapes vary in two dimensions and compiling it measured no faster.
        self.compile = compile
        self._decode_step = None  # a compiled LM.logits_at, once `prepare` made one
        self._compiled = False
        self.current = None  # Weights new sequences start on; None while loading
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self._outbox: list[tuple[object, Event]] = []
        self.steps = 0
        self.fault = ServeFault.from_env()  # drills only: EXAFLOP_SERVE_FAULT (engine/faults.py)

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
            self.current = weights
            self._cond.notify_all()

    def prepare(self, weights) -> None:
        """Compile the decode step on `weights` before they serve (called off the engine thread).

        One graph with a symbolic batch size serves every batch (plus one for a batch of
        one, which the compiler specializes), so the compile happens here, at load, instead
        of stalling the first requests. A hot reload of the same architecture reuses it.
        If compiling fails (no C++ compiler, say), decode stays eager and serving goes on.
        """
        if not self.compile or self._compiled:
            return
        t0 = time.perf_counter()
        try:
            compiled = torch.compile(type(weights.model).logits_at, dynamic=True)
            with torch.inference_mode():
                # The cache too is made under inference mode, as the engine thread makes
                # every later one (take_slot): graphs are guarded on that tensor kind.
                cache = weights.ensure_cache(self.max_running)
                for batch in sorted({1, min(2, cache.slots)}):
                    cache.lengths[:batch] = 0
                    x = torch.zeros(batch, 1, dtype=torch.long, device=weights.device)
                    compiled(weights.model, x, cache, None, torch.zeros_like(x[:, 0]))
                cache.lengths.zero_()
        except Exception as e:  # noqa: BLE001 — any compiler failure: serve eager instead
            log.warning("engine %s: torch.compile failed (%s: %s); decoding eagerly", self.name,
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.compile = False
            return
        self._decode_step, self._compiled = compiled, True
        log.info("engine %s: decode step compiled in %.1f s", self.name, time.perf_counter() - t0)

    def submit(self, seqs: list[Sequence]) -> None:
        with self._cond:
            free_slots = max(0, self.max_running - len(self.running))
            if len(self.waiting) + len(seqs) > self.max_queue + free_slots:
                raise QueueFull(f"{len(self.waiting)} sequences already waiting (--max-queue {self.max_queue})")
            self.waiting.extend(seqs)
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
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopped and not (self.running or self.waiting):
                        self._cond.wait(1.0)
                    if self._stopped:
                        return
                    self._drop_cancelled()
                    admitted = self._admit()
                    self._gauges()
                if not admitted and not self.running:
                    # Nothing to compute, but sequences that failed to start have events to
                    # hand over: without this flush a lone failed request would wait forever.
                    self._flush()
                    time.sleep(0.005)  # waiting but nothing admissible (model still loading)
                    continue
                try:
                    self._step(admitted)
                except Exception as e:  # a bug outside any one sequence: fail the step, keep serving
                    log.exception("engine %s: step failed", self.name)
                    for s in self.running + admitted:
                        if s.finish_reason is None:
                            self._fail(s, e)
                    self.running = []
                self._flush()
                self.steps += 1
                self._gauges()

    def _drop_cancelled(self) -> None:
        for s in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(s)
            self.metrics.aborted.inc(model=self.name)
        for s in [s for s in self.running if s.cancelled]:
            self.running.remove(s)
            self._release(s)
            self.metrics.aborted.inc(model=self.name)

    def _admit(self) -> list[Sequence]:
        w = self.current
        out: list[Sequence] = []
        if w is None:
            return out
        longest = 0
        while self.waiting and len(self.running) + len(out) < self.max_running:
            s = self.waiting[0]
            longest_if = max(longest, len(s.prompt_ids))
            if out and longest_if * (len(out) + 1) > self.prefill_tokens:
                break  # the rest prefill next step, so running sequences are not stalled long
            self.waiting.popleft()
            longest = longest_if
            s.weights, s.slot = w, w.take_slot(s, self.max_running)  # so a failed start can free it
            try:
                if self.fault:
                    self.fault.check("start", [s])
                s.start(w, s.slot, w.device)
            except Exception as e:  # fail this request, never the engine thread
                self._fail(s, e, "could not start a sequence")
                continue
            out.append(s)
        return out

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
        self.metrics.running.set(len(self.running), model=self.name)
        self.metrics.waiting.set(len(self.waiting), model=self.name)

    # -- one step -------------------------------------------------------------
    def _step(self, admitted: list[Sequence]) -> None:
        decoding = self.running
        by_weights: dict[int, list[Sequence]] = {}
        for s in decoding:
            by_weights.setdefault(id(s.weights), []).append(s)
        for group in by_weights.values():
            self._isolated(self._decode, group, "decode")
        if admitted:
            self._isolated(self._prefill, admitted, "prefill")
        self.running = [s for s in decoding + admitted if s.finish_reason is None]

    def _prefill(self, seqs: list[Sequence]) -> None:
        w = seqs[0].weights
        lens = [len(s.prompt_ids) for s in seqs]
        x = torch.zeros(len(seqs), max(lens), dtype=torch.long)
        for i, s in enumerate(seqs):
            x[i, :lens[i]] = torch.tensor(s.prompt_ids)
        rows = torch.tensor([s.slot for s in seqs], device=w.device)
        lens_t = torch.tensor(lens, device=w.device)
        w.cache.reset(rows)
        if self.fault:
            self.fault.check("prefill", seqs)
        logits = w.model.decode(x.to(w.device), w.cache, rows, lens_t)
        self.metrics.prompt_tokens.inc(sum(lens), model=self.name)
        self._emit(seqs, logits)

    def _decode(self, seqs: list[Sequence]) -> None:
        w = seqs[0].weights
        self.metrics.batch.observe(len(seqs), model=self.name)
        seqs.sort(key=lambda s: s.slot)
        x = torch.tensor([[s.out_ids[-1]] for s in seqs], device=w.device)
        packed = all(s.slot == i for i, s in enumerate(seqs))  # the usual case (see Weights.free_slot)
        rows = None if packed else torch.tensor([s.slot for s in seqs], device=w.device)
        # The compiled step is traced for packed rows; a gather (rows given) runs eager.
        if self.fault:
            self.fault.check("decode", seqs)
        logits = w.model.decode(x, w.cache, rows, step=self._decode_step if rows is None else None)
        self._emit(seqs, logits)

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
        if s.weights is not None and s.slot >= 0:
            s.weights.free_slot(s.slot)
            s.slot = -1


def _deliver_all(items: list) -> None:
    for handle, ev in items:
        handle.deliver(ev)
