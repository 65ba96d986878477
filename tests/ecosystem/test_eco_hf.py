"""export --format hf: transformers loads the directory offline and computes the same logits."""

from __future__ import annotations

import json

import pytest
import torch

from exaflop.cli import main
from exaflop.engine.checkpoint import load_for_inference
from exaflop.lm.chat import render
from exaflop.lm.tokenizer import load_tokenizer

from .conftest import random_run

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tiny_run, tmp_path_factory):
    from exaflop.lm.hf import export

    return export(tiny_run, tmp_path_factory.mktemp("hf") / "tiny-hf")


def test_export_files(hf_dir):
    names = {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_key_value_heads"] == 2
    assert cfg["tie_word_embeddings"] is True


def test_transformers_logits_match(tiny_run, hf_dir):
    _, _, ours = load_for_inference(tiny_run)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = theirs(ids).logits
        b, _ = ours(ids)
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < 1e-4


def test_tokenizer_and_chat_template(eco_data, hf_dir):
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    tok = load_tokenizer(eco_data / "tokenizer.json")
    text = "the quick brown fox <|end|> returns dicts"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False).ids
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == render(msgs)
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert tok.token_to_id("<|end|>") in gen["eos_token_id"]


def test_moe_run_exports_as_mixtral_and_imports_back(eco_data, tmp_path, capsys):
    from exaflop.lm.hf import export
    from exaflop.lm.hf_import import import_hf

    run = random_run(tmp_path, eco_data, "moe", n_experts=4, top_k=2, d_ff=64)
    out = export(run, tmp_path / "moe-hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"]
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["intermediate_size"]) == (4, 2, 64)
    _, _, ours = load_for_inference(run)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "MixtralForCausalLM"
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, (b, _) = theirs(ids).logits, ours(ids)
    assert (a - b).abs().max().item() < 1e-4
    # ...and back: the imported run computes the same logits as the original.
    back = import_hf(out, name="moe-back", out_dir=str(tmp_path / "runs2"), data_dir=str(tmp_path / "data2"))
    _, _, again = load_for_inference(back)
    assert again.cfg.n_experts == 4 and again.cfg.top_k == 2
    with torch.no_grad():
        assert (again(ids)[0] - b).abs().max().item() < 1e-5
    # llama.cpp's llama architecture has no experts: GGUF export still says so.
    assert main(["export", str(run), str(tmp_path / "out-gguf"), "--format", "gguf"]) == 2
    err = capsys.readouterr().err
    assert "mixture-of-experts" in err and "n_experts=4" in err and "Traceback" not in err
