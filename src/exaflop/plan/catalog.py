"""Catalogs of accelerators, networks and models, read from CSV files the user can extend.

The package ships `catalog/*.csv`; `--catalog-dir DIR` (or extra CSV files) adds rows
or replaces rows of the same name. Every malformed value is reported as
`file:line: field ...` so a typo in a 1,000-row catalog is found in seconds.
Models may also come from any exaflop training config (`--model path.toml`), so the
planner and the trainer share one definition of a model's shape.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from exaflop.errors import UserError

CATALOG_DIR = Path(__file__).parent / "catalog"


@dataclass(frozen=True)
class Accelerator:
    name: str
    bf16_tflops: float  # dense peak
    mem_gb: float
    scaleup_domain: int  # accelerators sharing the fast fabric (NVLink, ICI, Dojo tile)
    fp8_tflops: float = 0.0  # 0 when the chip has no faster fp8 path
    mem_tbps: float = 0.0
    scaleup_gbps_per_dir: float = 0.0  # GB/s per accelerator per direction inside the domain
    scaleout_gbit_per_accel: float = 0.0  # Gbit/s per accelerator across domains
    power_w: float = 0.0
    unit_of: str = ""  # aggregates (Dojo tile, ExaPOD) are planned as `units` of this chip
    units: int = 1
    # Large-GEMM throughput achieved on this chip relative to the A100 the efficiency
    # constants were fitted on (cuBLAS-class kernels reach a smaller share of the datasheet
    # on chips whose peak assumes boost clocks they cannot hold under load).
    gemm_scale: float = 1.0
    fp8_gemm_scale: float = 0.0  # the same for fp8 GEMMs; 0: as gemm_scale
    year: int = 0  # when runs on it became common: picks the software stack a row without a date ran
    source: str = ""

    def peak_flops(self, precision: str) -> float:
        tflops = self.fp8_tflops if precision == "fp8" and self.fp8_tflops else self.bf16_tflops
        return tflops * 1e12

    def gemm_factor(self, precision: str) -> float:
        if precision == "fp8" and self.fp8_tflops and self.fp8_gemm_scale:
            return self.fp8_gemm_scale
        return self.gemm_scale


@dataclass(frozen=True)
class Network:
    name: str
    scaleup_domain: int
    scaleup_gbps_per_dir: float
    scaleout_gbit_per_accel: float
    pod_size: int = 1 << 40  # accelerators under full bisection; beyond it traffic is oversubscribed
    oversubscription: float = 1.0
    latency_us: float = 5.0  # per hop of a collective
    source: str = ""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    seq_len: int
    kv_heads: int = 0  # 0: same as heads (multi-head attention)
    mlp: str = "gelu"  # gelu: two matmuls; swiglu / geglu: three (gate, up, down)
    tie_embeddings: bool = False
    experts: int = 1
    top_k: int = 1
    expert_ffn: int = 0  # 0: same as ffn
    shared_experts: int = 0  # always-active experts (DeepSeek style)
    dense_layers: int = 0  # leading layers with a dense MLP in an MoE model
    attn_head_dim: int = 0  # 0: hidden / heads; set when attention is wider or narrower (PaLM, MLA)
    source: str = ""

    def __post_init__(self) -> None:
        if not self.kv_heads:
            object.__setattr__(self, "kv_heads", self.heads)

    @property
    def moe(self) -> bool:
        return self.experts > 1

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.hidden // self.heads

    @property
    def attn_width(self) -> int:
        """Width of the concatenated query heads (= hidden unless attn_head_dim says otherwise)."""
        return self.heads * self.head_dim

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers if self.moe else 0


@dataclass
class Catalog:
    accelerators: dict[str, Accelerator]
    networks: dict[str, Network]
    models: dict[str, ModelSpec]

    def accelerator(self, name: str) -> Accelerator:
        return _lookup(self.accelerators, name, "accelerator", "--accel")

    def network(self, name: str) -> Network:
        return _lookup(self.networks, name, "network", "--network")

    def model(self, name: str) -> ModelSpec:
        if name.endswith(".toml") or Path(name).is_file():
            return model_from_config(Path(name))
        return _lookup(self.models, name, "model", "--model")

    def default_network(self, accel: Accelerator) -> Network:
        """The fabric described on the accelerator's own row, one flat full-bisection tier."""
        for col in ("scaleup_gbps_per_dir", "scaleout_gbit_per_accel"):
            if not getattr(accel, col):
                raise UserError(f"accelerators.csv: {accel.name}: {col} is blank; fill it in or pass --network")
        return Network(
            name=f"{accel.name}-default",
            scaleup_domain=accel.scaleup_domain,
            scaleup_gbps_per_dir=accel.scaleup_gbps_per_dir,
            scaleout_gbit_per_accel=accel.scaleout_gbit_per_accel,
            source="from the accelerator row",
        )

    def chip(self, accel: Accelerator, n: int) -> tuple[Accelerator, int]:
        """Resolve an aggregate (a Dojo tile, an ExaPOD) to its chip and chip count."""
        if not accel.unit_of:
            return accel, n
        return self.accelerator(accel.unit_of), n * accel.units


def _lookup(table: dict[str, Any], name: str, kind: str, flag: str) -> Any:
    if name in table:
        return table[name]
    known = ", ".join(sorted(table))
    raise UserError(f"{flag} {name!r}: unknown {kind} (known: {known}; add rows with --catalog-dir)")


def _bool(text: str) -> bool:
    if text.lower() in ("yes", "true", "1"):
        return True
    if text.lower() in ("no", "false", "0"):
        return False
    raise ValueError("expected yes or no")


MLP_TYPES = ("gelu", "swiglu", "geglu")


def _mlp(text: str) -> str:
    if text not in MLP_TYPES:
        raise ValueError(f"expected one of {', '.join(MLP_TYPES)}")
    return text


# Column parsers per dataclass field type; a blank cell takes the field's default.
_PARSERS: dict[str, Callable[[str], Any]] = {
    "str": str, "float": float, "int": int, "bool": _bool,
}


def read_rows(path: Path, required: Iterable[str]) -> list[tuple[int, dict[str, str]]]:
    """CSV rows as (line number, {column: stripped text}); missing columns are errors."""
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    reader = csv.DictReader(text.splitlines())
    header = reader.fieldnames or []
    missing = [c for c in required if c not in header]
    if missing:
        raise UserError(f"{path}:1: missing column(s) {', '.join(missing)} (header has: {', '.join(header)})")
    rows = []
    for i, row in enumerate(reader, start=2):
        if None in row:
            raise UserError(f"{path}:{i}: more cells than header columns")
        rows.append((i, {k: (v or "").strip() for k, v in row.items()}))
    return rows


def parse_field(path: Path, line: int, column: str, text: str, kind: Callable[[str], Any]) -> Any:
    try:
        value = kind(text)
    except ValueError as e:
        raise UserError(f"{path}:{line}: field {column}={text!r}: {e}; fix the value") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        raise UserError(f"{path}:{line}: field {column}={text!r}: must not be negative")
    return value


def _load_table(path: Path, klass: type, required: list[str]) -> dict[str, Any]:
    table = {}
    for line, row in read_rows(path, required):
        values: dict[str, Any] = {}
        for f in fields(klass):
            text = row.get(f.name, "")
            if text == "":
                if f.name in required:
                    raise UserError(f"{path}:{line}: field {f.name} is empty; give a value")
                continue
            values[f.name] = parse_field(path, line, f.name, text, _PARSERS[str(f.type)])
        if "mlp" in values:
            values["mlp"] = parse_field(path, line, "mlp", values["mlp"], _mlp)
        table[values["name"]] = klass(**values)
    return table


_FILES = {
    "accelerators.csv": (Accelerator, ["name", "bf16_tflops", "mem_gb", "scaleup_domain"]),
    "networks.csv": (Network, ["name", "scaleup_domain", "scaleup_gbps_per_dir", "scaleout_gbit_per_accel"]),
    "models.csv": (ModelSpec, ["name", "layers", "hidden", "heads", "ffn", "vocab", "seq_len"]),
}


def load_catalog(extra: Iterable[Path] = ()) -> Catalog:
    """Shipped catalog, then each extra directory or CSV file in order (later rows win)."""
    tables: dict[str, dict[str, Any]] = {name: {} for name in _FILES}
    sources = [CATALOG_DIR, *[Path(p) for p in extra]]
    for src in sources:
        if src.is_dir():
            files = [src / name for name in _FILES if (src / name).is_file()]
        elif src.is_file():
            if src.name not in _FILES:
                raise UserError(f"{src}: catalog files must be named one of {', '.join(_FILES)}")
            files = [src]
        else:
            raise UserError(f"--catalog-dir {src}: no such file or directory")
        for f in files:
            klass, required = _FILES[f.name]
            tables[f.name].update(_load_table(f, klass, required))
    cat = Catalog(tables["accelerators.csv"], tables["networks.csv"], tables["models.csv"])
    for a in cat.accelerators.values():
        if a.unit_of and a.unit_of not in cat.accelerators:
            raise UserError(f"accelerators.csv: {a.name}: unit_of={a.unit_of!r} is not an accelerator")
    for m in cat.models.values():
        check_model(m, "models.csv")
    return cat


def check_model(m: ModelSpec, origin: str) -> None:
    problems = []
    if m.hidden % m.heads and not m.attn_head_dim:
        problems.append(f"hidden={m.hidden} is not divisible by heads={m.heads}")
    if m.kv_heads and m.heads % m.kv_heads:
        problems.append(f"heads={m.heads} is not divisible by kv_heads={m.kv_heads}")
    if m.top_k > m.experts:
        problems.append(f"top_k={m.top_k} exceeds experts={m.experts}")
    if min(m.layers, m.hidden, m.heads, m.ffn, m.vocab, m.seq_len) < 1:
        problems.append("layers, hidden, heads, ffn, vocab and seq_len must be positive")
    if problems:
        raise UserError(f"{origin}: model {m.name}: {problems[0]}")


def model_from_config(path: Path) -> ModelSpec:
    """The [model] section of an exaflop training config (task = "lm") as a planner model."""
    from exaflop.config import load_config_file  # pydantic only; no torch

    cfg = load_config_file(path)
    if cfg.task != "lm":
        raise UserError(f"{path}: task={cfg.task!r}; the planner models language models (task = \"lm\")")
    mc = cfg.model
    spec = ModelSpec(
        name=path.stem, layers=mc.n_layer, hidden=mc.d_model, heads=mc.n_head,
        kv_heads=mc.n_kv_head, ffn=mc.d_ff, vocab=mc.vocab_size, seq_len=mc.seq_len,
        mlp="swiglu",  # exaflop.nn's MLP is SwiGLU
        tie_embeddings=mc.tie_embeddings, experts=mc.n_experts, top_k=mc.top_k,
        source=str(path),
    )
    check_model(spec, str(path))
    return spec
