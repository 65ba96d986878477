"""The task-agnostic training loop: one process or many, same code.

Per optimizer step k: the data-parallel ranks together consume global samples
[k·B, (k+1)·B) of the stream (see exaflop.data.stream), each in `accum`
micro-batches; gradients are clipped, non-finite steps are skipped by policy,
and AdamW steps with the scheduled learning rate. Checkpoints carry everything
needed to continue bit-exactly: model, optimizer, step (= data cursor), RNG.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from exaflop.config import Config, save_config
from exaflop.data.stream import StreamLayout, eval_batches, make_loader
from exaflop.engine import runtime as rtm
from exaflop.engine.checkpoint import Checkpointer, latest_complete
from exaflop.engine.faults import Drills
from exaflop.engine.optim import build_optimizer, lr_at
from exaflop.engine.parallel import data_parallel_size, local_tensor, parallelize, unwrap
from exaflop.engine.precision import agree, compile_cache_per_isa, peak_dtype
from exaflop.engine.step import to_device, train_step
from exaflop.engine.task import build_task
from exaflop.engine.telemetry import MetricsLog, peak_mem_mb, per_rank
from exaflop.errors import UserError
from exaflop.progress import console, progress_bar


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and exits."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)

    def any_rank(self, rt, joiners: int = 0) -> tuple[bool, int]:
        """Preemption may reach one rank only: all ranks agree so they save together. The same
        all-reduce carries rank 0's count of registered elastic replacements (engine/elastic.py),
        so every member decides to grow at the same step boundary."""
        flag = torch.tensor([1 if self.signal is not None else 0, joiners], device=rt.device)
        if rt.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag[0].item()), int(flag[1].item())


def global_batch_of(cfg: Config, task) -> int:
    if cfg.train.global_batch:
        return cfg.train.global_batch
    if cfg.train.global_batch_tokens:
        tps = getattr(task, "tokens_per_sample", None)
        if not tps:
            raise UserError("train.global_batch_tokens needs a task with tokens per sample; set train.global_batch")
        return max(1, round(cfg.train.global_batch_tokens / tps))
    return cfg.train.micro_batch


def _check_resume_compatible(cfg: Config, meta: dict[str, Any]) -> None:
    if meta.get("config_hash") != cfg.hash():
        saved = meta.get("model_config", {})
        now = cfg.to_dict()["model"]
        diff = [f"{k}: checkpoint {saved.get(k)!r} vs config {now.get(k)!r}"
                for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        what = "; model.".join(diff[:3]) if diff else f"task {meta.get('task')!r} vs {cfg.task!r}"
        raise UserError(f"--resume: the checkpoint does not fit this config (model.{what}); "
                        "use the original config or a new run name")


def train(cfg: Config, resume: bool = False, quiet: bool = False,
          record_samples: bool = False) -> dict[str, Any]:
    rt = rtm.setup(cfg)
    heartbeat = rtm.Heartbeat(rt)
    try:
        return _train(cfg, rt, heartbeat, resume, quiet, record_samples)
    except Exception as e:
        # A hung peer shows up as a socket timeout deep in gloo/NCCL: say which rank stopped.
        if rt.distributed and rtm.is_timeout(e):
            raise rtm.CollectiveTimeout(heartbeat.explain(heartbeat.step, cfg.parallel.timeout_s)) from e
        raise


def _train(cfg: Config, rt: rtm.Runtime, heartbeat: rtm.Heartbeat, resume: bool, quiet: bool,
           record_samples: bool) -> dict[str, Any]:
    run_dir = cfg.run_dir
    task = build_task(cfg)
    model = task.build_model()
    joined = None
    if rt.elastic is not None and rt.elastic.joining:
        # A replacement for a lost replica: ready to train, it now waits for the group to admit it.
        from exaflop.engine.elastic import admit

        joined = admit(rt, heartbeat)
        if joined is None:
            return {"step": 0, "joined": False, "run_dir": str(run_dir)}
    if rt.elastic is not None and cfg.parallel.mode == "auto":
        cfg.parallel.mode = "ddp"  # elastic replicas are whole copies: auto means DDP here
    model = parallelize(model, task, cfg, rt)
    if rt.elastic is not None and (rt.layout.wrap == "fsdp" or rt.layout.tp * rt.layout.pp * rt.layout.ep > 1):
        raise UserError(f"--elastic re-splits data-parallel replicas only ({rt.layout.describe()}); "
                        "set parallel.mode=ddp and tp/pp/ep to 1")
    if cfg.run.compile:
        compile_cache_per_isa()
        # On CPU the graph's wrapper in C++ rather than Python: ~200 kernel calls a step without the
        # interpreter between them (lm-small, AMX bf16: ~5% more tokens/s, paired; ~7 s more to compile).
        model = torch.compile(model, options={"cpp_wrapper": True} if rt.device.type == "cpu" else None)
    optimizer = build_optimizer(model, cfg.optim, rt.device)
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)

    start_step, skipped = 0, 0
    if joined is not None:  # the optimizer state, step and RNG from rank 0, not from disk
        from exaflop.engine.elastic import share_state

        meta, _ = share_state(optimizer, None)
        start_step, skipped = meta["step"], meta["skipped"]
        rtm.set_rng_state(meta["rng"])
    elif resume:
        if not ckpt.root.exists():
            raise UserError(f"--resume: {run_dir} has no checkpoints; start without --resume")
        meta, rng, problems = _load(ckpt, model, optimizer, cfg)
        for p in problems:
            if rt.is_main:
                console.print(f"[yellow]skipped incomplete checkpoint: {p}")
        start_step = int(meta["step"])
        if rng is not None:
            rtm.set_rng_state(rng)
    B = global_batch_of(cfg, task)
    workers = getattr(cfg.data, "num_workers", 0)
    train_src, val_src = task.build_dataset("train"), task.build_dataset("val")
    layout, loader, val = _split_data(cfg, rt, task, train_src, val_src, B, start_step, workers)
    pipe = None
    if rt.layout.pp > 1:
        from exaflop.engine.pipeline import Pipeline

        pipe = Pipeline(model, task, cfg, rt, rt.layout, rt.mesh, layout.accum_steps)
    # A trial under compile would compile both dtypes, and a pipeline stage cannot run a step
    # alone: those keep the probe's choice.
    if not cfg.run.compile and pipe is None and joined is None:
        _confirm_precision(model, task, train_src, layout.micro_batch, rt)
    if rt.is_main:
        # The run records what "auto" became on this machine (a resume elsewhere resolves again).
        cfg.run.resolved_dtype = rt.precision.name
        save_config(cfg, run_dir / "config.toml")
        if hasattr(task, "save_assets"):  # a copied run samples and serves without the data
            task.save_assets(run_dir)

    log = MetricsLog(run_dir, rt.is_main, cfg.run.tensorboard)
    # Elastic: any replica may become rank 0 and report MFU.
    peak = rtm.measure_peak_flops(rt.device, peak_dtype(rt.precision)) if rt.is_main or rt.elastic else 1.0
    total = cfg.train.steps
    record = record_samples or os.environ.get("EXAFLOP_RECORD_SAMPLES") == "1"
    # Elastic ranks change as members come and go: files are named by the fixed member id.
    member = rt.elastic.member if rt.elastic is not None else rt.rank
    drills = Drills(rt.rank, cfg.train.inject_nan_at_step, run_dir / f"samples_rank{member}.jsonl" if record else None)
    if rt.is_main and rt.distributed and not quiet:
        console.print(f"[dim]{rt.layout.describe()}")
    if rt.is_main and not quiet:
        console.print(f"[dim]precision: {rt.precision.describe()}; MFU against the measured "
                      f"{str(peak_dtype(rt.precision)).removeprefix('torch.')} matmul peak {peak / 1e9:,.0f} GFLOP/s per rank", highlight=False)
    log.log({"kind": "run", "step": start_step, "dtype": rt.precision.name, "dtype_requested": cfg.run.dtype,
             "matmul_gflops": rt.precision.rates, "trial_ms": rt.precision.trial_ms, "peak_gflops": peak / 1e9,
             "world": rt.world, "params_local": _local_numel(model), **(pipe.describe() if pipe else {})})
    # Each component decides its own cadence; the loop only runs steps and asks them.
    meter = _Meter(log, cfg, rt, task, B, peak, start_step, pipe)
    evaluator = _Evaluator(task, val, rt, cfg.eval.every, total)
    eval_model = model
    if pipe is not None:
        from exaflop.engine.pipeline import EvalModel

        eval_model = EvalModel(pipe)
    saver = _Saver(ckpt, cfg, log)

    result: dict[str, Any] = {"step": start_step, "stopped_by_signal": False}
    bad_run = 0
    extra = "loss {task.fields[loss]} | {task.fields[rate]} | MFU {task.fields[mfu]}"
    with _StopFlag() as stop, progress_bar(quiet or not rt.is_main, extra) as bar:
        bar_task = bar.add_task(f"train {rt.precision.name}", total=total, completed=start_step, loss="-", rate="-", mfu="-")
        meter.start()
        for step in range(start_step, total):
            heartbeat.beat(step)
            drills.before_step(step)
            lr = lr_at(step, total, cfg.optim)
            while True:
                try:
                    if pipe is None:
                        out = train_step(model, optimizer, task, loader, layout.accum_steps, rt, step, lr,
                                         cfg.optim.grad_clip, drills, before_update=ckpt.wait_staged)
                    else:
                        out = pipe.step(optimizer, loader, layout.accum_steps, step, lr, cfg.optim.grad_clip,
                                        drills, before_update=ckpt.wait_staged)
                    break
                except Exception as e:
                    if rt.elastic is None or not rt.elastic.is_peer_failure(e):
                        raise
                    # A replica is gone mid-step: re-form without it and run this step again.
                    optimizer.zero_grad(set_to_none=True)
                    drills.discard(step)
                    model, layout, loader = _reformed(rt.elastic.reform(), cfg, rt, task, model, train_src, B, step,
                                                      log, heartbeat, evaluator, val_src, workers)
                    eval_model = model  # elastic runs have no pipeline
            if not out.finite:
                skipped += 1
                bad_run += 1
                log.log({"kind": "bad_step", "step": step + 1, "loss": out.loss, "grad_norm": out.grad_norm,
                         "skipped_steps": skipped})
                if cfg.train.nan_policy == "stop" or bad_run >= cfg.train.max_bad_steps:
                    raise UserError(f"train: {bad_run} consecutive non-finite steps (last at step {step + 1}, "
                                    f"loss={out.loss}, grad_norm={out.grad_norm}); lower optim.lr or check the data")
                bar.update(bar_task, advance=1)
                continue
            bad_run = 0
            done = step + 1
            if meter.due(done):
                fields = meter.record(done, out, lr, skipped, saver.blocked_s)
                bar.update(bar_task, **fields)
            bar.update(bar_task, advance=1)
            if evaluator.due(done):
                log.log(evaluator.run(eval_model, done))
            sliced = bool(cfg.train.stop_after) and done - start_step >= cfg.train.stop_after and done != total
            joiners = 0
            try:
                registered = rt.elastic.registered(done, rt.rank) if rt.elastic is not None else 0
                stopping, joiners = stop.any_rank(rt, registered)
                stopping = stopping or sliced
            except Exception as e:  # the step is applied everywhere; only the flag's exchange failed
                if rt.elastic is None or not rt.elastic.is_peer_failure(e):
                    raise
                model, layout, loader = _reformed(rt.elastic.reform(), cfg, rt, task, model, train_src, B, done,
                                                  log, heartbeat, evaluator, val_src, workers)
                eval_model = model
                stopping = sliced
            if saver.due(done, stopping):
                saver.save(model, optimizer, done, skipped)
            if rt.elastic is not None and joiners > rt.elastic.admitted and not stopping and done < total:
                # Replacements are ready: grow back; they get rank 0's state by broadcast.
                model, layout, loader = _reformed(rt.elastic.grow(joiners), cfg, rt, task, model, train_src, B, done,
                                                  log, heartbeat, evaluator, val_src, workers, optimizer, skipped)
                eval_model = model
            if stopping:
                result["stopped_by_signal"] = not sliced
                result["stopped_early"] = True
                break
        else:
            done = total
        result["step"] = done if total > start_step else start_step
        if not result.get("stopped_early"):
            ev = evaluator.run(eval_model, result["step"])
            log.log(ev)
            result.update(ev)
            saver.save(model, optimizer, result["step"], skipped, final=True)
    ckpt.wait()
    result.update({"skipped_steps": skipped, "ckpt_s": saver.blocked_s, "train": meter.last, "run_dir": str(run_dir)})
    log.close()
    drills.close()
    return result


class _Meter:
    """The training records: every `train.log_every` steps and at the last, the loss, rates
    since the previous record, MFU and peak memory; returns the progress bar's fields."""

    def __init__(self, log: MetricsLog, cfg: Config, rt: rtm.Runtime, task, global_batch: int, peak: float,
                 start_step: int, pipe=None) -> None:
        self.pipe = pipe
        self.log, self.rt, self.every, self.total = log, rt, cfg.train.log_every, cfg.train.steps
        self.B, self.peak, self.start_step = global_batch, peak, start_step
        self.flops_step = task.flops_per_sample() * global_batch
        self.tps = getattr(task, "tokens_per_sample", 0)
        self.last: dict[str, Any] = {}
        self.t_last = time.perf_counter()

    def start(self) -> None:
        self.t_last = time.perf_counter()

    def due(self, done: int) -> bool:
        return done % self.every == 0 or done == self.total

    def record(self, done: int, out, lr: float, skipped: int, ckpt_s: float) -> dict[str, str]:
        rt = self.rt
        now = time.perf_counter()
        n_steps = done - max(self.start_step, self.last.get("step", self.start_step))
        dt = max(1e-9, now - self.t_last)
        self.t_last = now
        sps = n_steps * self.B / dt
        mfu = self.flops_step * n_steps / dt / (self.peak * rt.world)
        mem = per_rank(peak_mem_mb(), rt.distributed, rt.device)
        last = {"kind": "train", "step": done, "dtype": rt.precision.name, "loss": out.loss, "lr": lr,
                "grad_norm": out.grad_norm, "samples_per_s": sps, "tokens_per_s": sps * self.tps, "mfu": mfu,
                "skipped_steps": skipped, "ckpt_s": ckpt_s, "elapsed_s": dt, "peak_mem_mb": max(mem), **out.metrics}
        if rt.distributed:
            last.update({"world": rt.world, "tokens_per_s_per_rank": sps * self.tps / rt.world,
                         "peak_mem_mb_per_rank": mem})
        if self.pipe is not None and self.pipe.shares:
            last["mfu_per_stage"] = self.pipe.stage_mfu(mfu)
        self.log.log(last)
        self.last = last
        rate = f"{sps * self.tps:,.0f} tok/s" if self.tps else f"{sps:,.1f} samples/s"
        return {"loss": f"{out.loss:.3f}", "rate": rate, "mfu": f"{100 * mfu:.1f}%"}


def _reformed(rec: dict[str, Any], cfg: Config, rt: rtm.Runtime, task, model, train_src, B: int, step: int,
              log: MetricsLog, heartbeat, evaluator, val_src, workers: int, optimizer=None, skipped: int = 0):
    """After the elastic group re-formed (`rec` from Elastic.reform or .grow): the new group's
    DDP wrapper, with any replacements given rank 0's state (engine/elastic.py `rewrap`), and the
    same global batch re-split over its members from step `step` on (the global cursor)."""
    from torch.distributed.distributed_c10d import _get_default_store

    from exaflop.engine.elastic import rewrap

    meta = {"step": step, "skipped": skipped, "rng": rtm.rng_state()}
    model = rewrap(rec, cfg.parallel, rt, model, optimizer, meta)
    layout, loader, evaluator.val = _split_data(cfg, rt, task, train_src, val_src, B, step, workers)
    heartbeat.store = _get_default_store()
    if rt.is_main:
        log.enable()
        if rec["left"]:
            console.print(f"[yellow]step {step}: replica(s) {rec['left']} lost; continuing on {rt.world} "
                          f"(stalled {rec['stall_s']:.1f}s)")
        else:
            console.print(f"[green]step {step}: replacement(s) {rec['joined']} joined with rank 0's state; "
                          f"{rt.world} replicas (stalled {rec['stall_s']:.1f}s)")
    log.log({**rec, "step": step})
    return model, layout, loader


def _split_data(cfg: Config, rt: rtm.Runtime, task, train_src, val_src, B: int, step: int, workers: int):
    """This rank's share of the global batch from optimizer step `step` on (the stream layout and
    loader) and its evaluation batches: at the start, and again when an elastic group shrinks."""
    dp_world, dp_rank = data_parallel_size(cfg, rt)
    # A micro-batch larger than a rank's share of the global batch shrinks to that share,
    # so a preset written for one process also runs on N.
    micro = min(cfg.train.micro_batch, max(1, B // dp_world))
    if rt.layout.pp > 1:
        from exaflop.engine.pipeline import pipeline_micro_batch

        micro = pipeline_micro_batch(B // dp_world, micro, rt.layout.pp)
    layout = StreamLayout(B, micro, dp_rank, dp_world)
    loader = make_loader(train_src, task.collate, layout, cfg.run.seed, step, workers)
    # Every data-parallel rank evaluates the same number of batches: FSDP and TP forwards are
    # collectives, so a rank with one batch fewer would leave the others waiting forever.
    n_eval = -(-cfg.eval.batches // dp_world) * dp_world
    val = eval_batches(val_src, task.collate, cfg.train.micro_batch, n_eval, dp_rank, dp_world)
    return layout, loader, val


def _local_numel(model) -> int:
    """Parameter elements this rank holds (its shards under FSDP/TP/EP)."""
    return sum(local_tensor(p).numel() for p in model.parameters())


class _Evaluator:
    """Validation every `eval.every` steps (0: only at the end) on the same held-out batches."""

    def __init__(self, task, val: list, rt: rtm.Runtime, every: int, total: int) -> None:
        self.task, self.val, self.rt, self.every, self.total = task, val, rt, every, total

    def due(self, done: int) -> bool:
        return bool(self.every) and done % self.every == 0 and done != self.total

    @torch.no_grad()
    def run(self, model, step: int) -> dict[str, Any]:
        rt = self.rt
        model.eval()
        batches = [to_device(b, rt.device) for b in self.val]
        with rt.autocast():
            # DDP's forward broadcasts buffers (a collective): evaluate the wrapped module directly.
            res = self.task.evaluate(unwrap(model), batches)
        if rt.distributed:
            keys = sorted(res)
            t = torch.tensor([res[k] for k in keys], dtype=torch.float64, device=rt.device)
            dist.all_reduce(t)
            res = {k: float(v) / rt.world for k, v in zip(keys, t.tolist(), strict=True)}
        return {"kind": "eval", "step": step, **res}


class _Saver:
    """Checkpoints every `checkpoint.every` steps (0: only at the end), when stopping (a
    signal, `train.stop_after`) and at the end; counts the time they blocked training."""

    def __init__(self, ckpt: Checkpointer, cfg: Config, log: MetricsLog) -> None:
        self.ckpt, self.cfg, self.log = ckpt, cfg, log
        self.every, self.total = cfg.checkpoint.every, cfg.train.steps
        self.blocked_s = 0.0

    def due(self, done: int, stopping: bool) -> bool:
        return stopping or bool(self.every and done % self.every == 0 and done != self.total)

    def save(self, model, optimizer, step: int, skipped: int, final: bool = False) -> None:
        blocked = _save(self.ckpt, model, optimizer, self.cfg, step, skipped)
        self.blocked_s += blocked
        if not final:
            self.log.log({"kind": "checkpoint", "step": step, "blocked_s": blocked, "ckpt_s": self.blocked_s,
                          "async": self.ckpt.async_save})


def _load(ckpt, model, optimizer, cfg):
    path, problems = latest_complete(ckpt.root, "--resume")
    _check_resume_compatible(cfg, json.loads((path / "meta.json").read_text()))
    meta, rng, _ = ckpt.load(model, optimizer, path)
    return meta, rng, problems


def _save(ckpt: Checkpointer, model, optimizer, cfg: Config, step: int, skipped: int) -> float:
    meta = {"step": step, "cursor": step, "config_hash": cfg.hash(), "task": cfg.task,
            "model_config": cfg.to_dict()["model"], "skipped_steps": skipped, "seed": cfg.run.seed}
    return ckpt.save(model, optimizer, meta, rtm.rng_state())


def _confirm_precision(model, task, source, micro: int, rt: rtm.Runtime) -> None:
    """`auto` chose bf16 from the matmul probe: check it on this model (precision.confirm_by_trial).

    A real micro-batch (the first samples; the loader's cursor is untouched) runs forward and
    backward in each dtype with the model in eval mode (no dropout draws, no BatchNorm
    statistics updated) and the RNG forked, then the gradients are dropped, so training
    starts exactly as without the trial. Every rank runs it (FSDP/TP forwards are
    collectives); rank 0's choice is taken by all.
    """
    from exaflop.engine.precision import confirm_by_trial, trial_key

    if rt.precision is None or rt.precision.requested != "auto" or rt.precision.name != "bf16":
        return
    batch = to_device(task.collate([source[i] for i in range(min(micro, len(source)))]), rt.device)
    was_training = model.training
    model.eval()

    def step(dtype) -> None:
        ctx = torch.autocast(rt.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with ctx:
            loss, _ = task.loss(model, batch)
        loss.backward()
        if rt.device.type == "cuda":
            torch.cuda.synchronize()

    devices = [rt.device] if rt.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        key = trial_key(model, batch, rt.layout.describe() if rt.distributed else "")
        p = confirm_by_trial(rt.precision, step, key=key, distributed=rt.distributed, writer=rt.is_main)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if rt.distributed:
        p = agree(p, rt.device)
    rt.precision, rt.dtype = p, p.dtype


def train_main(cfg: Config, resume: bool, quiet: bool = False) -> dict[str, Any]:
    """Entry for `exaflop train` and `torchrun -m exaflop.train`: train, then tear down.

    The process group is destroyed only after success: after a failure a peer may be gone,
    teardown then talks to the rendezvous store the restarted group is about to use, and
    the process is about to exit anyway.
    """
    result = train(cfg, resume=resume, quiet=quiet)
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


__all__ = ["train", "train_main", "global_batch_of", "Path"]
