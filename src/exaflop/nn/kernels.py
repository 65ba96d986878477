"""exaflop's own CPU kernels (nn/csrc/*.cpp): built on first use into one extension, then
called as dispatcher operators (`torch.ops.exaflop.*`), so a compiled step — C++ wrapper
included — calls them without going through Python.

Built with `torch.utils.cpp_extension` for the capability PyTorch dispatches to (AVX-512,
AVX2 or plain; ~20 s the first time on 2 cores: two translation units, csrc/unit_*.cpp), cached in torch's extension directory per capability
and source hash, so a process capped with ATEN_CPU_CAPABILITY=avx2 builds and runs an AVX2
build. Where they cannot be built (no compiler) every caller has a slower path in plain
PyTorch, and the reason is logged once.

- `paged_decode` (csrc/paged_attention.cpp): decode attention over a paged KV cache (nn/paged.py);
  `paged_decode_rope`, the fp32 step's RoPE, cache write and attention in one.
- `linear_bf16_row`, `linear_int8_row` (csrc/linear_row.cpp): one row times a bf16 matrix, or an
  int8 one with per-row scales (nn/packed.py).
- `xent_rows`, `xent_rows_` (csrc/cross_entropy.cpp): a chunk's cross-entropy and logit gradient
  in one pass per row (nn/loss.py).
- `linear_f32_rows` (csrc/linear_f32.cpp): the fp32 decode step's few rows times an fp32 matrix
  (nn/packed.py).
- `decode_f32` (csrc/decode_f32.cpp): the fp32 model's whole decode step, with the two kernels above
  (shared through csrc/*.h) and the norms and SwiGLU between them (lm/fused_step.py).
- `attention_amx_fwd`, `attention_amx_bwd` (csrc/attention_amx.cpp): causal bf16 attention for
  training on AMX tiles (nn/layers.py); built into the AVX-512 build only.
- `swiglu_fwd`, `swiglu_bwd` (csrc/swiglu.cpp): SwiGLU's silu(gate) * up and its backward, one
  pass each (nn/layers.py's SwiGLU while training in bf16).
- `rmsnorm_fwd`, `rmsnorm_bwd` (csrc/rmsnorm.cpp): RMSNorm, after a residual add, one pass each
  way (nn/layers.py's RMSNorm and Block while training on CPU).
- `embedding_grad_rows` (csrc/embedding.cpp): an embedding table's weight gradient (nn/cpu_ops.py).
- `linear_wgrad_amx` (csrc/wgrad_amx.cpp): a linear layer's weight gradient on AMX tiles, in fp32
  (nn/layers.py's Linear while training in bf16); AVX-512 build only.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path

import torch

log = logging.getLogger("exaflop.serve")

_CSRC = Path(__file__).with_name("csrc")
# What the compiler is given: two translation units that include the kernel files (csrc/unit_*.cpp
# says why). Everything in csrc/ goes into the build's hash.
UNITS = sorted(_CSRC.glob("unit_*.cpp"))
SOURCES = sorted(p for p in _CSRC.glob("*.cpp") if p not in UNITS)
HEADERS = sorted(_CSRC.glob("*.h"))
# The vector types compile for the capability named here; the flags match it (not -march=native,
# so a capped process builds what it will run). Functions that need more (AVX512-BF16) carry a
# target attribute and check the CPU at run time.
_FLAGS = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
          "AVX2": ["-mavx2", "-mfma", "-mf16c"], "DEFAULT": []}
_loaded: bool | None = None  # None: not tried yet
_lock = threading.Lock()


def trace_constant(fn):
    """`torch.compiler.assume_constant_result` without its cost: that decorator imports
    torch._dynamo (~0.5 s of every process's start, training or serving, compiled or not) only
    to mark the function with this attribute, which a compiled step's trace reads. Checked
    against torch's own decorator by tests/test_imports.py, so a torch release that changes
    the mark fails there rather than silently tracing the function."""
    fn._dynamo_marked_constant = True
    return fn


def cpu_kernels() -> bool:
    """Whether the kernels are loaded: built on first call (then cached across processes), and
    registered as `torch.ops.exaflop.*` with their fakes for the compiler. False if they
    cannot be built."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _build()
        return _loaded


def cpu_has(flag: str) -> bool:
    """Whether /proc/cpuinfo lists `flag` (e.g. 'avx512_bf16'); False where there is none."""
    return flag in _cpu_flags()


@functools.cache
def _cpu_flags() -> frozenset[str]:
    # Read once: packing asks for every matrix of a model.
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


@functools.cache
def source_digest() -> str:
    """The kernels' sources, hashed: names their build (and what a cached measurement ran)."""
    return hashlib.sha256(b"".join(p.read_bytes() for p in UNITS + SOURCES + HEADERS)).hexdigest()[:10]


def _build() -> bool:
    cap = torch.backends.cpu.get_cpu_capability()
    cap = cap if cap in _FLAGS else "DEFAULT"
    macros = [f"-DCPU_CAPABILITY_{cap}", f"-DCPU_CAPABILITY={cap}"] if cap != "DEFAULT" else []
    digest = source_digest()
    try:
        from torch.utils.cpp_extension import load
        if shutil.which("ninja") is None:  # the `ninja` wheel (a dependency) outside an activated venv
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        load(f"exaflop_kernels_{cap.lower()}_{digest}", [str(p) for p in UNITS], is_python_module=False,
             extra_cflags=["-O3", "-fopenmp", *_FLAGS[cap], *macros], extra_ldflags=["-fopenmp"])
    except Exception as e:  # noqa: BLE001 — no compiler, no ninja, ...: the callers' PyTorch paths
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        log.warning("exaflop's CPU kernels unavailable (%s: %s); paged attention gathers blocks and "
                    "single-row bf16 products use oneDNN", type(e).__name__, first[:200])
        return False
    torch.library.register_fake("exaflop::paged_decode")(lambda q, keys, values, table, lens: torch.empty_like(q))
    torch.library.register_fake("exaflop::paged_decode_rope")(
        lambda q, k, v, cos, sin, keys, values, table, lens, blk, off: q.new_empty((q.shape[0], q.shape[1], q.shape[3])))
    torch.library.register_fake("exaflop::linear_bf16_row")(
        lambda x, w: x.new_empty((*x.shape[:-1], w.shape[0])))
    torch.library.register_fake("exaflop::linear_int8_row")(
        lambda x, q, scale: x.new_empty((*x.shape[:-1], q.shape[0])))
    torch.library.register_fake("exaflop::linear_f32_rows")(lambda x, w: x.new_empty((*x.shape[:-1], w.shape[0])))
    torch.library.register_fake("exaflop::xent_rows")(
        lambda logits, targets, rw: (rw.new_empty(()), torch.empty_like(logits)))
    torch.library.register_fake("exaflop::xent_rows_")(lambda logits, targets, rw: rw.new_empty(()))
    torch.library.register_fake("exaflop::attention_amx_fwd")(
        lambda q, k, v, scale, cos=None, sin=None: (_heads_like(q, q.shape[1]), q.new_empty(q.shape[:3], dtype=torch.float32)))
    torch.library.register_fake("exaflop::attention_amx_bwd")(
        lambda grad, q, k, v, out, lse, scale, cos=None, sin=None: (_heads_like(q, q.shape[1]), _heads_like(k, k.shape[1]),
                                                _heads_like(v, v.shape[1])))
    torch.library.register_fake("exaflop::linear_wgrad_amx")(
        lambda g, x: g.new_empty((g.shape[1], x.shape[1]), dtype=torch.float32))
    torch.library.register_fake("exaflop::embedding_grad_rows")(
        lambda grad, idx, rows: grad.new_empty((rows, grad.shape[1])))
    torch.library.register_fake("exaflop::swiglu_fwd")(lambda gate, up: torch.empty_like(gate))
    torch.library.register_fake("exaflop::swiglu_bwd")(
        lambda grad, gate, up: (torch.empty_like(gate), torch.empty_like(up)))
    torch.library.register_fake("exaflop::rmsnorm_fwd")(
        lambda x, y, w, eps, out_dtype: (x.new_empty((0 if y is None else x.shape[0], x.shape[1])),
                                         x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[:1])))
    torch.library.register_fake("exaflop::rmsnorm_bwd")(
        lambda dh, s, rstd, w, dres, low: (torch.empty_like(s),
                                           s.new_empty((s.shape[0] if low == torch.bfloat16 else 0, s.shape[1]),
                                                       dtype=low), torch.empty_like(w)))
    return True


def _heads_like(x: torch.Tensor, heads: int) -> torch.Tensor:
    # (B, H, T, D) in the memory of (B, T, H, D), as csrc/attention_amx.cpp allocates it.
    return x.new_empty((x.shape[0], x.shape[2], heads, x.shape[3])).transpose(1, 2)


def main() -> int:
    """`make kernels`: build now (for this process's capability) rather than on first use."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cap = torch.backends.cpu.get_cpu_capability()
    ok = cpu_kernels()
    print(f"exaflop CPU kernels for {cap}: {'ready' if ok else 'unavailable (see the warning above)'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
