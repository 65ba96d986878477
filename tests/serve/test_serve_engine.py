"""The batching engine in-process: a sequence that cannot start fails alone."""

from __future__ import annotations

import threading

import torch

from exaflop.serve.engine import Engine
from exaflop.serve.metrics import Metrics
from exaflop.serve.reload import load_weights
from exaflop.serve.sequence import Event, Handle, SamplingParams, Sequence


def test_a_sequence_that_fails_to_start_fails_alone(run_dir):
    w = load_weights(run_dir, run_dir, torch.device("cpu"), None)
    engine = Engine("m", Metrics(), max_running=4)
    engine.swap(w)
    events: dict[str, list[Event]] = {"bad": [], "good": []}
    done = threading.Event()

    def collect(name: str):
        def deliver(ev: Event) -> None:
            events[name].append(ev)
            if all(e and e[-1].finish_reason for e in events.values()):
                done.set()
        return deliver

    # A logit_bias id past the vocabulary gets past no API check (the API refuses it with a
    # 400), but if one did, building its bias row raises inside the engine thread.
    bad = Sequence(Handle(collect("bad")), 0, [7, 8, 9],
                   SamplingParams(max_tokens=4, temperature=0, logit_bias={10**6: 1.0}))
    good = Sequence(Handle(collect("good")), 0, [7, 8, 9], SamplingParams(max_tokens=4, temperature=0))
    engine.start()
    try:
        engine.submit([bad, good])
        assert done.wait(60), events
    finally:
        engine.stop()
    assert events["bad"][-1].finish_reason == "error" and "IndexError" in events["bad"][-1].error
    assert events["good"][-1].finish_reason == "length" and events["good"][-1].completion_tokens == 4
    assert engine.running == [] and w.owners == []  # the failed sequence's slot was given back
