"""`exaflop serve --quantize int8`: a real server on int8 weight-only matrices, through the
official `openai` client; and the clear refusal where int8 would only be slower (fp32)."""

from __future__ import annotations

import argparse

import openai
import pytest

from exaflop.errors import UserError

MODEL = "m"


def test_int8_server_streams_what_it_completes(run_dir, start_server):
    s = start_server([run_dir], "--dtype", "bf16", "--quantize", "int8", "--max-running", "4")
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
    kw = dict(model=MODEL, prompt="import json\n", max_tokens=12, temperature=0)
    whole = client.completions.create(**kw)
    assert whole.usage.completion_tokens > 0 and whole.choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    assert streamed == whole.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=6, temperature=0)
    assert chat.usage.completion_tokens > 0
    assert "int8 weight-only" in s.log.read_text()  # the start-up log says what is served
    card = client.models.retrieve(MODEL)  # and /v1/models (extension fields)
    assert (card.dtype, card.quantization, card.decode) == ("bfloat16", "int8", "eager")  # test servers: --compile off


def test_int8_refuses_fp32(run_dir):
    from exaflop.serve.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", str(run_dir), "--dtype", "fp32", "--quantize", "int8"])
    with pytest.raises(UserError, match=r"^--quantize int8: needs bf16"):
        args.func(args)


def test_bf16_kv_cache_serves_an_fp32_model(run_dir, start_server):
    """`--kv-dtype bf16` beside fp32 weights: the server completes and streams the same text, and
    says what it serves (start-up log, model card)."""
    s = start_server([run_dir], "--dtype", "fp32", "--kv-dtype", "bf16", "--max-running", "4")
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
    kw = dict(model=MODEL, prompt="import json\n", max_tokens=12, temperature=0)
    whole = client.completions.create(**kw)
    assert whole.usage.completion_tokens > 0
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    assert streamed == whole.choices[0].text
    assert "KV cache bfloat16" in s.log.read_text()
    card = client.models.retrieve(MODEL)
    assert (card.dtype, card.kv_cache_dtype) == ("float32", "bfloat16")
