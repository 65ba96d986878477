"""Precision chosen from what the hardware does: `dtype = "auto"`.

bf16 autocast is a large win only where the device has bf16 matrix hardware: CUDA GPUs
with bf16, and CPUs with AMX or AVX-512 BF16. On an AVX2-only CPU oneDNN *emulates* bf16
matmuls (measured 1.3 GFLOP/s against 142 GFLOP/s fp32 on a 2-core AMD EPYC), so a bf16
run is 20-30x slower than the same run in fp32. `auto` therefore decides from a short
measurement on the device itself rather than from an assumption: a 256^3 matmul in each
dtype (a few ms; an emulated bf16 one takes ~15 ms), cached per process.

The rates can be injected with EXAFLOP_MATMUL_GFLOPS="fp32=142,bf16=1.3" so that both
decisions are testable on any machine (and a user can force the measurement's outcome).

Fast bf16 matmuls do not make every model faster: a model of small matmuls, convolutions
and elementwise work can lose more to autocast's casts than AMX gains (drive-tiny on an
AMX Xeon: 190 samples/s in bf16 vs 258 in fp32). So where the probe favours bf16, the
trainer confirms it on the model itself (`confirm_by_trial`): a couple of real
forward + backward passes in each dtype, keeping the faster.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from exaflop.errors import UserError
from exaflop.progress import console

# bf16 must be measured this much faster than fp32 before `auto` picks it: autocast adds
# casts and bf16 loses precision, so a marginal matmul gain is not worth it.
BF16_MARGIN = 1.25
_PROBE_N = 256
_PROBE_BUDGET_S = 0.01  # per dtype, after one warm-up call
ENV_RATES = "EXAFLOP_MATMUL_GFLOPS"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

_cache: dict[str, dict[str, float]] = {}
_warned: set[str] = set()


@dataclass(frozen=True)
class Precision:
    """The resolved compute precision and why it was chosen."""

    name: str  # "fp32" or "bf16": what actually runs
    requested: str  # "auto", "fp32" or "bf16"
    rates: dict[str, float] = field(default_factory=dict)  # probe GFLOP/s by dtype ({} on CUDA)
    reason: str = ""
    trial_ms: dict[str, float] = field(default_factory=dict)  # confirm_by_trial's step times, if run

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, None for plain fp32."""
        return torch.bfloat16 if self.name == "bf16" else None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def describe(self) -> str:
        return f"{self.name} ({self.requested}: {self.reason})" if self.reason else self.name


def _parse_env(text: str) -> dict[str, float]:
    rates = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        try:
            rates[name] = float(value)
        except ValueError:
            rates[name] = -1.0
        if name not in DTYPES or rates[name] <= 0:
            raise UserError(f"{ENV_RATES}={text!r}: expected e.g. 'fp32=142,bf16=1.3' (GFLOP/s, both > 0)")
    if set(rates) != set(DTYPES):
        raise UserError(f"{ENV_RATES}={text!r}: give both fp32 and bf16 rates, e.g. 'fp32=142,bf16=1.3'")
    return rates


def _probe(device: torch.device, dtype: torch.dtype) -> float:
    gen = torch.Generator(device=device).manual_seed(0)  # never advance the training RNG
    a = torch.randn(_PROBE_N, _PROBE_N, device=device, dtype=dtype, generator=gen)
    b = torch.randn(_PROBE_N, _PROBE_N, device=device, dtype=dtype, generator=gen)
    a @ b  # warm-up: oneDNN builds its kernel on the first call
    iters, t0 = 0, time.perf_counter()
    while True:
        a @ b
        iters += 1
        el = time.perf_counter() - t0
        if el > _PROBE_BUDGET_S:
            break
    return 2 * _PROBE_N**3 * iters / el / 1e9


def matmul_rates(device: torch.device | str = "cpu") -> dict[str, float]:
    """Measured GFLOP/s of a 256^3 matmul in fp32 and bf16 on this CPU (cached per process)."""
    device = torch.device(device)
    env = os.environ.get(ENV_RATES)
    if env:
        return _parse_env(env)
    key = str(device)
    if key not in _cache:
        _cache[key] = {name: _probe(device, dt) for name, dt in DTYPES.items()}
    return _cache[key]


def bf16_is_fast(rates: dict[str, float]) -> bool:
    return rates["bf16"] >= BF16_MARGIN * rates["fp32"]


def resolve(requested: str, device: torch.device | str = "cpu", rates: dict[str, float] | None = None,
            flag: str = "run.dtype") -> Precision:
    """The precision to run in. `flag` names the setting in warnings ("--dtype", "run.dtype")."""
    device = torch.device(device)
    if requested not in ("auto", *DTYPES):
        raise UserError(f"{flag} {requested!r}: choose auto, fp32 or bf16")
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return Precision("bf16" if ok else "fp32", "auto", {},
                             "CUDA with bf16" if ok else "this GPU has no bf16")
        return Precision(requested, requested)
    if device.type != "cpu":
        return Precision("fp32" if requested == "auto" else requested, requested)
    rates = rates if rates is not None else matmul_rates(device)
    fast = bf16_is_fast(rates)
    measured = f"bf16 {rates['bf16']:.1f} vs fp32 {rates['fp32']:.1f} GFLOP/s"
    if requested == "auto":
        return Precision("bf16" if fast else "fp32", "auto", dict(rates), measured)
    if requested == "bf16" and not fast and flag not in _warned:
        _warned.add(flag)
        console.print(f"[yellow]warning: {flag}=bf16 on a CPU where bf16 matmuls are slow ({measured}; "
                      f"bf16 is emulated here): set {flag}{'=' if '.' in flag else ' '}auto or fp32",
                      highlight=False, soft_wrap=True)
    return Precision(requested, requested, dict(rates), measured)


def confirm_by_trial(p: Precision, step, reps: int = 2, key: str | None = None, distributed: bool = False,
                     writer: bool = True) -> Precision:
    """Time `step(autocast_dtype_or_None)` (one forward + backward) in fp32 and bf16; keep the faster.

    Only for `auto` where the matmul probe chose bf16 (an emulating CPU never pays for a
    bf16 trial), and not when EXAFLOP_MATMUL_GFLOPS fixes the outcome. One warm-up and `reps`
    timed calls each, best taken; `step` must leave the model's parameters and any RNG it uses
    as it found them.

    With a `key` (trial_key: this machine, model shape, batch and layout) the outcome is
    remembered in the trial cache (trial_cache_path) and a later run of the same key takes it
    instead of measuring again: the same choice every time (a resumed run does not flip dtype on
    a noisy measurement), and no 1-10 s of trial steps at each start. `distributed`: every rank
    calls this; rank 0's cache decides for all, so no rank runs a trial's collectives alone.
    Only a `writer` (rank 0) records a new outcome.
    """
    if p.requested != "auto" or p.name != "bf16" or os.environ.get(ENV_RATES):
        return p  # nothing to confirm, or the user fixed the measurement's outcome
    trial = _recall(key, distributed) if key else None
    if trial is None:
        best: dict[str, float] = {}
        for name in ("bf16", "fp32"):
            dtype = torch.bfloat16 if name == "bf16" else None
            step(dtype)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                step(dtype)
                times.append(time.perf_counter() - t0)
            best[name] = min(times)
        trial = {k: round(v * 1e3, 2) for k, v in best.items()}
        if key and writer:
            _remember(key, trial)
        when = ""
    else:
        when = f" (measured by an earlier run on this machine: {trial_cache_path()})"
    # The probe already required a clear matmul win; here both dtypes ran the real step,
    # so the faster one wins outright.
    name = "bf16" if trial["bf16"] <= trial["fp32"] else "fp32"
    reason = f"{p.reason}; a step of this model: bf16 {trial['bf16']:.0f} ms vs fp32 {trial['fp32']:.0f} ms{when}"
    return Precision(name, p.requested, p.rates, reason, trial)


TRIAL_CACHE_ENV = "EXAFLOP_PRECISION_CACHE"


def trial_cache_path() -> Path | None:
    """Where trial outcomes are remembered: $EXAFLOP_PRECISION_CACHE, else
    $XDG_CACHE_HOME/exaflop/precision.json (~/.cache by default); None if that variable is
    'off' (every run measures)."""
    env = os.environ.get(TRIAL_CACHE_ENV)
    if env is not None and env.strip().lower() in ("off", "0", "none", ""):
        return None
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "exaflop" / "precision.json"


def trial_key(model: torch.nn.Module, batch, layout: str = "") -> str:
    """What a trial's outcome depends on, hashed: the machine (CPU, its capability and any cap on
    it, threads), torch and exaflop's kernels, the switches that pick kernels, the model's
    parameter shapes, the batch's shapes and the parallel layout."""
    from exaflop.nn.kernels import source_digest

    def shapes(x):
        if isinstance(x, torch.Tensor):
            return [list(x.shape), str(x.dtype)]
        if isinstance(x, dict):
            return {str(k): shapes(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
        if isinstance(x, (list, tuple)):
            return [shapes(v) for v in x]
        return repr(x)

    what = {
        "cpu": _cpuinfo("model name"), "units": _bf16_flags(), "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "kernels": source_digest(),
        "env": {k: v for k, v in sorted(os.environ.items())
                if k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
                or (k.startswith("EXAFLOP_") and (k.endswith("_KERNEL") or k.startswith("EXAFLOP_AMX")))},
        "params": [[n, list(t.shape), str(t.dtype)] for n, t in model.named_parameters()],
        "batch": shapes(batch), "layout": layout,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # none yet, unreadable or damaged: measure again
        return {}


def _recall(key: str, distributed: bool) -> dict[str, float] | None:
    import torch.distributed as dist

    path = trial_cache_path()
    found = None
    if path is not None and (not distributed or dist.get_rank() == 0):
        entry = _read_cache(path).get(key)
        if (isinstance(entry, dict) and set(entry) == {"bf16", "fp32"}
                and all(isinstance(v, (int, float)) and v > 0 for v in entry.values())):
            found = {k: float(v) for k, v in entry.items()}
    if distributed:  # every rank must take the same path: a trial's steps are collectives
        box = [found]
        dist.broadcast_object_list(box, src=0)
        found = box[0]
    return found


def _remember(key: str, trial: dict[str, float]) -> None:
    """Add one outcome to the cache file, atomically (a concurrent run may lose its entry, never
    damage the file); a cache that cannot be written costs only a trial next time."""
    path = trial_cache_path()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[key] = trial
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        console.print(f"[yellow]warning: could not remember the precision trial in {path} ({e}); "
                      f"set {TRIAL_CACHE_ENV} to a writable file, or 'off'", highlight=False, soft_wrap=True)


def peak_dtype(p: Precision) -> torch.dtype:
    """The dtype whose matmul rate is the MFU denominator.

    The dtype in use, unless that is an emulated (slower than fp32) bf16: then the
    machine's real limit is its fp32 rate, and autocast still runs part of the step in
    fp32, so a bf16 denominator would report MFU above 100% (seen: 349.9%).
    """
    if p.name == "bf16" and p.rates and not p.rates["bf16"] >= p.rates["fp32"]:
        return torch.float32
    return p.torch_dtype


def _cpuinfo(key: str) -> str:
    """The first `key : value` line of /proc/cpuinfo ('' where there is none: not Linux/x86)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(key)), "")
    except OSError:
        return ""


def _bf16_flags() -> str:
    """The CPU's bf16 matmul units ('' where unknown)."""
    flags = _cpuinfo("flags").split()
    if not flags:
        return ""
    names = [name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
    return " + ".join(names) if names else "no bf16 units"


def cpu_capability() -> str:
    """What the CPU is and offers torch, for benchmark reports: e.g. 'Intel(R) Xeon(R)
    Processor: AVX512 (AMX-BF16 + AVX512-BF16), 2 cores, 2 threads'.

    torch's capability level alone does not say whether bf16 runs in hardware (a Zen 4
    and a Sapphire Rapids both report AVX512), so the bf16 units are named too.
    """
    cap = torch.backends.cpu.get_cpu_capability()
    units = _bf16_flags()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    if isa:  # capped below what the silicon has: say both, so the figure is not misread
        what = f"{cap}, ONEDNN_MAX_CPU_ISA={isa}" + (f" (the CPU has {units})" if units else "")
    else:
        what = f"{cap} ({units})" if units else cap
    model = _cpuinfo("model name")
    return f"{model + ': ' if model else ''}{what}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def compile_cache_per_isa() -> str:
    """Point inductor's on-disk cache at a directory of this process's CPU instruction set
    (unless the user chose one): returns the directory.

    Why: inductor keys its cache by graph and config, not by the ISA that torch and oneDNN were
    told to use (`ATEN_CPU_CAPABILITY`, `ONEDNN_MAX_CPU_ISA`). A step compiled on the same
    machine at full AVX-512, then loaded from the cache by a process capped to AVX2, returned
    NaN logits (measured: torch 2.13.0, lm-tiny, either wrapper); a cache directory shared by
    machines of different CPUs would do the same. Separate directories per ISA avoid it.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    base = default_cache_dir()
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if (current is not None and os.path.abspath(current) != os.path.abspath(base)
            and os.path.dirname(os.path.abspath(current)) != os.path.abspath(base)):
        return current  # the user's choice
    # Unset, the default, or one of these per-ISA directories inherited from a parent process that
    # may run at another ISA (a test or tool starting a capped server): this process's own.
    isa = torch.backends.cpu.get_cpu_capability().lower()
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA")
    if capped:
        isa += "-onednn-" + capped.lower()
    path = os.path.join(base, isa)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return path


def autocast_for(requested: str, device: torch.device | str = "cpu", flag: str = "run.dtype"):
    """An autocast context for inference in the resolved precision (a no-op for fp32)."""
    device = torch.device(device)
    p = resolve(requested, device, flag=flag)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=p.name == "bf16")


def agree(precision: Precision, device: torch.device) -> Precision:
    """Every rank must compute in the same dtype (FSDP's mixed-precision policy, the
    checksums of bit-exact resume): take rank 0's decision, which the probe made on its
    own core, so noisy measurements on two ranks cannot split the group."""
    import torch.distributed as dist

    flag = torch.tensor([1 if precision.name == "bf16" else 0], device=device)
    dist.broadcast(flag, src=0)
    name = "bf16" if int(flag.item()) else "fp32"
    return precision if name == precision.name else replace(precision, name=name, reason="rank 0's choice")
