"""`exaflop export RUN OUT --format hf`: a directory transformers loads as LlamaForCausalLM
(dense runs) or MixtralForCausalLM (mixture-of-experts runs, Mixtral's per-expert layout).

    OUT/config.json              LlamaConfig (RMSNorm, RoPE, SwiGLU, GQA map one to one)
    OUT/generation_config.json   stops at <|endoftext|> and the chat turn end <|end|>
    OUT/model.safetensors        fp32 weights under Hugging Face names
    OUT/tokenizer.json           the run's tokenizer, unchanged
    OUT/tokenizer_config.json    special tokens + the chat template of exaflop.lm.chat

No q/k permutation is needed: exaflop's RoPE rotates (first half, second half) of
each head like HF's `rotate_half`. The name map below is shared with `hf_import`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from exaflop.errors import UserError
from exaflop.lm.assets import tokenizer_dir
from exaflop.lm.chat import CHAT_TEMPLATE_JINJA, END, HF_TOKENIZER_CONFIG
from exaflop.lm.config import ModelConfig
from exaflop.lm.tokenizer import EOT

# An imported HF tokenizer keeps its own tokenizer_config.json next to tokenizer.json
# under this name, so exporting the fine-tuned model gives the original one back.
HF_GENERATION_CONFIG = "hf_generation_config.json"
PAD = "<|pad|>"


def unsupported_features(mcfg: ModelConfig, fmt: str = "gguf") -> list[str]:
    """Parts of an exaflop model the format cannot express (hf: Llama or Mixtral; gguf: llama)."""
    problems = []
    if mcfg.n_experts > 1 and fmt != "hf":
        problems.append(f"mixture-of-experts MLP (model.n_experts={mcfg.n_experts}, top_k={mcfg.top_k}); "
                        "Llama has one dense SwiGLU per block — export a dense model (n_experts=1)")
    return problems


def check_tokenizer(data_dir: Path) -> None:
    if not (data_dir / "tokenizer.json").is_file():
        raise UserError(f"export: the run's tokenizer {data_dir / 'tokenizer.json'} is missing")


def load_exportable(run: str | Path, fmt: str):
    """(cfg, model) of a language-model run whose architecture the format `fmt` can express."""
    from exaflop.engine.checkpoint import load_for_inference

    cfg, _task, model = load_for_inference(run)
    if cfg.task != "lm":
        raise UserError(f"export --format {fmt}: {run} is a {cfg.task!r} run; only language models export")
    problems = unsupported_features(cfg.model, fmt)
    if problems:
        raise UserError(f"export --format {fmt}: cannot express {problems[0]}")
    return cfg, model


def name_pairs(n_layer: int, tied: bool) -> list[tuple[str, str]]:
    """(exaflop state-dict name, Hugging Face Llama name) for every weight."""
    pairs = [("tok_emb.weight", "model.embed_tokens.weight")]
    for i in range(n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        pairs += [
            (b + "attn_norm.weight", h + "input_layernorm.weight"),
            (b + "attn.wq.weight", h + "self_attn.q_proj.weight"),
            (b + "attn.wk.weight", h + "self_attn.k_proj.weight"),
            (b + "attn.wv.weight", h + "self_attn.v_proj.weight"),
            (b + "attn.wo.weight", h + "self_attn.o_proj.weight"),
            (b + "mlp_norm.weight", h + "post_attention_layernorm.weight"),
            (b + "mlp.w1.weight", h + "mlp.gate_proj.weight"),
            (b + "mlp.w3.weight", h + "mlp.up_proj.weight"),
            (b + "mlp.w2.weight", h + "mlp.down_proj.weight"),
        ]
    pairs.append(("norm.weight", "model.norm.weight"))
    if not tied:  # tied: HF re-ties lm_head to embed_tokens from tie_word_embeddings
        pairs.append(("lm_head.weight", "lm_head.weight"))
    return pairs


def moe_pairs(n_layer: int, n_experts: int) -> list[tuple[str, int | None, str]]:
    """(exaflop name, expert index or None, Mixtral name): exaflop stacks the experts,
    (E, C, F) for gate/up and (E, F, C) for down; Mixtral keeps one Linear per expert,
    weight (F, C) / (C, F), i.e. each expert's slice transposed."""
    out: list[tuple[str, int | None, str]] = []
    for i in range(n_layer):
        b, h = f"blocks.{i}.mlp.", f"model.layers.{i}.block_sparse_moe."
        out.append((b + "router.weight", None, h + "gate.weight"))
        for e in range(n_experts):
            out += [(b + w, e, f"{h}experts.{e}.{w}.weight") for w in ("w1", "w3", "w2")]
    return out


def to_hf_state(state: dict[str, torch.Tensor], mcfg: ModelConfig) -> dict[str, torch.Tensor]:
    def fp32(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float32).contiguous()

    moe = mcfg.n_experts > 1
    out = {hf: fp32(state[ours]) for ours, hf in name_pairs(mcfg.n_layer, mcfg.tie_embeddings)
           if not (moe and ".mlp." in hf)}
    if moe:
        for ours, e, hf in moe_pairs(mcfg.n_layer, mcfg.n_experts):
            out[hf] = fp32(state[ours] if e is None else state[ours][e].t())
    return out


def special_token_ids(data_dir: Path) -> dict[str, int | None]:
    """eos / end-of-turn / pad ids: exaflop's special tokens, else an imported tokenizer's own."""
    tok = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    ids = {"eos": tok.token_to_id(EOT), "end": tok.token_to_id(END), "pad": tok.token_to_id(PAD)}
    imported = data_dir / HF_TOKENIZER_CONFIG
    if imported.is_file():
        hf_tc = json.loads(imported.read_text())
        for key, field in (("eos", "eos_token"), ("pad", "pad_token")):
            token = hf_tc.get(field)
            token = token.get("content") if isinstance(token, dict) else token
            if ids[key] is None and isinstance(token, str):
                ids[key] = tok.token_to_id(token)
    return ids


def hf_config(mcfg: ModelConfig, ids: dict[str, int | None]) -> dict[str, Any]:
    moe = mcfg.n_experts > 1
    extra = {"num_local_experts": mcfg.n_experts, "num_experts_per_tok": mcfg.top_k,
             "output_router_logits": False, "router_aux_loss_coef": mcfg.moe_aux_coef,
             "router_jitter_noise": 0.0, "sliding_window": None} if moe else {}
    return {
        "architectures": ["MixtralForCausalLM" if moe else "LlamaForCausalLM"],
        "model_type": "mixtral" if moe else "llama",
        **extra,
        "vocab_size": mcfg.vocab_size,
        "hidden_size": mcfg.d_model,
        "intermediate_size": mcfg.d_ff,
        "num_hidden_layers": mcfg.n_layer,
        "num_attention_heads": mcfg.n_head,
        "num_key_value_heads": mcfg.n_kv_head,
        "head_dim": mcfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": mcfg.seq_len,
        "rms_norm_eps": mcfg.norm_eps,
        # Both spellings: transformers >= 5 reads rope_parameters, older tools (vLLM) rope_theta.
        "rope_theta": mcfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": mcfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": mcfg.tie_embeddings,
        "initializer_range": mcfg.init_std,
        "bos_token_id": ids["eos"],  # exaflop adds no BOS; documents are separated by EOT
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "torch_dtype": "float32",
        "use_cache": True,
    }


def generation_config(ids: dict[str, int | None]) -> dict[str, Any]:
    stops = [i for i in (ids["eos"], ids["end"]) if i is not None]
    return {"bos_token_id": ids["eos"], "eos_token_id": stops, "pad_token_id": ids["pad"],
            "do_sample": True, "temperature": 0.8, "top_p": 0.95}


def write_tokenizer(data_dir: Path, out: Path, seq_len: int, ids: dict[str, int | None]) -> None:
    """tokenizer.json + tokenizer_config.json (with the chat template) into `out`."""
    shutil.copyfile(data_dir / "tokenizer.json", out / "tokenizer.json")
    imported = data_dir / HF_TOKENIZER_CONFIG
    if imported.is_file():  # came from `exaflop import hf`: give the original back
        shutil.copyfile(imported, out / "tokenizer_config.json")
        return
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": seq_len,
        "bos_token": None,
        "eos_token": EOT,
        "pad_token": PAD if ids["pad"] is not None else None,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE_JINJA,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: v for k, v in (("eos_token", EOT), ("pad_token", config["pad_token"])) if v}, indent=1))


def export(run: str | Path, out: str | Path) -> Path:
    from safetensors.torch import save_file

    cfg, model = load_exportable(run, "hf")
    mcfg = cfg.model
    bias = max((float(m.expert_bias.abs().max()) for m in model.moe_layers()), default=0.0)
    if bias > 0:
        from exaflop.progress import console

        # Mixtral routes on the router's probabilities alone: the balancing bias has no place.
        console.print(f"[yellow]export --format hf: the MoE routing bias (max |bias| {bias:.3g}) has no "
                      "Mixtral equivalent and is left out: where it decided a token's experts, "
                      "transformers routes differently from exaflop")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"export --format hf: {out} is a file; give a directory")
    out.mkdir(parents=True, exist_ok=True)
    data_dir = tokenizer_dir(cfg, model.run_dir)  # the run's own copy (lm/assets.py)
    check_tokenizer(data_dir)
    ids = special_token_ids(data_dir)
    write_tokenizer(data_dir, out, mcfg.seq_len, ids)
    state = to_hf_state(model.state_dict(), mcfg)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(mcfg, ids), indent=1))
    imported_gen = data_dir / HF_GENERATION_CONFIG
    gen = json.loads(imported_gen.read_text()) if imported_gen.is_file() else generation_config(ids)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=1))
    return out
