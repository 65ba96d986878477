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
import math
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
from exaflop.engine.faults import maybe_inject
from exaflop.engine.optim import build_optimizer, lr_at
from exaflop.engine.parallel import (
    clip_grad_norm,
    data_parallel_size,
    parallelize,
    set_grad_sync,
    unwrap,
)
from exaflop.engine.precision import peak_dtype
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

    def any_rank(self, rt) -> bool:
        """Preemption may reach one rank only: all ranks agree so they save together."""
        flag = torch.tensor([1 if self.signal is not None else 0], device=rt.device)
        if rt.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def global_batch_of(cfg: Config, task) -> int:
    if cfg.train.global_batch:
        return cfg.train.global_batch
    if cfg.train.global_batch_tokens:
        tps = getattr(task, "tokens_per_sample", None)
        if not tps:
            raise UserError("train.global_batch_tokens needs a task with tokens per sample; set train.global_batch")
        return max(1, round(cfg.train.global_batch_tokens / tps))
    return cfg.train.micro_batch


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


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
    model = parallelize(model, task, cfg, rt)
    if cfg.run.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(model, cfg.optim, rt.device)
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)

    start_step = 0
    if resume:
        if not ckpt.root.exists():
            raise UserError(f"--resume: {run_dir} has no checkpoints; start without --resume")
        meta, rng, problems = _load(ckpt, model, optimizer, cfg)
        for p in problems:
            if rt.is_main:
                console.print(f"[yellow]skipped incomplete checkpoint: {p}")
        start_step = int(meta["step"])
        if rng is not None:
            rtm.set_rng_state(rng)
    dp_world, dp_rank = data_parallel_size(cfg, rt)
    B = global_batch_of(cfg, task)
    # A micro-batch larger than a rank's share of the global batch shrinks to that share,
    # so a preset written for one process also runs on N.
    micro = min(cfg.train.micro_batch, max(1, B // dp_world))
    layout = StreamLayout(B, micro, dp_rank, dp_world)
    workers = getattr(cfg.data, "num_workers", 0)
    train_src = task.build_dataset("train")
    loader = make_loader(train_src, task.collate, layout, cfg.run.seed, start_step, workers)
    val_src = task.build_dataset("val")
    # Every data-parallel rank evaluates the same number of batches: FSDP and TP forwards are
    # collectives, so a rank with one batch fewer would leave the others waiting forever.
    n_eval = -(-cfg.eval.batches // dp_world) * dp_world
    val = eval_batches(val_src, task.collate, cfg.train.micro_batch, n_eval, dp_rank, dp_world)
    if not cfg.run.compile:  # a trial under compile would compile both dtypes: keep the probe's choice
        _confirm_precision(model, task, train_src, micro, rt)
    if rt.is_main:
        # The run records what "auto" became on this machine (a resume elsewhere resolves again).
        cfg.run.resolved_dtype = rt.precision.name
        save_config(cfg, run_dir / "config.toml")
        if hasattr(task, "save_assets"):  # a copied run samples and serves without the data
            task.save_assets(run_dir)

    log = MetricsLog(run_dir, rt.is_main, cfg.run.tensorboard)
    peak = rtm.measure_peak_flops(rt.device, peak_dtype(rt.precision)) if rt.is_main else 1.0
    flops_step = task.flops_per_sample() * B
    tps = getattr(task, "tokens_per_sample", 0)
    total = cfg.train.steps
    record_samples = record_samples or os.environ.get("EXAFLOP_RECORD_SAMPLES") == "1"
    if record_samples:
        run_dir.mkdir(parents=True, exist_ok=True)  # rank 0 may not have made it yet
    samples_file = open(run_dir / f"samples_rank{rt.rank}.jsonl", "a") if record_samples else None
    if rt.is_main and rt.distributed and not quiet:
        console.print(f"[dim]{rt.layout.describe()}")
    if rt.is_main and not quiet:
        console.print(f"[dim]precision: {rt.precision.describe()}; MFU against the measured "
                      f"{str(peak_dtype(rt.precision)).removeprefix('torch.')} matmul peak {peak / 1e9:,.0f} GFLOP/s per rank", highlight=False)
    log.log({"kind": "run", "step": start_step, "dtype": rt.precision.name, "dtype_requested": cfg.run.dtype,
             "matmul_gflops": rt.precision.rates, "trial_ms": rt.precision.trial_ms, "peak_gflops": peak / 1e9,
             "world": rt.world})

    result: dict[str, Any] = {"step": start_step, "stopped_by_signal": False}
    ckpt_time, skipped, bad_run = 0.0, 0, 0
    last = {}
    extra = "loss {task.fields[loss]} | {task.fields[rate]} | MFU {task.fields[mfu]}"
    with _StopFlag() as stop, progress_bar(quiet or not rt.is_main, extra) as bar:
        bar_task = bar.add_task(f"train {rt.precision.name}", total=total, completed=start_step, loss="-", rate="-", mfu="-")
        t_last, step = time.perf_counter(), start_step
        for step in range(start_step, total):
            heartbeat.beat(step)
            maybe_inject(step, rt.rank)
            lr = lr_at(step, total, cfg.optim)
            for g in optimizer.param_groups:
                g["lr"] = lr
            model.train()
            loss_sum, metrics_sum = 0.0, {}
            for micro in range(layout.accum_steps):
                batch = _to_device(next(loader), rt.device)
                if samples_file is not None:
                    samples_file.write(f'{{"step": {step}, "ids": {batch["sample_ids"].tolist()}}}\n')
                    samples_file.flush()  # a killed rank must leave what it consumed on disk
                sync = micro == layout.accum_steps - 1
                with set_grad_sync(model, sync), rt.autocast():
                    loss, metrics = task.loss(model, batch)
                (loss / layout.accum_steps).backward()
                loss_sum += loss.detach().float().item() / layout.accum_steps
                for k, v in metrics.items():
                    metrics_sum[k] = metrics_sum.get(k, 0.0) + v / layout.accum_steps
            if step == cfg.train.inject_nan_at_step:
                next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))
            grad_norm = _clip(model, cfg.optim.grad_clip, rt)
            loss_all = _mean_over_ranks(loss_sum, rt)
            if not (math.isfinite(grad_norm) and math.isfinite(loss_all)):
                skipped += 1
                bad_run += 1
                optimizer.zero_grad(set_to_none=True)
                log.log({"kind": "bad_step", "step": step + 1, "loss": loss_all, "grad_norm": grad_norm,
                         "skipped_steps": skipped})
                if cfg.train.nan_policy == "stop" or bad_run >= cfg.train.max_bad_steps:
                    raise UserError(f"train: {bad_run} consecutive non-finite steps (last at step {step + 1}, "
                                    f"loss={loss_all}, grad_norm={grad_norm}); lower optim.lr or check the data")
                bar.update(bar_task, advance=1)
                continue
            bad_run = 0
            ckpt.wait_staged()  # an async save may still be copying the parameters
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1

            if done % cfg.train.log_every == 0 or done == total:
                now = time.perf_counter()
                n_steps = done - max(start_step, last.get("step", start_step))
                dt = max(1e-9, now - t_last)
                t_last = now
                sps = n_steps * B / dt
                mfu = flops_step * n_steps / dt / (peak * rt.world)
                mem = per_rank(peak_mem_mb(), rt.distributed, rt.device)
                last = {"kind": "train", "step": done, "dtype": rt.precision.name, "loss": loss_all, "lr": lr,
                        "grad_norm": grad_norm,
                        "samples_per_s": sps, "tokens_per_s": sps * tps, "mfu": mfu,
                        "skipped_steps": skipped, "ckpt_s": ckpt_time, "elapsed_s": dt,
                        "peak_mem_mb": max(mem), **metrics_sum}
                if rt.distributed:
                    last.update({"world": rt.world, "tokens_per_s_per_rank": sps * tps / rt.world,
                                 "peak_mem_mb_per_rank": mem})
                log.log(last)
                rate = f"{sps * tps:,.0f} tok/s" if tps else f"{sps:,.1f} samples/s"
                bar.update(bar_task, loss=f"{loss_all:.3f}", rate=rate, mfu=f"{100 * mfu:.1f}%")
            bar.update(bar_task, advance=1)

            if cfg.eval.every and done % cfg.eval.every == 0 and done != total:
                log.log(_evaluate(task, model, val, rt, done))
            sliced = bool(cfg.train.stop_after) and done - start_step >= cfg.train.stop_after and done != total
            stopping = stop.any_rank(rt) or sliced
            if stopping or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done != total):
                blocked = _save(ckpt, model, optimizer, cfg, done, skipped)
                ckpt_time += blocked
                log.log({"kind": "checkpoint", "step": done, "blocked_s": blocked, "ckpt_s": ckpt_time,
                         "async": ckpt.async_save})
            if stopping:
                result["stopped_by_signal"] = not sliced
                result["stopped_early"] = True
                break
        else:
            done = total
        result["step"] = done if total > start_step else start_step
        if not result.get("stopped_early"):
            ev = _evaluate(task, model, val, rt, result["step"])
            log.log(ev)
            result.update(ev)
            ckpt_time += _save(ckpt, model, optimizer, cfg, result["step"], skipped)
    ckpt.wait()
    result.update({"skipped_steps": skipped, "ckpt_s": ckpt_time, "train": last, "run_dir": str(run_dir)})
    log.close()
    if samples_file:
        samples_file.close()
    return result


def _load(ckpt, model, optimizer, cfg):
    path, problems = latest_complete(ckpt.root, "--resume")
    _check_resume_compatible(cfg, json.loads((path / "meta.json").read_text()))
    meta, rng, _ = ckpt.load(model, optimizer, path)
    return meta, rng, problems


def _save(ckpt: Checkpointer, model, optimizer, cfg: Config, step: int, skipped: int) -> float:
    meta = {"step": step, "cursor": step, "config_hash": cfg.hash(), "task": cfg.task,
            "model_config": cfg.to_dict()["model"], "skipped_steps": skipped, "seed": cfg.run.seed}
    return ckpt.save(model, optimizer, meta, rtm.rng_state())


def _clip(model, max_norm: float, rt) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if rt.distributed:  # DTensor gradients may live on several meshes (TP blocks, FSDP root)
        return clip_grad_norm(params, max_norm)
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP/TP
        norm = norm.full_tensor()
    return float(norm)


def _mean_over_ranks(x: float, rt) -> float:
    if not rt.distributed:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return float(t.item() / rt.world)


@torch.no_grad()
def _evaluate(task, model, val: list, rt, step: int) -> dict[str, Any]:
    model.eval()
    batches = [_to_device(b, rt.device) for b in val]
    with rt.autocast():
        # DDP's forward broadcasts buffers (a collective): evaluate the wrapped module directly.
        res = task.evaluate(unwrap(model), batches)
    if rt.distributed:
        keys = sorted(res)
        t = torch.tensor([res[k] for k in keys], dtype=torch.float64, device=rt.device)
        dist.all_reduce(t)
        res = {k: float(v) / rt.world for k, v in zip(keys, t.tolist(), strict=True)}
    return {"kind": "eval", "step": step, **res}


def _confirm_precision(model, task, source, micro: int, rt: rtm.Runtime) -> None:
    """`auto` chose bf16 from the matmul probe: check it on this model (precision.confirm_by_trial).

    A real micro-batch (the first samples; the loader's cursor is untouched) runs forward and
    backward in each dtype with the model in eval mode (no dropout draws, no BatchNorm
    statistics updated) and the RNG forked, then the gradients are dropped, so training
    starts exactly as without the trial. Every rank runs it (FSDP/TP forwards are
    collectives); rank 0's choice is taken by all.
    """
    from exaflop.engine.precision import confirm_by_trial

    if rt.precision is None or rt.precision.requested != "auto" or rt.precision.name != "bf16":
        return
    batch = _to_device(task.collate([source[i] for i in range(min(micro, len(source)))]), rt.device)
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
        p = confirm_by_trial(rt.precision, step)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if rt.distributed:
        p = rtm.agree(p, rt.device)
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
