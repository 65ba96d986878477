"""Typed run configuration: TOML presets + `--set key=value` overrides.

Sections that every task shares (run, train, optim, parallel, checkpoint, eval)
are defined here. The `model` and `data` sections belong to the task: the task
registry (`exaflop/tasks.py`) names each task's section types (torch-free pydantic
models), chosen by the `task` field, so the engine never learns what a video or a
token is.

This module imports no torch (the planner reads configs too).
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import Field, SerializeAsAny, ValidationError, model_validator

from exaflop import tasks
from exaflop.errors import UserError
from exaflop.schema import Strict

PRESET_DIRS = [Path(__file__).resolve().parents[2] / "configs", Path(__file__).parent / "configs"]


class RunConfig(Strict):
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Compute dtype. auto: bf16 autocast where the device runs bf16 matmuls fast (CUDA with
    # bf16; a CPU with AMX / AVX-512 BF16, measured at start), fp32 elsewhere (AVX2-only
    # CPUs emulate bf16 ~100x slower). fp16 is never used on CPU.
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    # Written by the trainer into the run's config.toml: what `dtype` resolved to. Informational.
    resolved_dtype: Literal["", "bf16", "fp32"] = ""
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    compile: bool = False
    tensorboard: bool = True  # used only when tensorboard is installed


class TrainConfig(Strict):
    steps: int = Field(100, ge=1)
    # Global batch in samples per optimizer step (all ranks, all accumulation steps).
    # For lm, `global_batch_tokens` may be given instead and is divided by seq_len.
    global_batch: int = Field(0, ge=0)
    global_batch_tokens: int = Field(0, ge=0)
    micro_batch: int = Field(8, ge=1)  # samples per forward/backward on one rank
    log_every: int = Field(10, ge=1)
    nan_policy: Literal["skip", "stop"] = "skip"
    max_bad_steps: int = Field(5, ge=1)  # consecutive non-finite steps before stopping
    inject_nan_at_step: int = -1  # testing aid: poison the gradients at this step
    # Stop (with a checkpoint) after this many steps in this invocation while keeping the
    # schedule of `steps`: for time-sliced jobs (Slurm time limits) and resume tests.
    stop_after: int = Field(0, ge=0)


class OptimConfig(Strict):
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = Field(1.0, ge=0)  # 0 disables
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(10, ge=0)
    decay_frac: float = Field(0.2, gt=0, le=1)  # wsd: fraction of steps spent decaying
    fused: bool = True  # fused AdamW where torch offers it


class ParallelConfig(Strict):
    dp_replicate: int = Field(1, ge=1)
    dp_shard: int = Field(-1, ge=-1)  # -1: whatever world size is left after the others
    tp: int = Field(1, ge=1)
    # Expert parallel: the MoE experts are split over groups of `ep` data-parallel ranks
    # (each holds n_experts/ep of them; tokens travel to their experts by all-to-all).
    ep: int = Field(1, ge=1)
    # Pipeline parallel: the layers split into `pp` stages on different ranks; the step's
    # micro-batches (train.micro_batch) flow through them on the schedule below.
    pp: int = Field(1, ge=1)
    pp_schedule: Literal["gpipe", "1f1b", "interleaved"] = "1f1b"
    # Interleaved 1F1B (Megatron's virtual pipeline): each rank runs `pp_virtual` stages,
    # rank r stages r, r + pp, ...: the bubble shrinks by that factor for more p2p sends.
    pp_virtual: int = Field(2, ge=2)
    mode: Literal["auto", "ddp", "fsdp"] = "auto"  # auto: fsdp when dp_shard > 1
    activation_checkpoint: Literal["none", "selective", "full"] = "none"
    sequence_parallel: bool = True
    timeout_s: float = Field(300.0, gt=0)  # collective timeout: a hung rank errors out


class CheckpointConfig(Strict):
    every: int = Field(0, ge=0)  # 0: only at the end (and on SIGTERM/SIGINT)
    keep: int = Field(3, ge=1)
    async_save: bool = False


class EvalConfig(Strict):
    every: int = Field(0, ge=0)  # 0: only at the end
    batches: int = Field(8, ge=1)


class Config(Strict):
    task: str = "lm"
    run: RunConfig = RunConfig()
    # The task's own section types (tasks.py), validated from the raw tables below.
    model: SerializeAsAny[Strict] | None = None
    data: SerializeAsAny[Strict] | None = None
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    parallel: ParallelConfig = ParallelConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="before")
    @classmethod
    def _task_sections(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        spec = tasks.get(values.get("task", "lm"))
        values = dict(values)
        for section, klass in (("model", spec.model_config), ("data", spec.data_config)):
            raw = values.get(section) or {}
            if not isinstance(raw, klass):
                values[section] = klass.model_validate(raw)
        return values

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def hash(self, sections: tuple[str, ...] = ("task", "model")) -> str:
        """Hash of the sections that decide whether a checkpoint fits this config."""
        d = self.to_dict()
        blob = json.dumps({k: d[k] for k in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


def find_preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.exists():
        return p
    for d in PRESET_DIRS:
        for cand in (d / name_or_path, d / f"{name_or_path}.toml"):
            if cand.is_file():
                return cand
    known = sorted({q.stem for d in PRESET_DIRS if d.is_dir() for q in d.glob("*.toml")})
    raise UserError(f"config: no file or preset named {name_or_path!r} (presets: {', '.join(known)})")


def parse_value(text: str) -> Any:
    """`--set` values: TOML/Python literals when they parse (3e-4, true, [1,2]), else strings."""
    lowered = {"true": True, "false": False}
    if text.lower() in lowered:
        return lowered[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted}: {k!r} is a value, not a section")
    node[keys[-1]] = value


def format_validation_error(err: ValidationError, origin: str, prefix: str = "") -> str:
    first = err.errors()[0]
    key = ".".join([prefix] * bool(prefix) + [str(p) for p in first["loc"]])
    if first["type"] == "extra_forbidden":
        return f"{origin}: unknown key {key!r} (check the spelling; see configs/ for valid keys)"
    got = first.get("input")
    if not first["loc"]:  # a whole-section check (e.g. heads must divide the width)
        return f"{origin}: [{prefix}] {first['msg'].removeprefix('Value error, ')}"
    return f"{origin}: {key} = {got!r}: {first['msg']}"


def validate_tree(tree: dict[str, Any], origin: str) -> Config:
    """Config from a parsed TOML tree; errors name the full dotted key."""
    if isinstance(tree.get("task", "lm"), str):
        spec = tasks.get(tree.get("task", "lm"))
        for section, klass in (("model", spec.model_config), ("data", spec.data_config)):
            try:
                klass.model_validate(tree.get(section) or {})
            except ValidationError as e:
                raise UserError(format_validation_error(e, origin, section)) from None
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise UserError(format_validation_error(e, origin)) from None


def load_config(preset: str | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """Build a Config from a preset file/name, then `key=value` overrides."""
    tree: dict[str, Any] = dict(base or {})
    origin = "config"
    if preset:
        path = find_preset(preset)
        origin = str(path)
        try:
            tree = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{path}: not valid TOML: {e}") from None
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=3e-4")
        key, _, val = item.partition("=")
        apply_override(tree, key.strip(), parse_value(val.strip()))
        origin = f"{origin} (with --set)" if "--set" not in origin else origin
    return validate_tree(tree, origin)


def save_config(cfg: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(dump_toml(cfg.to_dict()))
    tmp.replace(path)


def load_config_file(path: Path) -> Config:
    try:
        tree = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None
    return validate_tree(tree, str(path))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v)} to TOML")


def dump_toml(tree: dict[str, Any]) -> str:
    """A minimal TOML writer for config trees (scalars, lists, one level of tables)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in tree.items() if not isinstance(v, dict) and v is not None]
    for k, v in tree.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items() if vv is not None and not isinstance(vv, dict)]
    return "\n".join(lines) + "\n"
