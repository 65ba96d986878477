"""`exaflop serve` where `auto` serves fp32 (PyTorch dispatching to AVX2, as on a CPU without fast
bf16): the default `--compile auto` decodes with the fp32 step operator (lm/fused_step.py), at
full speed from the start, and answers what the eager server answers, token for token, alone
and batched — a real server in a process capped to AVX2, through the official `openai` client."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from exaflop.nn.kernels import cpu_has

MODEL = "m"
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
PROMPTS = ["import json\n", "def load(path):\n    ", "class Decoder(", "x = [", "    return"]


def _texts(url: str, n: int) -> list[str]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

    def one(p: str) -> str:
        return client.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: decoded as one batch
        return list(pool.map(one, PROMPTS))


def test_fused_step_serves_what_the_eager_server_serves(run_dir, server, start_server):
    if not (cpu_has("avx2") and cpu_has("fma")):
        pytest.skip("the fp32 step operator needs AVX2 + FMA")
    # The kernels may be built for AVX2 first here (tens of seconds on a clean machine).
    s = start_server([run_dir], "--compile", "auto", "--threads", "2", "--max-running", "8", env=AVX2, timeout=300)
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
    one = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0)
    assert client.models.retrieve(MODEL).decode == "fused"
    assert "decoding with the fused fp32 step" in s.log.read_text()
    assert client.models.retrieve(MODEL).dtype == "float32"
    assert "huge pages for large tensors: " in s.log.read_text()
    if "huge pages for large tensors: on" in s.log.read_text():  # the weights in 2 MB pages
        with open(f"/proc/{s.proc.pid}/smaps_rollup") as f:
            assert [int(x.split()[1]) for x in f if x.startswith("AnonHugePages")][0] > 0
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0, stream=True) if c.choices)
    assert streamed == one.choices[0].text
    want = _texts(server.url, 24)  # the session's eager fp32 server (--compile off), full precision
    assert _texts(s.url, 24) == want
    assert one.choices[0].text == want[0]
