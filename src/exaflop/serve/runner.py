"""The model runner: the forward passes of a `BatchPlan`, through the model's public entry
point (`LM.decode`) and nothing else of the model.

Prefill: the admitted prompts right-padded into one batch, their cache rows reset; the
model advances each row by its real length. Decode: one token per running sequence. The
decode step may be compiled (`serve --compile`); prefill stays eager: its shapes vary in
two dimensions and compiling it measured no faster. By default (`--compile auto`) the step is
compiled in a background thread while the engine decodes eagerly, so a server answers at once
and is at full speed once the compile is done — except where the fp32 step operator applies
(lm/fused_step.py: fp32 where PyTorch dispatches to AVX2, what `auto` precision serves on CPUs
without fast bf16): it is faster than the compiled step and needs no compile.
"""

from __future__ import annotations

import gc
import logging
import threading
import time

import torch
from torch import Tensor

from exaflop.engine.faults import ServeFault
from exaflop.engine.precision import compile_cache_per_isa
from exaflop.lm.fused_step import fused_step, fused_step_applies
from exaflop.nn.packed import INT8_KERNEL_ROWS, lower_packed_linear, pack_for_inference
from exaflop.nn.paged import paged_kernel
from exaflop.serve.metrics import Metrics
from exaflop.serve.sequence import Sequence

log = logging.getLogger("exaflop.serve")


COMPILE_MODES = ("auto", "on", "off")


class Runner:
    def __init__(self, name: str, metrics: Metrics, compile: str | bool = "off", fault: ServeFault | None = None,
                 prefix_bytes: int = 0, quantize: str = "none", kv_dtype: torch.dtype | None = None) -> None:
        self.name, self.metrics, self.fault = name, metrics, fault
        self.quantize = quantize  # "int8": weight-only int8 matrices (nn/packed.py)
        self.kv_dtype = kv_dtype  # the KV cache's dtype (None: the weights')
        self.prefix_bytes = prefix_bytes  # prefix-cache budget per checkpoint (0: off)
        # "on": compile before serving; "auto": serve eagerly at once, compile beside it and
        # switch when ready; "off": eager. (True / False: "on" / "off".)
        self.compile = {True: "on", False: "off"}.get(compile, compile)
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile={compile!r}: one of {COMPILE_MODES}")
        self.decode_step = None  # a compiled LM.logits_at, once one is ready
        self.compiled = False
        self.compiling: threading.Thread | None = None  # the background compile ("auto") while it runs
        self.cpp_wrapper = False  # whether the compiled step got a C++ wrapper (see _compile_step)
        self.fused = False  # decoding through the fp32 step operator (lm/fused_step.py) instead

    @property
    def decode_mode(self) -> str:
        """What decodes now: "fused" (the fp32 step operator), "compiled", "compiling" (eager
        meanwhile) or "eager"."""
        if self.fused:
            return "fused"
        return "compiled" if self.compiled else "compiling" if self.compiling is not None else "eager"

    def prepare(self, weights, max_running: int, threads: int = 0) -> None:
        """Make `weights` ready to serve (called off the engine thread): fuse and pack the
        matrices (nn/packed.py: bit-identical, ~2x faster bf16 matmuls at decode's batch sizes),
        build the CPU kernels, and compile the decode step (once: a hot reload of the same
        architecture reuses it).

        One graph with a symbolic batch size serves every batch (plus one for a batch of one,
        which the compiler specializes). It reads only each row's filled prefix: the read
        length is a dynamic size of its inputs (LM.decode), warmed at lengths >= 2 so that no
        request compiles. "on" compiles here, before the weights serve (~70 s for lm-124m on
        2 cores cold, ~8 s with inductor's on-disk cache warm); "auto" compiles in a thread of
        its own while the engine decodes eagerly, and the engine takes the compiled step from
        its next decode on. If compiling fails (no C++ compiler, say), decode stays eager.
        """
        t0 = time.perf_counter()
        pack_for_inference(weights.model, quantize=self.quantize)
        weights.prefix_bytes = self.prefix_bytes
        weights.kv_dtype = self.kv_dtype
        if weights.device.type == "cpu" and paged_kernel():  # built here, not by the first request
            one_row = any(getattr(m, "row", None) is not None for m in weights.model.modules())
            log.info("engine %s: CPU kernels ready (%s%s) in %.1f s", self.name,
                     torch.backends.cpu.get_cpu_capability(), ", one-row bf16 kernel" if one_row else "",
                     time.perf_counter() - t0)
        if (self.compile == "auto" and weights.device.type == "cpu" and not self.compiled and self.compiling is None
                and fused_step_applies(weights.model)):
            # fp32 where PyTorch dispatches to AVX2: the step operator, faster than the compiled
            # step and ready at once (lm/fused_step.py). A reload of another kind of model (MoE,
            # say) falls back to LM.logits_at inside it, eagerly.
            if not self.fused:
                log.info("engine %s: decoding with the fused fp32 step (no compile needed)", self.name)
            self.decode_step, self.fused = fused_step, True
            return
        if self.compile == "off" or self.compiled or self.fused or self.compiling is not None:
            return
        if self.compile == "on":
            self._compile_step(weights, max_running)
            return
        log.info("engine %s: compiling the decode step in the background; decoding eagerly until it "
                 "is ready (--compile off: never; --compile on: before serving)", self.name)
        self.compiling = threading.Thread(target=self._compile_in_background, args=(weights, max_running, threads),
                                          name=f"compile-{self.name}", daemon=True)
        self.compiling.start()

    def _compile_in_background(self, weights, max_running: int, threads: int) -> None:  # noqa: ANN001
        # Its own thread, ended with the compile: its OpenMP team goes with it (serve/threads.py),
        # and its kernels are built for the engine's thread count.
        if threads:
            torch.set_num_threads(threads)
        try:
            self._compile_step(weights, max_running)
        finally:
            self.compiling = None

    def _compile_step(self, weights, max_running: int) -> None:  # noqa: ANN001
        t0 = time.perf_counter()
        compile_cache_per_isa()
        # A C++ wrapper around the step's kernels (no Python between them) once the packed
        # linears call oneDNN directly (nn/packed.py): ~20% faster per token at 1-32 rows.
        wrappers = [True, False] if lower_packed_linear() else [False]
        for cpp_wrapper in wrappers:
            try:
                compiled = self._compile(weights, max_running, cpp_wrapper, self.quantize)
                break
            except Exception as e:  # noqa: BLE001 — any compiler failure: the next option, then eager
                log.warning("engine %s: torch.compile%s failed (%s: %s)", self.name,
                            " (C++ wrapper)" if cpp_wrapper else "", type(e).__name__,
                            str(e).splitlines()[0] if str(e) else "")
        else:
            log.warning("engine %s: decoding eagerly", self.name)
            self.compile = "off"
            return
        # Compiling leaves its garbage (traced graphs, guards) to a full collection: run here, in
        # this thread, rather than by whichever allocation next trips one, mid-request (measured: a
        # 285 ms pause of every stream, 58,171 objects collected, in the first requests after the
        # background compile; fp32 lm-124m, AVX2).
        gc.collect()
        # The engine thread reads `decode_step` once per decode: from its next step on, compiled.
        self.cpp_wrapper, self.decode_step, self.compiled = cpp_wrapper, compiled, True
        log.info("engine %s: decode step compiled%s in %.1f s; decoding with it", self.name,
                 " (C++ wrapper)" if cpp_wrapper else "", time.perf_counter() - t0)

    @staticmethod
    def _compile(weights, max_running: int, cpp_wrapper: bool, quantize: str):  # noqa: ANN001, ANN205
        compiled = torch.compile(type(weights.model).logits_at, dynamic=True,
                                 options={"cpp_wrapper": True} if cpp_wrapper else None)
        with torch.inference_mode():
            # Warmed on a stand-in for the serving cache, never on the cache itself: the engine
            # may be decoding in it meanwhile. Every size is the real one's, so the graphs'
            # guards hold for it (and for a hot-reloaded checkpoint's). Made under inference mode,
            # as the engine thread makes the real one (take_slot): graphs are guarded on that.
            cache = weights.stand_in_cache(max_running)
            batches = {1, min(2, cache.slots)}
            if quantize == "int8":  # int8 matrices switch kernels at a batch size: its own graph
                batches.add(min(INT8_KERNEL_ROWS, cache.slots))
            for batch in sorted(batches):
                cache.reserve(list(range(batch)), [3] * batch)
                cache.lengths[:batch] = 2  # a read length of 3: sizes 0 and 1 would specialize
                x = torch.zeros(batch, 1, dtype=torch.long, device=weights.device)
                weights.model.decode(x, cache, None, step=compiled)
                for row in range(batch):
                    cache.release(row)
        return compiled

    def prefill(self, seqs: list[Sequence]) -> Tensor:
        """Next-token logits (B, V) after each prompt; fills the prompts' cache rows. Blocks of a
        prompt found in the prefix cache are attached to its row (shared, not copied), and only
        the rest is computed."""
        w = seqs[0].weights
        rows = torch.tensor([s.slot for s in seqs], device=w.device)
        w.cache.reset(rows)
        prefix = w.prefix
        for s in seqs:
            s.cached_tokens = prefix.attach(s.slot, s.prompt_ids) if prefix is not None else 0
        if prefix is not None:
            self.metrics.prefix_queried.inc(sum(len(s.prompt_ids) for s in seqs), model=self.name)
            self.metrics.prefix_hits.inc(sum(s.cached_tokens for s in seqs), model=self.name)
        lens = [len(s.prompt_ids) - s.cached_tokens for s in seqs]
        w.cache.reserve([s.slot for s in seqs], [len(s.prompt_ids) for s in seqs])
        x = torch.zeros(len(seqs), max(lens), dtype=torch.long)
        for i, s in enumerate(seqs):
            x[i, :lens[i]] = torch.tensor(s.prompt_ids[s.cached_tokens:])
        if self.fault:
            self.fault.check("prefill", seqs)
        logits = w.model.decode(x.to(w.device), w.cache, rows, torch.tensor(lens, device=w.device))
        self.metrics.prompt_tokens.inc(sum(lens), model=self.name)
        if prefix is not None:
            for s in seqs:
                prefix.register(s.slot, s.prompt_ids)
        return logits

    def keep(self, s: Sequence) -> None:
        """A finished sequence: index its prompt and output blocks for a next turn."""
        prefix = s.weights.prefix if s.weights is not None and s.slot >= 0 else None
        if prefix is not None and s.out_ids:
            prefix.register(s.slot, s.prompt_ids + s.out_ids[:-1])

    def decode(self, seqs: list[Sequence]) -> Tensor:
        """Next-token logits (B, V) after each sequence's last token, sorted by slot in place."""
        w = seqs[0].weights
        self.metrics.batch.observe(len(seqs), model=self.name)
        seqs.sort(key=lambda s: s.slot)
        x = torch.tensor([[s.out_ids[-1]] for s in seqs], device=w.device)
        slots = [s.slot for s in seqs]
        lengths = w.cache.lengths.tolist()
        w.cache.reserve(slots, [lengths[i] + 1 for i in slots])  # a block for each row's new position
        packed = all(s.slot == i for i, s in enumerate(seqs))  # the usual case (see Weights.free_slot)
        rows = None if packed else torch.tensor([s.slot for s in seqs], device=w.device)
        if self.fault:
            self.fault.check("decode", seqs)
        # The compiled step is traced for packed rows; a gather (rows given) runs eager.
        return w.model.decode(x, w.cache, rows, step=self.decode_step if rows is None else None)
