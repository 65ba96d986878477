"""GGUF -> llama.cpp (llama-cpp-python): it loads the file, tokenizes like exaflop, and greedy
generation of 32 tokens equals exaflop's. Runs whenever llama-cpp-python is installed
(`make test-all` installs it; building llama.cpp takes minutes)."""

from __future__ import annotations

import pytest
import torch

from exaflop.engine.checkpoint import load_for_inference
from exaflop.lm.tokenizer import load_tokenizer

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llamacpp

N_NEW = 32


def exaflop_greedy(model, prompt: list[int], n: int) -> list[int]:
    x, out = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(x)
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], 1)
    return out


def llama_greedy(path, prompt: list[int], n: int) -> list[int]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, verbose=False, seed=0)
    out = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(tok)
        if len(out) == n:
            break
    return out


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    from exaflop.lm.gguf_export import export

    out = tmp_path_factory.mktemp("llamacpp")
    return {d: export(tiny_run, out / f"tiny-{d}.gguf", dtype=d) for d in ("f32", "f16", "q8_0")}


def test_tokenizer_matches(exported, eco_data):
    tok = load_tokenizer(eco_data / "tokenizer.json")
    llm = llama_cpp.Llama(model_path=str(exported["f32"]), n_ctx=64, verbose=False, vocab_only=True)
    for text in ("the quick brown fox", "python modules return\n  values.", "<|user|>\nhi<|end|>\n"):
        ours = tok.encode(text, add_special_tokens=False).ids
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_greedy_32_tokens_equal(exported, tiny_run, eco_data, dtype):
    _, _, model = load_for_inference(tiny_run)
    if dtype == "f16":  # same rounded weights on both sides; compute stays fp32 in exaflop
        model = model.half().float()
    prompt = load_tokenizer(eco_data / "tokenizer.json").encode("the quick brown", add_special_tokens=False).ids
    assert llama_greedy(exported[dtype], prompt, N_NEW) == exaflop_greedy(model, prompt, N_NEW)


def test_q8_0_loads_and_generates(exported):
    assert len(llama_greedy(exported["q8_0"], [5, 40, 41], 8)) == 8
