"""Pieces of the server that need no server: stop-string holdback, chat encoding, metrics."""

from __future__ import annotations

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exaflop.lm.chat import CHAT_TEMPLATE_JINJA, render
from exaflop.serve.api import encode_chat
from exaflop.serve.metrics import Histogram, Metrics
from exaflop.serve.sequence import Handle, SamplingParams, Sequence, byte_decoder


class FakeWeights:
    """Token i is the i-th chunk of bytes; id 0 is a special (stop) token."""

    def __init__(self, chunks: list[bytes]):
        self.chunks = [b""] + chunks
        self.stop_ids = frozenset({0})
        self.ctx = 10_000

    def token_bytes(self, t: int) -> bytes:
        return self.chunks[t]


def _run(text: str, cuts: list[int], stops: list[str]) -> tuple[list[str], str | None]:
    raw = text.encode()
    cuts = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
    chunks = [raw[a:b] for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
    w = FakeWeights(chunks)
    seq = Sequence(Handle(lambda ev: None), 0, [1], SamplingParams(max_tokens=max(1, len(chunks)),
                                                                  stop=tuple(stops)))
    seq.weights = w
    pieces, finish = [], None
    for tok in range(1, len(chunks) + 1):
        ev = seq.add_token(tok, None)
        if ev is not None:
            pieces.append(ev.text)
            finish = ev.finish_reason
            if finish:
                break
    return pieces, finish


alphabet = st.sampled_from(list("ab c\né日€"))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(text=st.text(alphabet, min_size=1, max_size=30), cuts=st.lists(st.integers(0, 200), max_size=30),
       stops=st.lists(st.text(alphabet, min_size=1, max_size=4), min_size=1, max_size=4))
def test_stop_strings_never_leak_and_cut_exactly(text, cuts, stops):
    pieces, finish = _run(text, cuts, stops)
    out = "".join(pieces)
    assert text.startswith(out)  # no U+FFFD halves of split characters, nothing invented
    assert not any(s in out for s in stops)
    if any(s in text for s in stops):
        assert finish == "stop" and any(text[len(out):].startswith(s) for s in stops)
    else:
        assert finish == "length" and out == text


def test_stop_split_over_tokens_is_held_then_released():
    pieces, finish = _run("hello world", [3, 5, 7], ["lo w!"])  # 'lo w' looks like the stop, then isn't
    assert "".join(pieces) == "hello world" and finish == "length"
    assert pieces[0] == "he"  # the 'l' is held back: it could begin the stop string


def test_byte_decoder_is_a_bijection():
    table = byte_decoder()
    assert sorted(table.values()) == list(range(256)) and len(table) == 256


def test_chat_encoding_matches_the_template(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f(x):\n  return x"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": " spaced "}]
    pairs = [(m["role"], m["content"]) for m in msgs]
    assert encode_chat(tokenizer, pairs) == tokenizer.encode(render(msgs), add_special_tokens=False).ids
    assert jinja2.Template(CHAT_TEMPLATE_JINJA).render(messages=msgs, add_generation_prompt=True) == render(msgs)
    # Typed-in markers stay text: only the real turn boundaries are special tokens.
    end_id = tokenizer.token_to_id("<|end|>")
    ids = encode_chat(tokenizer, [("user", "a<|end|>b")])
    assert ids.count(end_id) == 1


def test_metrics_text_format():
    m = Metrics()
    m.requests.inc(route="/v1/completions", status="200")
    m.running.set(3, model="m")
    for v in (0.002, 0.2, 5.0):
        m.ttft.observe(v, model="m")
    text = m.render()
    assert '# TYPE exaflop_time_to_first_token_seconds histogram' in text
    assert 'exaflop_requests_total{route="/v1/completions",status="200"} 1' in text
    assert 'exaflop_requests_running{model="m"} 3' in text
    assert 'exaflop_time_to_first_token_seconds_bucket{model="m",le="+Inf"} 3' in text
    assert 'exaflop_time_to_first_token_seconds_bucket{model="m",le="0.25"} 2' in text
    h = Histogram("x", "y", [1])
    h.observe(0.5, label='a"b')
    assert 'label="a\\"b"' in "\n".join(h.lines())
    # Buckets are cumulative and inclusive (value <= le), as Prometheus defines them.
    h = Histogram("h", "y", [0.1, 1, 10])
    h.observe_many([0.1, 0.5, 1.0, 98.0, 0.4], model="m")
    lines = h.lines()
    for le, n in (("0.1", 1), ("1", 4), ("10", 4), ("+Inf", 5)):
        assert f'h_bucket{{model="m",le="{le}"}} {n}' in lines
    assert 'h_count{model="m"} 5' in lines and 'h_sum{model="m"} 100' in lines


def test_in_fresh_thread_returns_raises_and_keeps_the_callers_threads():
    """serve/threads.py: heavy jobs run in a thread that ends with them, with their own torch threads."""
    import threading

    import torch

    from exaflop.serve.threads import in_fresh_thread

    before = torch.get_num_threads()
    try:
        seen = in_fresh_thread(lambda: (threading.current_thread() is not threading.main_thread(),
                                        torch.get_num_threads()), threads=1)
        assert seen == (True, 1)
        assert torch.get_num_threads() == before  # OpenMP's count is per thread: the caller's is unchanged
    finally:
        torch.set_num_threads(before)  # MKL's count is process-wide: give it back to the other tests

    def fails() -> None:
        raise ValueError("checkpoint is broken")

    import pytest

    with pytest.raises(ValueError, match="broken"):
        in_fresh_thread(fails)


def test_compile_flag_defaults_to_compiling_beside_serving():
    """`--compile` is auto by default; bare it means on (before serving, as it used to); off never."""
    import argparse

    from exaflop.serve.cli import add_parser
    from exaflop.serve.metrics import Metrics
    from exaflop.serve.runner import Runner

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    for extra, want in (([], "auto"), (["--compile"], "on"), (["--compile", "off"], "off"), (["--compile", "on"], "on")):
        assert parser.parse_args(["serve", "runs/x", *extra]).compile == want
    assert Runner("m", Metrics(), True).compile == "on" and Runner("m", Metrics(), False).compile == "off"
    assert Runner("m", Metrics(), "auto").decode_mode == "eager"  # nothing started before prepare()
    with pytest.raises(ValueError, match="compile='fast'"):
        Runner("m", Metrics(), "fast")


def test_greedy_argmax_is_torchs_for_every_row():
    """sampling._argmax (numpy's serial argmax for CPU fp32 logits) picks what torch.argmax picks:
    the first of equal maxima, a NaN as the largest, a row of -inf but one allowed token (a
    grammar's mask), +inf; bf16 logits go through torch itself."""
    import torch

    from exaflop.serve.sampling import _argmax

    torch.manual_seed(3)
    x = torch.randn(7, 4096)
    x[1, 7] = x[1, 3] = float("nan")
    x[2] = float("-inf")
    x[3, 5] = x[3, 9] = x[3].max() + 1
    x[4] = float("-inf")
    x[4, 11] = 0.0
    x[5, 2] = float("inf")
    want = x.argmax(-1).tolist()
    assert _argmax(x) == want == [want[0], 3, 0, 5, 11, 2, want[6]]
    assert _argmax(x[:, :100].t().contiguous().t()) == x[:, :100].argmax(-1).tolist()  # strided rows
    assert _argmax(x[[0, 6]].bfloat16()) == x[[0, 6]].bfloat16().argmax(-1).tolist()
