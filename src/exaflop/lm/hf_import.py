"""`exaflop import hf DIR`: a local Hugging Face Llama checkpoint becomes an exaflop run.

    runs/<name>/config.toml                    model section from config.json
    runs/<name>/checkpoints/step_000000000/    the weights as a step-0 checkpoint
    data/<name>/tokenizer.json                 the model's own tokenizer
    data/<name>/hf_tokenizer_config.json       its tokenizer_config.json (export gives it back)
    data/<name>/manifest.json                  vocab and tokenizer hash, no shards yet

The run trains further with `exaflop train runs/<name>/config.toml --resume` (the
optimizer starts fresh) once text is tokenized with the model's tokenizer:
`exaflop data text --tokenizer data/<name>/tokenizer.json --out data/<name>-text` and
`--set data.path=data/<name>-text`. `exaflop sample` and `exaflop serve` use it as is.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from exaflop.errors import UserError
from exaflop.lm.assets import save_assets
from exaflop.lm.hf import HF_GENERATION_CONFIG, HF_TOKENIZER_CONFIG, moe_pairs, name_pairs

SUPPORTED_ARCHS = ("LlamaForCausalLM", "MixtralForCausalLM")
# Tensors HF checkpoints may carry that exaflop derives instead of storing.
DERIVED = ("rotary_emb.inv_freq",)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"import hf: {path.parent} has no {path.name}; give a directory written by "
                        "transformers' save_pretrained")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"import hf: {path} is not valid JSON ({e})") from None


def _rope_theta(hf: dict[str, Any], where: Path) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    # transformers >= 5 writes rope_parameters, older versions rope_scaling: either may scale.
    kinds = sorted({params.get("rope_type"), scaling.get("rope_type"), scaling.get("type")} - {None, "default"})
    if kinds:
        raise UserError(f"import hf: {where} uses RoPE scaling {kinds[0]!r}; exaflop implements plain RoPE only")
    return float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)


def model_section(hf: dict[str, Any], where: Path) -> dict[str, Any]:
    """exaflop's [model] section for an HF LlamaConfig dict; UserError names anything it can't express."""
    archs = hf.get("architectures") or []
    if hf.get("model_type") not in ("llama", "mixtral") or (archs and archs[0] not in SUPPORTED_ARCHS):
        raise UserError(f"import hf: {where} is a {hf.get('model_type')!r} model ({', '.join(archs) or '?'}); "
                        "exaflop imports the Llama and Mixtral architectures (LlamaForCausalLM, MixtralForCausalLM)")
    unsupported = [
        (hf.get("attention_bias"), "attention_bias=true (biases on q/k/v/o)"),
        (hf.get("mlp_bias"), "mlp_bias=true (biases in the MLP)"),
        (hf.get("hidden_act", "silu") != "silu", f"hidden_act={hf.get('hidden_act')!r} (exaflop's MLP is SwiGLU/silu)"),
    ]
    for bad, what in unsupported:
        if bad:
            raise UserError(f"import hf: {where} uses {what}, which exaflop's model does not have")
    try:
        d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        section = {
            "n_layer": int(hf["num_hidden_layers"]), "d_model": d, "n_head": heads,
            "n_kv_head": int(hf.get("num_key_value_heads") or heads),
            "d_ff": int(hf["intermediate_size"]), "vocab_size": int(hf["vocab_size"]),
            "seq_len": int(hf.get("max_position_embeddings") or 2048),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
            "rope_theta": _rope_theta(hf, where), "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "dropout": 0.0, "n_experts": int(hf.get("num_local_experts") or 1),
            "top_k": int(hf.get("num_experts_per_tok") or 1),
            "init_std": float(hf.get("initializer_range", 0.02)),
        }
    except KeyError as e:
        raise UserError(f"import hf: {where} lacks the field {e.args[0]!r}") from None
    window = hf.get("sliding_window")
    if window and int(window) < section["seq_len"]:
        raise UserError(f"import hf: {where} uses sliding-window attention (sliding_window={window}); "
                        "exaflop's attention is full causal")
    if hf.get("head_dim") and int(hf["head_dim"]) != d // heads:
        raise UserError(f"import hf: {where} has head_dim={hf['head_dim']} != hidden_size/num_attention_heads="
                        f"{d // heads}; exaflop derives the head dim from d_model/n_head")
    return section


def _weight_files(src: Path) -> list[Path]:
    """The checkpoint's weight files: sharded or single, safetensors or PyTorch .bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.is_file():
            names = sorted(set(read_json(index).get("weight_map", {}).values()))
            missing = [n for n in names if not (src / n).is_file()]
            if missing:
                raise UserError(f"import hf: {src} is incomplete: shard {missing[0]} named in {index_name} is missing")
            return [src / n for n in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (src / single).is_file():
            return [src / single]
    raise UserError(f"import hf: {src} has no weights (model.safetensors, its .index.json, or pytorch_model.bin)")


def read_weights(src: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(src):
        try:
            part = load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu",
                                                                                    weights_only=True)
        except (SafetensorError, RuntimeError, OSError, EOFError) as e:
            raise UserError(f"import hf: {f} is corrupt or truncated ({str(e).splitlines()[0][:120]})") from None
        state.update(part)
    return state


def to_exaflop_state(hf_state: dict[str, torch.Tensor], model: torch.nn.Module, src: Path) -> dict[str, torch.Tensor]:
    """Map HF names onto the model's state dict, naming the first missing, misshapen or foreign tensor."""
    cfg = model.cfg
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    moe = cfg.n_experts > 1
    pairs = [(exa, hf) for exa, hf in name_pairs(cfg.n_layer, cfg.tie_embeddings) if not (moe and ".mlp." in hf)]
    for exa, hf in pairs:
        if hf not in hf_state:
            raise UserError(f"import hf: {src} is incomplete: tensor {hf} is missing")
        t = hf_state[hf]
        if tuple(t.shape) != tuple(ours[exa].shape):
            raise UserError(f"import hf: tensor {hf} in {src} has shape {tuple(t.shape)}, config.json implies "
                            f"{tuple(ours[exa].shape)}")
        out[exa] = t.to(torch.float32)
    known = {hf for _, hf in pairs} | {"lm_head.weight"}
    if moe:  # Mixtral: one Linear per expert, stacked here (see lm/hf.py's moe_pairs)
        experts: dict[str, list] = {}
        for exa, e, hf in moe_pairs(cfg.n_layer, cfg.n_experts):
            if hf not in hf_state:
                raise UserError(f"import hf: {src} is incomplete: tensor {hf} is missing")
            known.add(hf)
            t = hf_state[hf].to(torch.float32)
            if e is None:
                out[exa] = t
            else:
                experts.setdefault(exa, []).append(t.t())
        for exa, ts in experts.items():
            out[exa] = torch.stack(ts)
            if tuple(out[exa].shape) != tuple(ours[exa].shape):
                raise UserError(f"import hf: the experts of {exa} in {src} stack to {tuple(out[exa].shape)}, "
                                f"config.json implies {tuple(ours[exa].shape)}")
        for name in ours:  # the routing bias: Mixtral has none, exaflop starts it at zero
            if name.endswith("expert_bias"):
                out[name] = torch.zeros_like(ours[name])
    extra = sorted(k for k in hf_state if k not in known and not k.endswith(DERIVED))
    if extra:
        raise UserError(f"import hf: {src} has tensor {extra[0]} that exaflop's Llama model has no place for "
                        "(an architecture feature exaflop does not implement)")
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["tok_emb.weight"]
    return out


def write_data_dir(src: Path, data_dir: Path, model_vocab: int) -> dict[str, Any]:
    """tokenizer.json + the HF tokenizer config + a shard-less manifest the lm task can read."""
    from tokenizers import Tokenizer

    from exaflop.lm.shards import MANIFEST_VERSION, token_dtype
    from exaflop.lm.tokenizer import EOT, tokenizer_hash

    tj = src / "tokenizer.json"
    if not tj.is_file():
        raise UserError(f"import hf: {src} has no tokenizer.json (a fast tokenizer); save one with "
                        "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
    try:
        tok = Tokenizer.from_file(str(tj))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise UserError(f"import hf: {tj} is not a valid tokenizer.json ({e})") from None
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if vocab > model_vocab:
        raise UserError(f"import hf: {tj} has {vocab} tokens but config.json vocab_size is {model_vocab}")
    data_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tj, data_dir / "tokenizer.json")
    for theirs, ours in (("tokenizer_config.json", HF_TOKENIZER_CONFIG),
                         ("generation_config.json", HF_GENERATION_CONFIG)):
        if (src / theirs).is_file():  # kept so an export of the fine-tuned run gives them back
            shutil.copyfile(src / theirs, data_dir / ours)
    manifest = {
        "version": MANIFEST_VERSION, "source": f"hf:{src}", "vocab_size": vocab,
        "dtype": token_dtype(vocab).name, "tokenizer_sha": tokenizer_hash(tok),
        "eot_id": tok.token_to_id(EOT), "val_fraction": 0.0,
        "documents": {"train": 0, "val": 0}, "tokens": {"train": 0, "val": 0},
        "bytes": {"train": 0, "val": 0}, "shards": {"train": [], "val": []},
        "stats": {}, "warnings": [], "sources": {},
    }
    (data_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def write_run(cfg, model: torch.nn.Module, source: str, force: bool) -> Path:
    """config.toml + a step-0 checkpoint with the trainer's meta: `train --resume` starts from
    these weights with a fresh optimizer and the config's full schedule."""
    from exaflop.config import save_config
    from exaflop.engine.checkpoint import Checkpointer
    from exaflop.engine.optim import build_optimizer
    from exaflop.engine.runtime import rng_state

    run_dir = cfg.run_dir
    if force:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    save_config(cfg, run_dir / "config.toml")
    save_assets(cfg.data.path, run_dir)  # self-contained like a trained run (lm/assets.py)
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    meta = {"step": 0, "cursor": 0, "config_hash": cfg.hash(), "task": cfg.task,
            "model_config": cfg.to_dict()["model"], "skipped_steps": 0, "seed": cfg.run.seed,
            "imported_from": source}
    Checkpointer(run_dir / "checkpoints").save(model, optimizer, meta, rng_state())
    return run_dir


def _check_new_run(cfg, force: bool) -> None:
    if (cfg.run_dir / "checkpoints").exists() and not force:
        raise UserError(f"import: {cfg.run_dir} already has checkpoints; pick another --name or pass --force")


def import_hf(src: str | Path, name: str | None = None, out_dir: str = "runs", data_dir: str | None = None,
              preset: str | None = None, overrides: list[str] | None = None, force: bool = False) -> Path:
    """Write runs/<name> (config + step-0 checkpoint) and its data dir; returns the run dir."""
    from exaflop.config import load_config
    from exaflop.lm.model import LM

    src = Path(src)
    if not src.is_dir():
        raise UserError(f"import hf: {src} is not a directory")
    section = model_section(read_json(src / "config.json"), src / "config.json")
    name = name or src.resolve().name
    data_path = Path(data_dir or f"data/{name}")
    cfg = load_config(preset, [f"run.name={name}", f"run.out_dir={out_dir}", f"data.path={data_path}",
                               *(f"model.{k}={v}" for k, v in section.items()), *(overrides or [])])
    _check_new_run(cfg, force)
    hf_state = read_weights(src)
    model = LM(cfg.model)
    model.load_state_dict(to_exaflop_state(hf_state, model, src))
    write_data_dir(src, data_path, cfg.model.vocab_size)
    return write_run(cfg, model, f"hf:{src.resolve()}", force)


def import_run(src: str | Path, name: str, out_dir: str = "runs", preset: str | None = None,
               overrides: list[str] | None = None, force: bool = False) -> Path:
    """A new run starting from another run's latest weights (e.g. a pretrained model -> chat SFT)."""
    from exaflop.config import load_config
    from exaflop.engine.checkpoint import load_for_inference

    src_cfg, task, model = load_for_inference(src)
    if src_cfg.task != "lm":
        raise UserError(f"import run: {src} is a {src_cfg.task!r} run; only language models")
    model_sets = [f"model.{k}={v}" for k, v in src_cfg.to_dict()["model"].items()]
    # The tokenizer comes from the source run itself, so SFT from a copied run needs no data.
    cfg = load_config(preset, [f"data.path={task.assets}", *model_sets, f"run.name={name}",
                               f"run.out_dir={out_dir}", *(overrides or [])])
    if cfg.hash() != src_cfg.hash():
        raise UserError(f"import run: --set may not change the model section of {src} (its weights fix it)")
    _check_new_run(cfg, force)
    return write_run(cfg, model.float(), f"run:{Path(src).resolve()}", force)


def _report(run_dir: Path) -> None:
    from exaflop.config import load_config_file
    from exaflop.lm.tokenizer import EOT
    from exaflop.progress import console

    cfg = load_config_file(run_dir / "config.toml")
    m = cfg.model
    console.print(f"{run_dir}: {m.n_layer} layers, d_model {m.d_model}, vocab {m.vocab_size}; "
                  f"tokenizer in {cfg.data.path}")
    if cfg.data.sft_path:
        console.print(f"fine-tune on chats ({cfg.data.sft_path}): exaflop train {run_dir}/config.toml --resume")
    else:
        console.print(f"fine-tune: exaflop data text --source TEXT --tokenizer {cfg.data.path}/tokenizer.json "
                      f"--out {cfg.data.path}-text && exaflop train {run_dir}/config.toml --resume "
                      f"--set data.path={cfg.data.path}-text")
    if json.loads((Path(cfg.data.path) / "manifest.json").read_text()).get("eot_id") is None:
        console.print(f"[yellow]warning: the tokenizer has no {EOT} token, which `exaflop data text` and "
                      "`exaflop sample` use to separate documents")


def _cmd_import_hf(args: argparse.Namespace) -> int:
    _report(import_hf(args.dir, args.name, args.out_dir, args.data_dir, args.config, args.overrides, args.force))
    return 0


def _cmd_import_run(args: argparse.Namespace) -> int:
    _report(import_run(args.run, args.name, args.out_dir, args.config, args.overrides, args.force))
    return 0


def _common(p: Any) -> None:
    p.add_argument("--out-dir", default="runs", help="where runs go")
    p.add_argument("--config", help="preset or TOML whose train/optim/data sections the new run uses "
                                    "(its model section comes from the weights), e.g. lm-sft-tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=50 (repeatable)")
    p.add_argument("--force", action="store_true", help="replace the run's existing checkpoints")


def add_parser(sub: Any) -> None:
    """Mount `exaflop import hf DIR` and `exaflop import run RUN` on the CLI's sub-command parser."""
    p = sub.add_parser("import", help="start a run from existing weights (a Hugging Face checkpoint, a run)")
    isub = p.add_subparsers(dest="import_cmd", required=True, parser_class=type(p))
    h = isub.add_parser("hf", help="a local Hugging Face Llama checkpoint directory -> an exaflop run")
    h.add_argument("dir", help="directory with config.json, model.safetensors (or shards), tokenizer.json")
    h.add_argument("--name", help="run name (default: the directory's name)")
    h.add_argument("--data-dir", help="where the tokenizer + manifest go (default: data/<name>)")
    _common(h)
    h.set_defaults(func=_cmd_import_hf)
    r = isub.add_parser("run", help="a new run starting from another run's weights (e.g. for chat SFT)")
    r.add_argument("run", help="source run directory (runs/<name>) or checkpoint directory")
    r.add_argument("--name", required=True, help="name of the new run")
    _common(r)
    r.set_defaults(func=_cmd_import_run)
