"""export --format gguf, read back without llama.cpp: metadata, tokenizer, tensors, and a
numpy forward pass with llama.cpp's conventions (interleaved RoPE) that must equal exaflop's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from exaflop.cli import main
from exaflop.engine.checkpoint import load_for_inference
from exaflop.lm.gguf_export import interleave_heads

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def ggufs(tiny_run, tmp_path_factory):
    from exaflop.lm.gguf_export import export

    out = tmp_path_factory.mktemp("gguf")
    return {d: export(tiny_run, out / f"tiny-{d}.gguf", dtype=d) for d in ("f32", "f16", "bf16", "q8_0")}


def _field(reader, key):
    return reader.fields[key].contents()


def _tensors(reader) -> dict[str, np.ndarray]:
    """Name -> fp32 array in (out, in) layout, dequantized."""
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = np.asarray(data, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)])
    return out


def test_metadata_and_tokenizer(ggufs, eco_data):
    r = gguf.GGUFReader(ggufs["f32"])
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "llama.block_count") == 2
    assert _field(r, "llama.attention.head_count") == 4 and _field(r, "llama.attention.head_count_kv") == 2
    assert _field(r, "llama.rope.dimension_count") == 16
    assert _field(r, "tokenizer.ggml.model") == "gpt2" and _field(r, "tokenizer.ggml.pre") == "gpt-2"
    tj = json.loads((eco_data / "tokenizer.json").read_text())
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == 320  # padded to the model's vocab
    for text, i in tj["model"]["vocab"].items():
        assert tokens[i] == text
    assert tokens[300:] == [f"[PAD{i}]" for i in range(300, 320)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    assert _field(r, "tokenizer.ggml.merges") == merges
    types = _field(r, "tokenizer.ggml.token_type")
    end = next(t["id"] for t in tj["added_tokens"] if t["content"] == "<|end|>")
    assert types[end] == gguf.TokenType.CONTROL and _field(r, "tokenizer.ggml.eot_token_id") == end
    assert "<|assistant|>" in _field(r, "tokenizer.chat_template")


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_tensors_round_trip(ggufs, tiny_run, dtype):
    r = gguf.GGUFReader(ggufs[dtype])
    T = gguf.GGMLQuantizationType
    want_type = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[dtype]
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.attn_norm.weight"] == T.F32  # norms stay f32
    assert types["blk.1.ffn_down.weight"] == want_type
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    _, _, model = load_for_inference(tiny_run)
    sd = model.state_dict()
    got = _tensors(r)
    pairs = {"token_embd.weight": sd["tok_emb.weight"], "blk.0.ffn_gate.weight": sd["blocks.0.mlp.w1.weight"],
             "blk.1.attn_q.weight": interleave_heads(sd["blocks.1.attn.wq.weight"], 4),
             "blk.1.attn_k.weight": interleave_heads(sd["blocks.1.attn.wk.weight"], 2)}
    for name, want in pairs.items():
        want = want.numpy()
        err = np.abs(got[name] - want)
        if dtype == "f32":
            assert err.max() == 0
        elif dtype == "q8_0":  # blocks of 32 share one f16 scale d: error <= d/2 + 127·d·2^-11
            blocks = np.abs(want).reshape(-1, 32).max(1, keepdims=True) / 127
            assert (err.reshape(-1, 32) <= blocks * 0.6 + 1e-6).all()  # + the f16 rounding of the scale
        else:
            assert err.max() <= np.abs(want).max() * (2 ** -8 if dtype == "bf16" else 2 ** -11)


def _llama_cpp_style_forward(w: dict[str, np.ndarray], ids: list[int], n_head: int, n_kv: int,
                             theta: float, eps: float) -> np.ndarray:
    """What llama.cpp computes for the llama arch, in numpy: RoPE over adjacent pairs (2i, 2i+1)."""
    x = w["token_embd.weight"][ids].astype(np.float64)
    T, C = x.shape
    D = C // n_head
    ang = np.arange(T)[:, None] * theta ** (-np.arange(0, D, 2) / D)[None]  # (T, D/2)
    cos, sin = np.cos(ang), np.sin(ang)

    def norm(v, g):
        return v / np.sqrt((v ** 2).mean(-1, keepdims=True) + eps) * g

    def rope(v):  # (T, H, D), adjacent pairs
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2] = a * cos[:, None] - b * sin[:, None]
        out[..., 1::2] = b * cos[:, None] + a * sin[:, None]
        return out

    n_layer = len([k for k in w if k.endswith("attn_q.weight")])
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(n_layer):
        def g(n: str, i: int = i) -> np.ndarray:
            return w[f"blk.{i}.{n}.weight"]

        h = norm(x, g("attn_norm"))
        q = rope((h @ g("attn_q").T).reshape(T, n_head, D))
        k = rope((h @ g("attn_k").T).reshape(T, n_kv, D)).repeat(n_head // n_kv, axis=1)
        v = (h @ g("attn_v").T).reshape(T, n_kv, D).repeat(n_head // n_kv, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(D) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", p, v).reshape(T, C) @ g("attn_output").T
        h = norm(x, g("ffn_norm"))
        gate = h @ g("ffn_gate").T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ g("ffn_up").T)) @ g("ffn_down").T
    x = norm(x, w["output_norm.weight"])
    return x @ w.get("output.weight", w["token_embd.weight"]).T


def test_llama_cpp_conventions_reproduce_logits(ggufs, tiny_run):
    r = gguf.GGUFReader(ggufs["f32"])
    _, _, model = load_for_inference(tiny_run)
    ids = list(range(3, 40))
    ref = _llama_cpp_style_forward(_tensors(r), ids, 4, 2, _field(r, "llama.rope.freq_base"),
                                   _field(r, "llama.attention.layer_norm_rms_epsilon"))
    with torch.no_grad():
        ours, _ = model(torch.tensor([ids]))
    assert np.abs(ours[0].numpy() - ref).max() < 1e-4


def test_cli_export_gguf(tiny_run, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", str(tiny_run), str(out), "--format", "gguf", "--dtype", "q8_0"]) == 0
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert not list(tmp_path.glob(".*.tmp"))
    assert main(["export", str(tiny_run), str(tmp_path), "--format", "gguf"]) == 2
    assert "is a directory" in capsys.readouterr().err
