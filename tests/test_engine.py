"""The single-process engine: learning, exact resume, crash-safe checkpoints, signals."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from exaflop.config import load_config
from exaflop.engine.checkpoint import list_checkpoints, read_latest
from exaflop.engine.optim import lr_at
from exaflop.engine.telemetry import read_metrics
from exaflop.engine.trainer import train
from exaflop.errors import UserError
from tests.conftest import REPO, tiny_overrides


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]


def test_loss_falls_and_metrics_are_logged(tmp_path, data_dir):
    cfg = load_config("lm-tiny", tiny_overrides(tmp_path, data_dir, "learn", "train.steps=40", "optim.lr=3e-3"))
    result = train(cfg, quiet=True)
    ls = losses(cfg.run_dir)
    assert len(ls) == 40
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 0.5
    assert result["val_loss"] < ls[0]
    rec = [r for r in read_metrics(cfg.run_dir) if r["kind"] == "train"][-1]
    assert rec["tokens_per_s"] > 0 and 0 < rec["mfu"] < 1 and rec["peak_mem_mb"] > 0
    assert (cfg.run_dir / "config.toml").is_file()
    assert read_latest(cfg.run_dir / "checkpoints")[0].name == "step_000000040"


def test_moe_run_logs_expert_load_and_balance_terms_to_jsonl_and_tensorboard(tmp_path, data_dir):
    pytest.importorskip("tensorboard")  # the [tb] extra (in `make test`'s set)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    o = tiny_overrides(tmp_path, data_dir, "moe", "train.steps=3", "model.n_experts=4", "model.top_k=2",
                       "model.d_ff=64", "model.moe_aux_coef=0.01", "run.tensorboard=true")
    cfg = load_config("lm-tiny", o)
    train(cfg, quiet=True)
    recs = read_metrics(cfg.run_dir)
    last = [r for r in recs if r["kind"] == "train"][-1]
    for key in ("moe_load_l0", "moe_load_l1", "moe_load_max_over_mean", "aux_loss", "ce_loss"):
        assert key in last
    assert last["moe_load_max_over_mean"] == max(last["moe_load_l0"], last["moe_load_l1"]) >= 1
    assert last["loss"] == pytest.approx(last["ce_loss"] + last["aux_loss"], rel=1e-6)
    ev = [r for r in recs if r["kind"] == "eval"][-1]
    assert "aux_loss" not in ev and "val_loss" in ev
    acc = EventAccumulator(str(cfg.run_dir / "tb")).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/moe_load_l0", "train/moe_load_max_over_mean", "train/aux_loss", "eval/val_loss"} <= tags
    assert [e.value for e in acc.Scalars("train/moe_load_l1")][-1] == pytest.approx(last["moe_load_l1"], rel=1e-6)


def test_exact_resume_is_bitwise(tmp_path, data_dir):
    base = tiny_overrides(tmp_path, data_dir, "straight", "train.steps=12", "model.dropout=0.1")
    train(load_config("lm-tiny", base), quiet=True)
    sliced = tiny_overrides(tmp_path, data_dir, "sliced", "train.steps=12", "model.dropout=0.1")
    first = train(load_config("lm-tiny", [*sliced, "train.stop_after=6"]), quiet=True)
    assert first["step"] == 6 and first["stopped_early"]
    train(load_config("lm-tiny", sliced), resume=True, quiet=True)
    straight, resumed = losses(tmp_path / "runs" / "straight"), losses(tmp_path / "runs" / "sliced")
    assert len(straight) == len(resumed) == 12
    assert straight == resumed  # bitwise, same thread count



@pytest.mark.compile
def test_compiled_training_resumes_bitwise_and_follows_eager(tmp_path, data_dir):
    # The trainer's compiled step (C++ graph wrapper on CPU, engine/trainer.py), fp32.
    eager = tiny_overrides(tmp_path, data_dir, "eager", "train.steps=8")
    train(load_config("lm-tiny", eager), quiet=True)
    base = tiny_overrides(tmp_path, data_dir, "straight", "train.steps=8", "run.compile=true")
    train(load_config("lm-tiny", base), quiet=True)
    sliced = tiny_overrides(tmp_path, data_dir, "sliced", "train.steps=8", "run.compile=true")
    train(load_config("lm-tiny", [*sliced, "train.stop_after=4"]), quiet=True)
    train(load_config("lm-tiny", sliced), resume=True, quiet=True)
    runs = tmp_path / "runs"
    straight, resumed, reference = losses(runs / "straight"), losses(runs / "sliced"), losses(runs / "eager")
    assert len(straight) == len(resumed) == 8
    assert straight == resumed  # bitwise across the resume
    # Compiled kernels reassociate sums: fp32 rounding apart from eager, not a different model.
    assert straight == pytest.approx(reference, rel=1e-4)

def test_schedules():
    cfg = load_config("lm-tiny", ["optim.warmup_steps=10", "optim.lr=1.0", "optim.min_lr_ratio=0.1"]).optim
    assert lr_at(0, 100, cfg) == pytest.approx(0.1) and lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(99, 100, cfg) == pytest.approx(0.1, abs=1e-3)
    cfg.schedule = "wsd"
    cfg.decay_frac = 0.2
    assert lr_at(50, 100, cfg) == 1.0 and lr_at(79, 100, cfg) == 1.0 and lr_at(90, 100, cfg) < 1.0


def test_resume_with_incompatible_config_names_the_mismatch(tmp_path, data_dir):
    o = tiny_overrides(tmp_path, data_dir, "mismatch", "train.steps=2")
    train(load_config("lm-tiny", o), quiet=True)
    with pytest.raises(UserError, match="model.d_model: checkpoint 64 vs config 96"):
        train(load_config("lm-tiny", [*o, "model.d_model=96", "train.steps=4"]), resume=True, quiet=True)


def _cli(args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "exaflop", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, **kw)


def _set(o):
    return [x for item in o for x in ("--set", item)]


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, data_dir):
    o = tiny_overrides(tmp_path, data_dir, "crash", "train.steps=4", "checkpoint.every=2")
    # The process dies (os._exit) after writing step 4's shards but before the rename.
    r = _cli(["train", "lm-tiny", "--quiet", *_set(o)], env={"EXAFLOP_FAULT": "before_rename"})
    assert r.returncode == 17
    root = tmp_path / "runs" / "crash" / "checkpoints"
    # First run crashed at its very first save (step 2): nothing complete, no `latest`.
    assert read_latest(root)[0] is None and not (root / "latest").exists()
    assert any(p.name.startswith(".tmp-") for p in root.iterdir())


def test_crash_after_a_good_checkpoint_leaves_latest_on_it(tmp_path, data_dir):
    o = tiny_overrides(tmp_path, data_dir, "crash3", "train.steps=4", "checkpoint.every=2")
    assert _cli(["train", "lm-tiny", "--quiet", *_set([*o, "train.stop_after=2"])]).returncode == 0
    r = _cli(["train", "lm-tiny", "--quiet", "--resume", *_set(o)], env={"EXAFLOP_FAULT": "before_rename"})
    assert r.returncode == 17
    root = tmp_path / "runs" / "crash3" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000000002"
    assert read_latest(root)[0].name == "step_000000002"
    resumed = _cli(["train", "lm-tiny", "--quiet", "--resume", *_set(o)])
    assert resumed.returncode == 0, resumed.stderr
    assert read_latest(root)[0].name == "step_000000004"


def test_full_disk_during_checkpoint_fails_cleanly(tmp_path, data_dir):
    o = tiny_overrides(tmp_path, data_dir, "full", "train.steps=4")
    assert _cli(["train", "lm-tiny", "--quiet", *_set([*o, "train.stop_after=2"])]).returncode == 0
    # A file-size limit makes the next shard write fail with EFBIG, like a full disk would.
    limit = "import resource, signal, sys, runpy; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); " \
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); sys.argv = ['exaflop'] + sys.argv[1:]; " \
            "runpy.run_module('exaflop', run_name='__main__')"
    r = subprocess.run([sys.executable, "-c", limit, "train", "lm-tiny", "--quiet", "--resume", *_set(o)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert "step_000000002 is intact" in r.stderr and "File too large" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    root = tmp_path / "runs" / "full" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000000002"
    assert read_latest(root)[0].name == "step_000000002"


def test_sigint_saves_a_checkpoint_and_exits_cleanly(tmp_path, data_dir):
    o = tiny_overrides(tmp_path, data_dir, "sig", "train.steps=100000", "train.log_every=1")
    p = subprocess.Popen([sys.executable, "-m", "exaflop", "train", "lm-tiny", "--quiet", *_set(o)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "runs" / "sig" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "stopped early" in err
    ckpts = list_checkpoints(tmp_path / "runs" / "sig" / "checkpoints")
    assert ckpts and json.loads((ckpts[0] / "meta.json").read_text())["step"] >= 3
