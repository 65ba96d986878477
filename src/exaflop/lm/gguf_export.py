"""`exaflop export RUN OUT.gguf --format gguf`: one file llama.cpp loads as a `llama` model.

Weights: f32, f16, bf16 or Q8_0 for the matrices (norms stay f32, as llama.cpp's own
converter does). Tokenizer: the byte-level BPE vocabulary and merges as a "gpt2"
tokenizer model, with the pre-tokenizer regex named so llama.cpp splits text the
way `tokenizers` does; exaflop's special tokens are CONTROL tokens.

RoPE layout: exaflop (like HF) rotates (x[i], x[i + D/2]) pairs; llama.cpp's llama
arch rotates adjacent (x[2i], x[2i+1]). Reordering the rows of wq and wk inside
each head makes the two identical (`interleave_heads`), the same change
llama.cpp's HF converter applies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exaflop.errors import UserError
from exaflop.lm.assets import tokenizer_dir
from exaflop.lm.chat import CHAT_TEMPLATE_JINJA
from exaflop.lm.config import ModelConfig
from exaflop.lm.hf import HF_TOKENIZER_CONFIG, check_tokenizer, load_exportable, special_token_ids

DTYPES = ("f32", "f16", "bf16", "q8_0")

# Pre-tokenizer regexes llama.cpp knows, by its name for them.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def interleave_heads(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection, per head, from half-split order to interleaved pairs.

    Within a head of dim D, output row 2i takes row i and row 2i+1 takes row i + D/2,
    so a rotation of adjacent pairs acts exactly like the half-split rotation did.
    """
    rows, cols = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, 2, d // 2, cols).transpose(1, 2).reshape(rows, cols)


def gguf_tensors(state: dict[str, torch.Tensor], mcfg: ModelConfig) -> list[tuple[str, np.ndarray]]:
    """(llama.cpp tensor name, fp32 array in PyTorch (out, in) layout) for every weight."""
    def a(name: str) -> np.ndarray:
        return state[name].detach().to("cpu", torch.float32).numpy()

    out = [("token_embd.weight", a("tok_emb.weight"))]
    for i in range(mcfg.n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        wq = interleave_heads(state[b + "attn.wq.weight"].float(), mcfg.n_head).numpy()
        wk = interleave_heads(state[b + "attn.wk.weight"].float(), mcfg.n_kv_head).numpy()
        out += [
            (g + "attn_norm.weight", a(b + "attn_norm.weight")),
            (g + "attn_q.weight", wq),
            (g + "attn_k.weight", wk),
            (g + "attn_v.weight", a(b + "attn.wv.weight")),
            (g + "attn_output.weight", a(b + "attn.wo.weight")),
            (g + "ffn_norm.weight", a(b + "mlp_norm.weight")),
            (g + "ffn_gate.weight", a(b + "mlp.w1.weight")),
            (g + "ffn_up.weight", a(b + "mlp.w3.weight")),
            (g + "ffn_down.weight", a(b + "mlp.w2.weight")),
        ]
    out.append(("output_norm.weight", a("norm.weight")))
    if not mcfg.tie_embeddings:  # absent: llama.cpp reuses token_embd as the output matrix
        out.append(("output.weight", a("lm_head.weight")))
    return out


def encode_tensor(arr: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """(data, raw GGML type or None) for GGUFWriter.add_tensor."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if arr.ndim < 2 or dtype == "f32":
        return np.ascontiguousarray(arr, dtype=np.float32), None
    if dtype == "f16":
        return arr.astype(np.float16), None
    if dtype == "bf16":
        return quants.quantize(arr, Q.BF16), Q.BF16
    if arr.shape[-1] % 32:  # Q8_0 works in blocks of 32 along a row
        return arr.astype(np.float16), None
    return quants.quantize(arr, Q.Q8_0), Q.Q8_0


def pre_tokenizer_name(tj: dict[str, Any], path: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization, or a UserError naming what isn't expressible."""
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"export --format gguf: {path} is a {model.get('type')!r} tokenizer; "
                        "only byte-level BPE exports to GGUF")
    pre = tj.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        regexes = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
        byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
        if regexes == [LLAMA3_REGEX] and byte_level and not byte_level[0].get("use_regex", True):
            return "llama-bpe"
    raise UserError(f"export --format gguf: the pre-tokenizer of {path} ({json.dumps(pre)[:120]}) has no "
                    "llama.cpp equivalent; supported: GPT-2 byte-level and Llama-3 regex")


def tokenizer_metadata(data_dir: Path, vocab_size: int) -> dict[str, Any]:
    """Tokens, types, merges and special ids as llama.cpp's gpt2 tokenizer reads them."""
    from gguf import TokenType

    check_tokenizer(data_dir)
    path = data_dir / "tokenizer.json"
    tj = json.loads(path.read_text())
    pre = pre_tokenizer_name(tj, path)
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    special = set()
    for t in tj.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        if t.get("special"):
            special.add(t["id"])
    n_tok = max(vocab.values()) + 1
    if n_tok > vocab_size:
        raise UserError(f"export: {path} has {n_tok} tokens but model.vocab_size is {vocab_size}")
    # Rows of the embedding beyond the tokenizer (vocab padded for speed) become unused tokens.
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(TokenType.UNUSED)] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = int(TokenType.CONTROL if i in special else TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    chat_template, hf_cfg = CHAT_TEMPLATE_JINJA, data_dir / HF_TOKENIZER_CONFIG
    if hf_cfg.is_file():
        chat_template = json.loads(hf_cfg.read_text()).get("chat_template") or None
    return {"pre": pre, "tokens": tokens, "types": types, "merges": merges,
            "chat_template": chat_template, "ids": special_token_ids(data_dir)}


def write_gguf(path: Path, name: str, mcfg: ModelConfig, state: dict[str, torch.Tensor],
               tok: dict[str, Any], dtype: str) -> None:
    import gguf

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_file_type(int(file_type))
    if dtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(mcfg.vocab_size)
    w.add_context_length(mcfg.seq_len)
    w.add_embedding_length(mcfg.d_model)
    w.add_block_count(mcfg.n_layer)
    w.add_feed_forward_length(mcfg.d_ff)
    w.add_head_count(mcfg.n_head)
    w.add_head_count_kv(mcfg.n_kv_head)
    w.add_layer_norm_rms_eps(mcfg.norm_eps)
    w.add_rope_freq_base(mcfg.rope_theta)
    w.add_rope_dimension_count(mcfg.head_dim)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    ids = tok["ids"]
    if ids["eos"] is not None:
        w.add_bos_token_id(ids["eos"])  # exaflop adds no BOS (add_bos_token false below)
        w.add_eos_token_id(ids["eos"])
    if ids["end"] is not None:
        w.add_eot_token_id(ids["end"])  # chat turns end here: llama.cpp stops on it
    if ids["pad"] is not None:
        w.add_pad_token_id(ids["pad"])
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    if tok["chat_template"]:
        w.add_chat_template(tok["chat_template"])

    for tname, arr in gguf_tensors(state, mcfg):
        data, raw = encode_tensor(arr, dtype)
        w.add_tensor(tname, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def export(run: str | Path, out: str | Path, dtype: str = "f32") -> Path:
    if dtype not in DTYPES:
        raise UserError(f"export --dtype {dtype}: GGUF supports {', '.join(DTYPES)}")
    cfg, model = load_exportable(run, "gguf")
    mcfg = cfg.model
    out = Path(out)
    if out.is_dir():
        raise UserError(f"export --format gguf: {out} is a directory; give a file name like model.gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_metadata(tokenizer_dir(cfg, model.run_dir), mcfg.vocab_size)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        write_gguf(tmp, cfg.run.name, mcfg, model.state_dict(), tok, dtype)
        tmp.replace(out)  # never leave a half-written .gguf under the final name
    finally:
        tmp.unlink(missing_ok=True)
    return out
