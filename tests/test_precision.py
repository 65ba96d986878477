"""dtype = "auto": the precision follows what the hardware measures, and MFU stays honest."""

import os
import subprocess
import sys
import time

import pytest
import tomllib
import torch

from exaflop.config import load_config
from exaflop.engine import precision as P
from exaflop.engine.telemetry import read_metrics
from exaflop.engine.trainer import train
from exaflop.errors import UserError
from tests.conftest import REPO, tiny_overrides

SLOW_BF16 = {"fp32": 142.0, "bf16": 1.3}  # the AVX2-only EPYC of the issue (512^3, torch 2.13)
FAST_BF16 = {"fp32": 164.0, "bf16": 412.0}  # an AVX-512 BF16 EPYC (512^3)


def test_auto_follows_the_measured_rates():
    assert P.resolve("auto", "cpu", SLOW_BF16).name == "fp32"
    assert P.resolve("auto", "cpu", FAST_BF16).name == "bf16"
    # a marginal gain is not worth autocast's casts and bf16's rounding
    assert P.resolve("auto", "cpu", {"fp32": 100.0, "bf16": 110.0}).name == "fp32"
    assert P.resolve("auto", "cpu", SLOW_BF16).dtype is None
    assert P.resolve("auto", "cpu", FAST_BF16).dtype is torch.bfloat16
    assert P.resolve("fp32", "cpu", FAST_BF16).name == "fp32"
    with pytest.raises(UserError, match="run.dtype 'fp16'"):
        P.resolve("fp16", "cpu", FAST_BF16)


def test_the_probe_measures_this_cpu_quickly():
    import time

    P._cache.clear()
    t0 = time.perf_counter()
    rates = P.matmul_rates("cpu")
    took = time.perf_counter() - t0
    assert set(rates) == {"fp32", "bf16"} and min(rates.values()) > 0
    # an emulated bf16 256^3 matmul takes ~15 ms, so even the slow path stays well under a second
    assert took < 1.0, took
    assert P.matmul_rates("cpu") is rates  # cached per process


def test_injected_rates_are_validated(monkeypatch):
    monkeypatch.setenv(P.ENV_RATES, "fp32=142,bf16=1.3")
    assert P.matmul_rates() == SLOW_BF16
    monkeypatch.setenv(P.ENV_RATES, "fp32=142")
    with pytest.raises(UserError, match=P.ENV_RATES):
        P.matmul_rates()


def test_explicit_bf16_on_a_slow_cpu_warns_once_with_both_rates():
    env = {**os.environ, P.ENV_RATES: "fp32=142,bf16=1.3", "COLUMNS": "200"}
    code = ("from exaflop.engine.precision import resolve\n"
            "for _ in range(3): p = resolve('bf16', 'cpu')\n"
            "print(p.name)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "bf16"  # an explicit choice is obeyed
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, out.stderr
    assert "bf16 1.3" in lines[0] and "fp32 142.0 GFLOP/s" in lines[0] and "run.dtype" in lines[0]
    # fast bf16: no warning
    env[P.ENV_RATES] = "fp32=164,bf16=412"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stderr.strip() == ""


def test_mfu_peak_is_never_an_emulated_rate():
    slow = P.resolve("bf16", "cpu", SLOW_BF16)
    assert P.peak_dtype(slow) is torch.float32
    assert P.peak_dtype(P.resolve("auto", "cpu", FAST_BF16)) is torch.bfloat16
    assert P.peak_dtype(P.resolve("fp32", "cpu", FAST_BF16)) is torch.float32


@pytest.mark.parametrize("rates,want", [("fp32=142,bf16=1.3", "fp32"), ("fp32=164,bf16=412", "bf16")])
def test_trainer_records_what_auto_resolved_to(tmp_path, data_dir, monkeypatch, rates, want):
    monkeypatch.setenv(P.ENV_RATES, rates)
    o = tiny_overrides(tmp_path, data_dir, f"auto-{want}", "train.steps=3")
    cfg = load_config("lm-tiny", [x for x in o if not x.startswith("run.dtype")])
    assert cfg.run.dtype == "auto"  # the default
    train(cfg, quiet=True)
    saved = tomllib.loads((cfg.run_dir / "config.toml").read_text())["run"]
    assert saved["dtype"] == "auto" and saved["resolved_dtype"] == want
    recs = read_metrics(cfg.run_dir)
    head = next(r for r in recs if r["kind"] == "run")
    assert head["dtype"] == want and head["dtype_requested"] == "auto"
    assert head["matmul_gflops"] == {k: float(v) for k, v in (x.split("=") for x in rates.split(","))}
    assert all(r["dtype"] == want for r in recs if r["kind"] == "train")


def test_mfu_reported_by_the_trainer_is_at_most_100_percent(tmp_path, data_dir):
    # The real rates of this machine, the real trainer, the default precision.
    o = [x for x in tiny_overrides(tmp_path, data_dir, "mfu", "train.steps=6") if not x.startswith("run.dtype")]
    train(load_config("lm-tiny", o), quiet=True)
    mfus = [r["mfu"] for r in read_metrics(tmp_path / "runs" / "mfu") if r["kind"] == "train"]
    assert mfus and all(0 < m <= 1.0 for m in mfus), mfus


def test_the_bar_names_the_precision(tmp_path, data_dir):
    o = [x for x in tiny_overrides(tmp_path, data_dir, "bar", "train.steps=2") if not x.startswith("run.dtype")]
    env = {**os.environ, P.ENV_RATES: "fp32=142,bf16=1.3", "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "exaflop", "train", "lm-tiny", *sum((["--set", x] for x in o), [])],
                         env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "precision: fp32 (auto: bf16 1.3 vs fp32 142.0 GFLOP/s)" in out.stderr
    assert "train fp32" in out.stderr


def test_a_trial_on_the_model_overrides_the_probe_when_bf16_loses(monkeypatch):
    # A real step function whose bf16 pass is slower (as drive-tiny's is on an AMX CPU).
    monkeypatch.delenv(P.ENV_RATES, raising=False)
    calls = []

    def step(dtype):
        calls.append(dtype)
        time.sleep(0.02 if dtype is torch.bfloat16 else 0.005)

    probe = P.resolve("auto", "cpu", FAST_BF16)
    p = P.confirm_by_trial(probe, step)
    assert p.name == "fp32" and p.dtype is None and p.rates == probe.rates
    assert p.trial_ms["bf16"] > p.trial_ms["fp32"] and "a step of this model" in p.reason
    assert calls.count(torch.bfloat16) == calls.count(None) == 3  # one warm-up, two timed
    # bf16 kept where it wins; never tried where the probe chose fp32, or for explicit dtypes
    assert P.confirm_by_trial(probe, lambda d: time.sleep(0.001 if d is torch.bfloat16 else 0.01)).name == "bf16"
    for p0 in (P.resolve("auto", "cpu", SLOW_BF16), P.resolve("bf16", "cpu", FAST_BF16)):
        assert P.confirm_by_trial(p0, lambda d: pytest.fail("no trial expected")) is p0


def test_the_trial_leaves_no_trace_in_training(tmp_path, data_dir, monkeypatch):
    # The machine's own probe and trial (on an AVX2-only CPU the probe says fp32 and no
    # trial runs). Whatever auto chose, the run equals an explicit run in that dtype.
    monkeypatch.delenv(P.ENV_RATES, raising=False)
    o = [x for x in tiny_overrides(tmp_path, data_dir, "trial", "train.steps=3") if not x.startswith("run.dtype")]
    train(load_config("lm-tiny", o), quiet=True)
    recs = read_metrics(tmp_path / "runs" / "trial")
    head = next(r for r in recs if r["kind"] == "run")
    if head["trial_ms"]:
        faster = min(head["trial_ms"], key=head["trial_ms"].get)
        assert head["dtype"] == faster
    o2 = [x.replace("run.name=trial", "run.name=fixed") for x in o] + [f"run.dtype={head['dtype']}"]
    train(load_config("lm-tiny", o2), quiet=True)
    losses = [[r["loss"] for r in read_metrics(tmp_path / "runs" / n) if r["kind"] == "train"] for n in ("trial", "fixed")]
    assert losses[0] == losses[1] and losses[0]


def test_compile_cache_is_kept_per_instruction_set(tmp_path):
    """A process capped to AVX2 must not load what a full AVX-512 process compiled (it returned
    NaN logits on torch 2.13.0): each capability gets its own inductor cache directory, and a
    directory the user chose is left alone. Run in subprocesses: the function sets the env."""
    code = "from exaflop.engine.precision import compile_cache_per_isa as f; print(f())"
    base = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "ONEDNN_MAX_CPU_ISA",
                                                             "ATEN_CPU_CAPABILITY")}

    def where(**env: str) -> str:
        out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                             check=True, cwd=REPO)
        return out.stdout.strip()

    native = where()
    capped = where(ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    # The uncapped capability, asked of an uncapped process (this one may run capped).
    cap = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         env=base, capture_output=True, text=True, check=True).stdout.strip()
    assert os.path.basename(native) == cap.lower()
    assert os.path.basename(capped) == "avx2-onednn-avx2"
    assert os.path.dirname(native) == os.path.dirname(capped)
    assert where(TORCHINDUCTOR_CACHE_DIR=str(tmp_path)) == str(tmp_path)
    # A capped process started by a native one inherits its directory: it takes its own instead.
    assert where(TORCHINDUCTOR_CACHE_DIR=native, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2") == capped


def test_a_trial_is_remembered_per_machine_model_and_batch(tmp_path, monkeypatch, capsys):
    """The trial's outcome is kept in the cache file under a key of what it depends on: a second
    run of the same model, batch and layout takes it (same dtype, no steps run); anything else
    measures again; 'off' always measures; a damaged or unwritable cache costs only a trial."""
    monkeypatch.delenv(P.ENV_RATES, raising=False)
    cache = tmp_path / "cache" / "precision.json"
    monkeypatch.setenv(P.TRIAL_CACHE_ENV, str(cache))
    probe = P.resolve("auto", "cpu", FAST_BF16)
    small, wide = torch.nn.Linear(8, 8), torch.nn.Linear(8, 16)
    batch = {"x": torch.zeros(4, 8), "y": torch.zeros(4, dtype=torch.long)}
    key = P.trial_key(small, batch)
    assert key == P.trial_key(torch.nn.Linear(8, 8), {"y": torch.ones(4, dtype=torch.long), "x": torch.ones(4, 8)})
    others = {P.trial_key(wide, batch), P.trial_key(small, {**batch, "x": torch.zeros(8, 8)}),
              P.trial_key(small, batch, "dp=2"), P.trial_key(small.to(torch.bfloat16), batch)}
    monkeypatch.setenv("EXAFLOP_SWIGLU_KERNEL", "0")  # a kernel switched off changes what a step runs
    others.add(P.trial_key(small, batch))
    monkeypatch.delenv("EXAFLOP_SWIGLU_KERNEL")
    assert len(others) == 5 and key not in others

    def slow_bf16(dtype):
        time.sleep(0.02 if dtype is torch.bfloat16 else 0.005)

    def no_step(dtype):
        pytest.fail("the remembered outcome should have been used")

    first = P.confirm_by_trial(probe, slow_bf16, key=key)
    assert first.name == "fp32" and cache.is_file()
    again = P.confirm_by_trial(probe, no_step, key=key)
    assert (again.name, again.trial_ms) == (first.name, first.trial_ms) and str(cache) in again.reason
    assert P.confirm_by_trial(probe, no_step, key=key, writer=False).name == "fp32"
    calls = []
    P.confirm_by_trial(probe, lambda d: calls.append(d), key=others.pop())  # a new key: measured
    assert len(calls) == 6 and len(json_of(cache)) == 2
    readers_only = P.confirm_by_trial(probe, lambda d: None, key="not-written", writer=False)
    assert readers_only.trial_ms and "not-written" not in json_of(cache)

    monkeypatch.setenv(P.TRIAL_CACHE_ENV, "off")
    calls.clear()
    P.confirm_by_trial(probe, lambda d: calls.append(d), key=key)
    assert len(calls) == 6 and P.trial_cache_path() is None

    monkeypatch.setenv(P.TRIAL_CACHE_ENV, str(cache))
    cache.write_text('{"' + key + '": {"bf16": "fast"')  # a damaged file: measured again, then replaced
    assert P.confirm_by_trial(probe, slow_bf16, key=key).name == "fp32" and key in json_of(cache)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(P.TRIAL_CACHE_ENV, str(blocker / "precision.json"))  # cannot be created
    assert P.confirm_by_trial(probe, slow_bf16, key=key).name == "fp32"
    assert "could not remember the precision trial" in capsys.readouterr().err


def json_of(path):
    import json

    return json.loads(path.read_text())


def test_a_second_run_takes_the_first_runs_trial(tmp_path, data_dir, monkeypatch):
    """Two runs of the same model on this machine: the second does not measure again and trains
    in the first's dtype (where the probe says fp32, as on an AVX2-only CPU, neither has a trial)."""
    monkeypatch.delenv(P.ENV_RATES, raising=False)
    cache = tmp_path / "precision.json"
    monkeypatch.setenv(P.TRIAL_CACHE_ENV, str(cache))
    heads = []
    for name in ("first", "second"):
        o = [x for x in tiny_overrides(tmp_path, data_dir, name, "train.steps=1") if not x.startswith("run.dtype")]
        train(load_config("lm-tiny", o), quiet=True)
        heads.append(next(r for r in read_metrics(tmp_path / "runs" / name) if r["kind"] == "run"))
    assert heads[0]["dtype"] == heads[1]["dtype"] and heads[0]["trial_ms"] == heads[1]["trial_ms"]
    if heads[0]["trial_ms"]:
        assert list(json_of(cache).values()) == [heads[0]["trial_ms"]]
    else:
        assert heads[0]["dtype"] == "fp32" and not cache.exists()
