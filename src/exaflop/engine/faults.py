"""Real faults on demand, for the fault-tolerance tests and for drills on a cluster.

    EXAFLOP_FAULT=sigkill@rank1:step6   rank 1 SIGKILLs itself before optimizer step 6
    EXAFLOP_FAULT=sigterm@rank0:step3   rank 0 receives SIGTERM (a preemption notice)
    EXAFLOP_FAULT=hang@rank1:step3      rank 1 stops answering collectives
    EXAFLOP_FAULT=sigkill@rank1:step4,await_join@step6
                                        under --elastic with a replacement: every member holds
                                        the boundary after step 6 until the replacement has
                                        registered (engine/elastic.py), so the rejoin test does
                                        not race the replacement's start-up
    EXAFLOP_FAULT=before_rename         (engine.checkpoint) die between shard write and rename
    EXAFLOP_FAULT=atomic_write:torn     (engine.checkpoint) die half-way through writing meta.json
                                        or `latest`; also atomic_write:before_fsync, :before_replace

    EXAFLOP_IMPORT_FAULT=slow:1.5       (drive import) every item takes 1.5 s longer, so a node
                                        lost mid-import is surely running one (the Ray drill)

Faults fire only in torchrun's first attempt (and never in an elastic replacement), so a
restarted job does not crash again at the same place; the signals are delivered to the process for real.

The server has its own, aimed at single requests so the others can be watched going on:

    EXAFLOP_SERVE_FAULT=start,decode@2  a request sent with `"user": "exaflop-fault:decode"`
                                        raises inside the engine's batched decode once it
                                        has 2 tokens (":start" as it starts); stages:
                                        start, prefill, decode, sample
"""

from __future__ import annotations

import os
import re
import signal
import time

_SPEC = re.compile(r"^(sigkill|sigterm|hang)@rank(\d+):step(\d+)$")


def _parse() -> tuple[str, int, int] | None:
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 or os.environ.get("EXAFLOP_ELASTIC_JOIN") == "1":
        return None  # a restarted group, or a replacement joining one, does not crash again
    for part in os.environ.get("EXAFLOP_FAULT", "").split(","):
        m = _SPEC.match(part.strip())
        if m is not None:
            return m.group(1), int(m.group(2)), int(m.group(3))
    return None


def maybe_inject(step: int, rank: int) -> None:
    """Called once per optimizer step (0-based `step`), before its forward passes."""
    spec = _parse()
    if spec is None or spec[1] != rank or spec[2] != step:
        return
    kind = spec[0]
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    else:
        # Die on torchrun's SIGTERM when it tears the group down, as a process stuck in a
        # kernel would (the trainer's handler would otherwise turn it into a checkpoint request).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        while True:  # a stuck kernel or a dead NIC looks like this from the other ranks
            time.sleep(3600)


_SERVE_SPEC = re.compile(r"^(start|prefill|decode|sample)(?:@(\d+))?$")
SERVE_FAULT_USER = "exaflop-fault"


class InjectedFault(RuntimeError):
    """Raised by a serve fault; a real exception, handled by the same code as any other."""


class ServeFault:
    """EXAFLOP_SERVE_FAULT (`STAGE[@TOKENS],...`), parsed once per engine.

    Only requests that ask for it are hit, with `"user": "exaflop-fault:STAGE"`, so one
    server can drill every stage while ordinary requests run beside the failing ones.
    """

    def __init__(self, spec: str) -> None:
        self.after: dict[str, int] = {}
        for part in spec.split(","):
            m = _SERVE_SPEC.match(part.strip())
            if m is None:
                raise ValueError(f"EXAFLOP_SERVE_FAULT={spec!r}: expected STAGE[@TOKENS][,...] with STAGE one "
                                 "of start, prefill, decode, sample")
            self.after[m.group(1)] = int(m.group(2) or 0)

    @classmethod
    def from_env(cls) -> ServeFault | None:
        spec = os.environ.get("EXAFLOP_SERVE_FAULT", "")
        return cls(spec) if spec else None

    def check(self, stage: str, seqs: list) -> None:
        """Raise if `seqs` (engine Sequences) holds a request marked for this stage."""
        after = self.after.get(stage)
        if after is None:
            return
        for s in seqs:
            if s.handle.user == f"{SERVE_FAULT_USER}:{stage}" and len(s.out_ids) >= after:
                raise InjectedFault(f"injected {stage} fault (EXAFLOP_SERVE_FAULT) after {len(s.out_ids)} tokens")


class Drills:
    """The trainer's drills and test aids, in one place instead of the loop body:

    - `EXAFLOP_FAULT` process faults (sigkill / sigterm / hang) before a step;
    - `train.inject_nan_at_step`: poison one gradient after that step's backward;
    - sample recording (`record_samples` or `EXAFLOP_RECORD_SAMPLES=1`): each rank appends
      the global sample ids it trained on to `samples_rank<R>.jsonl`, for the exact-resume
      and elastic tests.
    """

    def __init__(self, rank: int, nan_at_step: int = -1, samples_path=None) -> None:
        self.rank, self.nan_at_step = rank, nan_at_step
        self._samples = None
        if samples_path is not None:
            samples_path.parent.mkdir(parents=True, exist_ok=True)  # rank 0 may not have made it yet
            self._samples = open(samples_path, "a")

    def before_step(self, step: int) -> None:
        maybe_inject(step, self.rank)

    def on_batch(self, step: int, batch: dict) -> None:
        if self._samples is not None:
            self._samples.write(f'{{"step": {step}, "ids": {batch["sample_ids"].tolist()}}}\n')
            self._samples.flush()  # a killed rank must leave what it consumed on disk

    def discard(self, step: int) -> None:
        """The micro-batches recorded for `step` were not applied (the group re-formed mid-step)."""
        if self._samples is not None:
            self._samples.write(f'{{"step": {step}, "discard": true}}\n')
            self._samples.flush()

    def after_backward(self, step: int, model) -> None:
        if step == self.nan_at_step:
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))

    def close(self) -> None:
        if self._samples is not None:
            self._samples.close()


def slow_item() -> None:
    """EXAFLOP_IMPORT_FAULT=slow:SECONDS: hold each imported item that long before converting it."""
    spec = os.environ.get("EXAFLOP_IMPORT_FAULT", "")
    if spec.startswith("slow:"):
        time.sleep(float(spec.split(":", 1)[1]))

