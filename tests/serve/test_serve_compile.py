"""`serve --compile`: the torch.compile'd decode step gives the eager step's logits.

The only tests that compile (each compile costs seconds to tens of seconds on CPU),
kept to one model and one server.
"""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
import torch

from exaflop.serve.engine import Engine
from exaflop.serve.metrics import Metrics
from exaflop.serve.reload import load_weights

MODEL = "m"
NO_SPECIALS = {str(i): -100 for i in range(6)}


pytestmark = pytest.mark.compile


def serving_cache(w, slots: int):
    """The cache the engine thread would make (under inference mode, as take_slot does): the
    compile ran on a stand-in of the same sizes, never on it."""
    with torch.inference_mode():
        return w.ensure_cache(slots)


def grow(cache, rows: list[int], n: int) -> None:
    """Blocks for n more positions in each of `rows` of the server's paged cache (Runner does this)."""
    lengths = cache.lengths.tolist()
    cache.reserve(rows, [lengths[r] + n for r in rows])


def test_background_compile_beside_eager_decoding_switches_without_a_recompile(run_dir, tmp_path, monkeypatch):
    """`--compile auto`: prepare() returns at once; the engine decodes eagerly in the serving cache
    while the step compiles on a stand-in in another thread; the finished step then serves that
    cache with no further compile, and gives the eager logits."""
    # A cold on-disk cache, so the compile lasts long enough for eager steps beside it (and first in
    # this file, before anything compiled the step in this process).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    w = load_weights(run_dir, run_dir, torch.device("cpu"), None)
    from exaflop.lm.fused_step import fused_step_applies
    from exaflop.nn.packed import pack_for_inference

    if fused_step_applies(pack_for_inference(w.model)):  # prepare() packs it too (idempotent)
        pytest.skip("auto decodes an fp32 model with the step operator here (tests/serve/test_serve_fused.py)")
    engine = Engine("m", Metrics(), max_running=6, compile="auto")
    t0 = time.perf_counter()
    engine.prepare(w)
    assert time.perf_counter() - t0 < 10 and engine.runner.decode_mode == "compiling"
    compiling = engine.runner.compiling
    cache = serving_cache(w, 6)
    eager_cache = w.model.new_cache(cache.slots, cache.max_len)
    torch.manual_seed(1)
    steps_meanwhile = 0
    with torch.inference_mode():
        prompt = torch.randint(6, 300, (4, 5))
        grow(cache, [0, 1, 2, 3], 5)
        for c in (cache, eager_cache):
            w.model.decode(prompt, c)
        while engine.runner.compiling is not None and steps_meanwhile < 100_000:
            x = torch.randint(6, 300, (4, 1))
            grow(cache, [0, 1, 2, 3], 1)
            got = w.model.decode(x, cache, step=engine._decode_step)  # None (eager) until the switch
            want = w.model.decode(x, eager_cache)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            steps_meanwhile += 1
            if cache.lengths.max() >= cache.max_len - 2:  # long wait: start the rows over
                for c in (cache, eager_cache):
                    c.lengths.zero_()
    compiling.join()
    assert engine.runner.decode_mode == "compiled", "torch.compile failed on this machine (see the warning)"
    assert steps_meanwhile > 0  # the engine was not held up by the compile
    graphs = dict(torch._dynamo.utils.counters["stats"])
    with torch.inference_mode():
        for batch in (4, 3, 1):
            x = torch.randint(6, 300, (batch, 1))
            grow(cache, list(range(batch)), 1)
            got = w.model.decode(x, cache, step=engine._decode_step)
            want = w.model.decode(x, eager_cache)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert dict(torch._dynamo.utils.counters["stats"]) == graphs


def test_compiled_decode_step_matches_eager(run_dir):
    w = load_weights(run_dir, run_dir, torch.device("cpu"), None)
    engine = Engine("m", Metrics(), max_running=8, compile=True)
    engine.prepare(w)  # compiles for batches of 1 and of 2+
    assert engine._compiled, "torch.compile failed on this machine (see the warning above)"
    graphs = dict(torch._dynamo.utils.counters["stats"])
    assert graphs.get("unique_graphs", 0) >= 1  # the counter below is not vacuous
    torch.manual_seed(0)
    cache = serving_cache(w, 8)
    eager_cache = w.model.new_cache(cache.slots, cache.max_len)
    with torch.inference_mode():
        # Rows with prompts of different lengths, then decode steps with a batch that
        # changes size (all 8 slots, 5 rows, 3, then 1): the graphs must not assume one.
        lens = [3, 11, 7, 20, 5]
        for r, n in enumerate(lens):
            prompt = torch.randint(6, 300, (1, n))
            grow(cache, [r], n)
            for c in (cache, eager_cache):
                w.model.decode(prompt, c, torch.tensor([r]))
        assert cache.lengths[:5].tolist() == lens
        for batch in [8] * 2 + [5] * 6 + [3] * 4 + [1] * 3:
            x = torch.randint(6, 300, (batch, 1))
            grow(cache, list(range(batch)), 1)
            got = w.model.decode(x, cache, step=engine._decode_step)
            want = w.model.decode(x, eager_cache)  # the dense cache, eager
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        # Nothing was compiled while serving: prepare() covered every batch size.
        assert dict(torch._dynamo.utils.counters["stats"]) == graphs
        # The written keys agree too.
        from exaflop.nn.paged import gather
        for kt, vp, b in zip(cache.keys, cache.values, eager_cache.k, strict=True):
            k, _ = gather(kt, vp, cache.table[:5], 2)
            for r, n in enumerate(cache.lengths[:5].tolist()):
                torch.testing.assert_close(k[r, :, :n], b[r, :, :n], atol=1e-5, rtol=1e-5)
    # A hot reload brings a new model object (loaded by the reloader thread, outside
    # inference mode) and a new KV cache (made by the engine thread, inside it) of the
    # same architecture: prepare() has nothing to do and the same graphs serve it.
    w2 = load_weights(run_dir, run_dir, torch.device("cpu"), None)
    engine.prepare(w2)
    with torch.inference_mode():
        cache2 = w2.ensure_cache(8)
        x = torch.randint(6, 300, (4, 1))
        grow(cache2, [0, 1, 2, 3], 1)
        got = w2.model.decode(x, cache2, step=engine._decode_step)
        cache2.lengths.zero_()
        want = w2.model.decode(x, cache2)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert dict(torch._dynamo.utils.counters["stats"]) == graphs



def test_compiled_bf16_step_calls_the_packed_kernel_from_cpp(run_dir):
    """bf16 (packed oneDNN weights where the CPU has them): the compiled step gets a C++ wrapper
    calling the packed kernel directly, and its logits are the eager step's within bf16 rounding
    (inductor fuses across points where eager rounds to bf16)."""
    from exaflop.nn.packed import PackedLinear, row_kernel

    w = load_weights(run_dir, run_dir, torch.device("cpu"), torch.bfloat16)
    engine = Engine("m", Metrics(), max_running=4, compile=True)
    engine.prepare(w)
    assert engine._compiled and engine.runner.cpp_wrapper
    packed = [m.packed is not None for m in w.model.modules() if isinstance(m, PackedLinear)]
    assert packed and (all(packed) or not any(packed))  # oneDNN packs all or (old CPU) none
    torch.manual_seed(0)
    serving_cache(w, 4)
    eager_cache = w.model.new_cache(w.cache.slots, w.cache.max_len)
    with torch.inference_mode():
        prompt = torch.randint(6, 300, (3, 9))
        grow(w.cache, [0, 1, 2], 9)
        for c in (w.cache, eager_cache):
            w.model.decode(prompt, c)
        for batch in (3, 3, 1, 1):
            x = torch.randint(6, 300, (batch, 1))
            grow(w.cache, list(range(batch)), 1)
            got = w.model.decode(x, w.cache, step=engine._decode_step)
            want = w.model.decode(x, eager_cache)
            scale = want.abs().max()
            assert (got - want).abs().max() <= 0.05 * scale, (got - want).abs().max() / scale
        if row_kernel():  # one row: the compiled step calls exaflop's single-row kernel for every matrix
            grow(w.cache, [0], 1)
            with torch.profiler.profile() as prof:
                w.model.decode(torch.tensor([[7]]), w.cache, step=engine._decode_step)
            calls = sum(e.count for e in prof.key_averages() if e.key == "exaflop::linear_bf16_row")
            rows = [m for m in w.model.modules() if isinstance(m, PackedLinear) and m.row is not None]
            assert len(rows) == 2 * 4 + 1 and calls == len(rows), calls  # 2 layers x 4 matrices + the head


def test_compiled_int8_step_matches_eager_int8_at_both_kernels(run_dir):
    """`--quantize int8 --compile`: the compiled step agrees with the eager int8 step below and above
    INT8_KERNEL_ROWS (two kernels, one graph each, both compiled at load: nothing compiles later)."""
    from exaflop.nn.packed import INT8_KERNEL_ROWS

    w = load_weights(run_dir, run_dir, torch.device("cpu"), torch.bfloat16)
    engine = Engine("m", Metrics(), max_running=INT8_KERNEL_ROWS + 2, compile=True, quantize="int8")
    engine.prepare(w)
    assert engine._compiled and w.model.quantized == "int8"
    graphs = dict(torch._dynamo.utils.counters["stats"])
    torch.manual_seed(0)
    rows = INT8_KERNEL_ROWS + 2
    serving_cache(w, rows)
    eager_cache = w.model.new_cache(w.cache.slots, w.cache.max_len)
    with torch.inference_mode():
        prompt = torch.randint(6, 300, (rows, 9))
        grow(w.cache, list(range(rows)), 9)
        for c in (w.cache, eager_cache):
            w.model.decode(prompt, c)
        for batch in (rows, rows, 2, 1):
            x = torch.randint(6, 300, (batch, 1))
            grow(w.cache, list(range(batch)), 1)
            got = w.model.decode(x, w.cache, step=engine._decode_step)
            want = w.model.decode(x, eager_cache)
            scale = want.abs().max()
            assert (got - want).abs().max() <= 0.05 * scale, (got - want).abs().max() / scale
    assert dict(torch._dynamo.utils.counters["stats"]) == graphs


def test_server_with_compile_streams_concurrently(run_dir, start_server):
    s = start_server([run_dir], "--compile", "--max-running", "8", timeout=240)
    assert "decode step compiled" in s.log.read_text()

    async def run() -> list[openai.types.Completion]:
        ac = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        return await asyncio.gather(*(ac.completions.create(
            model=MODEL, prompt="def " * (1 + i), max_tokens=12 + i, temperature=0, logit_bias=NO_SPECIALS)
            for i in range(8)))

    results = asyncio.run(run())
    assert [r.usage.completion_tokens for r in results] == [12 + i for i in range(8)]
    assert all(r.choices[0].finish_reason == "length" for r in results)
    m = s.metrics()
    assert m['exaflop_requests_running{model="m"}'] == 0
    assert m['exaflop_decode_batch_size_count{model="m"}'] > 0


def test_server_by_default_answers_while_compiling_then_decodes_compiled(run_dir, start_server):
    """The default (`--compile auto`): /health is 200 before the compile is done and requests are
    answered eagerly meanwhile; once the model card says "compiled" the same greedy requests give
    the same tokens."""
    s = start_server([run_dir], "--compile", "auto", "--max-running", "4", timeout=120)
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)

    def ask() -> list[str]:
        return [client.completions.create(model=MODEL, prompt="def " * (1 + i), max_tokens=10, temperature=0,
                                          logit_bias=NO_SPECIALS).choices[0].text for i in range(3)]

    assert client.models.retrieve(MODEL).model_extra["decode"] in ("compiling", "compiled")
    before = ask()
    deadline = time.monotonic() + 300
    while client.models.retrieve(MODEL).model_extra["decode"] == "compiling":
        assert time.monotonic() < deadline, s.log.read_text()
        time.sleep(0.5)
    assert client.models.retrieve(MODEL).model_extra["decode"] == "compiled", s.log.read_text()
    log = s.log.read_text()
    assert "compiling the decode step in the background" in log and "decode step compiled" in log
    assert ask() == before


CAPPED_STEP = """
import torch
from exaflop.config import load_config
from exaflop.engine.precision import compile_cache_per_isa
from exaflop.lm.model import LM
from exaflop.nn.packed import pack_for_inference

compile_cache_per_isa()
torch.manual_seed(0)
m = LM(load_config("lm-tiny", []).model).eval()
pack_for_inference(m)
step = torch.compile(LM.logits_at, dynamic=True)
with torch.inference_mode():
    c1, c2 = m.new_cache(4, 128), m.new_cache(4, 128)
    x = torch.randint(6, 300, (2, 5))
    m.decode(x, c1), m.decode(x, c2)
    t = torch.randint(6, 300, (2, 1))
    print(float((m.decode(t, c1, step=step) - m.decode(t, c2)).abs().max()))
"""


def test_a_capped_process_does_not_load_the_native_compiled_step(tmp_path):
    """The same machine compiles the step at full ISA, then a process capped to AVX2 compiles it
    again with the same (default) cache location: the capped step must be its own, not the
    cached native one (which gave NaN logits before caches were kept per ISA)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TMPDIR": str(tmp_path)}  # a fresh default cache directory
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    for extra in ({}, {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}):
        out = subprocess.run([sys.executable, "-c", CAPPED_STEP], env={**env, **extra}, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        assert float(out.stdout.split()[-1]) < 1e-4, (extra, out.stdout)
