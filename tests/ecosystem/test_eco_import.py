"""import hf: a tiny random transformers Llama -> exaflop run -> same logits -> trains -> exports back."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from exaflop.cli import main
from exaflop.config import load_config_file
from exaflop.engine.checkpoint import load_for_inference

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402


def make_hf_llama(out, tokenizer_json, **overrides):
    """A random tiny LlamaForCausalLM with features exaflop must map: GQA, untied head, rope_theta."""
    cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=320, max_position_embeddings=64, rope_theta=5000.0,
               rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg, **overrides}))
    model.save_pretrained(out)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token="<|endoftext|>")
    tok.save_pretrained(out)
    return model.eval()


@pytest.fixture(scope="module")
def hf_src(eco_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("hfsrc") / "tiny-llama"
    make_hf_llama(out, eco_data / "tokenizer.json")
    return out


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out[0]


def test_import_train_export_round_trip(hf_src, eco_data, tmp_path):
    runs = tmp_path / "runs"
    assert main(["import", "hf", str(hf_src), "--name", "ft", "--out-dir", str(runs),
                 "--data-dir", str(tmp_path / "data-ft"), "--set", "run.dtype=fp32"]) == 0
    run = runs / "ft"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_src, dtype=torch.float32).eval()
    _, _, ours = load_for_inference(run)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    assert (_logits(theirs, ids) - _logits(ours, ids)).abs().max() < 1e-4

    # Import then export with no training in between gives the very same tensors back.
    same = tmp_path / "same"
    assert main(["export", str(run), str(same), "--format", "hf"]) == 0
    a, b = load_file(hf_src / "model.safetensors"), load_file(same / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("tokenizer_config.json", "generation_config.json"):
        assert json.loads((same / name).read_text()) == json.loads((hf_src / name).read_text())

    # Fine-tune: the trainer resumes from the step-0 checkpoint with a fresh optimizer.
    from exaflop.engine.trainer import train

    cfg = load_config_file(run / "config.toml")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(eco_data)}),
                                 "train": cfg.train.model_copy(update={"steps": 3, "global_batch": 4,
                                                                        "micro_batch": 4}),
                                 "eval": cfg.eval.model_copy(update={"batches": 1})})
    result = train(cfg, resume=True, quiet=True)
    assert result["step"] == 3
    _, _, tuned = load_for_inference(run)
    assert not torch.equal(tuned.blocks[0].attn.wq.weight, ours.blocks[0].attn.wq.weight)

    # ... and serves: the sampler (which the server shares) loads the run and its tokenizer.
    from exaflop.lm.sample import sample_text

    assert isinstance(sample_text(run, "the quick", max_new_tokens=4, temperature=0), str)

    back = tmp_path / "back"
    assert main(["export", str(run), str(back), "--format", "hf"]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    assert (_logits(reloaded, ids) - _logits(tuned, ids)).abs().max() < 1e-4


def test_import_run_for_sft(tiny_run, tmp_path):
    assert main(["import", "run", str(tiny_run), "--name", "chat", "--out-dir", str(tmp_path),
                 "--config", "lm-sft-tiny"]) == 0
    cfg = load_config_file(tmp_path / "chat" / "config.toml")
    assert cfg.data.sft_path == "builtin:stdlib-docs" and cfg.model.d_model == 64
    _, _, src = load_for_inference(tiny_run)
    _, _, new = load_for_inference(tmp_path / "chat")
    assert torch.equal(src.tok_emb.weight, new.tok_emb.weight)


def _broken_copy(hf_src, tmp_path, name="broken"):
    dst = tmp_path / name
    shutil.copytree(hf_src, dst)
    return dst


@pytest.mark.parametrize("damage, expect", [
    ("no_config", "has no config.json"),
    ("no_tokenizer", "has no tokenizer.json"),
    ("missing_tensor", "tensor model.layers.1.mlp.down_proj.weight is missing"),
    ("truncated", "model.safetensors is corrupt or truncated"),
    ("missing_shard", "shard model-00002-of-00002.safetensors named in model.safetensors.index.json"),
    ("no_weights", "has no weights"),
    ("attention_bias", "attention_bias=true"),
    ("rope_scaling", "RoPE scaling 'llama3'"),
    ("not_llama", "'gpt2' model"),
])
def test_bad_hf_dirs_name_the_problem(hf_src, tmp_path, capsys, damage, expect):
    d = _broken_copy(hf_src, tmp_path)
    cfg_path = d / "config.json"
    cfg = json.loads(cfg_path.read_text())
    weights = d / "model.safetensors"
    if damage == "no_config":
        cfg_path.unlink()
    elif damage == "no_tokenizer":
        (d / "tokenizer.json").unlink()
    elif damage == "missing_tensor":
        state = load_file(weights)
        del state["model.layers.1.mlp.down_proj.weight"]
        save_file(state, str(weights))
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "missing_shard":
        state = load_file(weights)
        weights.unlink()
        names = sorted(state)
        first, second = names[: len(names) // 2], names[len(names) // 2:]
        save_file({k: state[k] for k in first}, str(d / "model-00001-of-00002.safetensors"))
        index = {"weight_map": {**{k: "model-00001-of-00002.safetensors" for k in first},
                                **{k: "model-00002-of-00002.safetensors" for k in second}}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    elif damage == "no_weights":
        weights.unlink()
    elif damage == "attention_bias":
        cfg_path.write_text(json.dumps({**cfg, "attention_bias": True}))
    elif damage == "rope_scaling":
        cfg_path.write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
    elif damage == "not_llama":
        cfg_path.write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    rc = main(["import", "hf", str(d), "--out-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "dd")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert expect in err and "Traceback" not in err and err.count("\n") == 1
