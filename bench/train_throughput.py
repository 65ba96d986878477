"""Training throughput: exaflop's trainer vs the models a user would train instead, same shape, one run.

Measures in one run, on this machine, for the `lm-small` shape (6 layers, width 384, 6 heads,
seq 256, batch 8, vocab 8192):
  1. the matmul peak of the dtype used (GFLOP/s, best of a sweep of shapes) - the MFU denominator;
  2. exaflop's real trainer (data from shards, metrics from metrics.jsonl), eager and compiled;
  3. peers as installed packages (never copied code), each in a plain loop (AdamW, grad clip 1.0,
     autocast in the same dtype), eager and `torch.compile`d:
       * hf-gpt2   - transformers' GPT2LMHeadModel (nanoGPT's architecture) in nanoGPT's loop
                     (decay groups, betas 0.9/0.95, AdamW fused only on CUDA, as nanoGPT does);
       * hf-llama  - transformers' LlamaForCausalLM;
       * litgpt    - litgpt's GPT with a Llama config (`pip install litgpt`);
       * torchtitan - torchtitan's Llama3Model (`pip install torchtitan`), if it imports.
Every model has the same matmul FLOPs per token (GPT-2's 4x GeLU MLP = SwiGLU with d_ff 1024),
so one FLOP count serves all MFUs. Prints tokens/s, MFU, the CPU's capability and the ratios.
Usage:
    python bench/train_throughput.py [--steps 30] [--dtype auto] [--peers hf-gpt2,hf-llama,litgpt,torchtitan]
        [--no-compile] [--threads 2] [--repeat 3]
`--repeat N` runs everyone N times, alternating the order, and reports medians and each
repetition's own ratio (paired): this shared VM's speed drifts by up to 2x over minutes.
Each measurement runs in a fresh process, so none inherits another's allocator state,
compiled graphs or thread pools. exaflop's trainer keeps freed host buffers for reuse
(engine/host_memory.py); the peers run as they ship, with glibc's default malloc, unless
`--same-malloc` gives them the same setting (to see how much of a gap is the allocator).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from exaflop.engine.host_memory import keep_freed_memory
from exaflop.engine.precision import cpu_capability

warnings.filterwarnings("ignore")


# Square sizes plus the lm-small matmuls (tokens x width x hidden); the best rate is the peak.
PEAK_SHAPES = ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096), (2048, 384, 1024),
               (2048, 1024, 384), (2048, 384, 1152), (2048, 384, 8192), (2048, 8192, 384))

# --tiny: a seconds-long rehearsal of the whole script (the smoke test); its numbers mean nothing.
TINY_SETS = ["model.n_layer=1", "model.d_model=64", "model.n_head=2", "model.n_kv_head=2", "model.d_ff=128",
             "model.seq_len=32", "train.log_every=1"]
PEERS = ("hf-gpt2", "hf-llama", "litgpt", "torchtitan")
BATCH, VOCAB = 8, 8192


def matmul_peak(dtype: torch.dtype, seconds: float = 1.0, shapes: tuple = PEAK_SHAPES) -> tuple[float, dict]:
    """The machine's matmul peak in `dtype`: the best of a sweep of shapes (GFLOP/s per shape too)."""
    rates = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(3):
            a @ b
        iters, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            iters += 1
        rates[(m, k, n)] = 2 * m * k * n * iters / (time.perf_counter() - t0)
    return max(rates.values()), rates


def exaflop_tokens_per_s(steps: int, tmp: Path, dtype: str, compile: bool = False, sets: tuple = ()) -> float:
    from exaflop.config import load_config
    from exaflop.engine.telemetry import read_metrics
    from exaflop.engine.trainer import train
    from exaflop.lm.shards import build_text_dataset

    data = tmp / "data"
    if not (data / "manifest.json").exists():
        build_text_dataset("stdlib", data, vocab_size=VOCAB, max_bytes=3_000_000, quiet=True)
    cfg = load_config("lm-small", [f"data.path={data}", f"run.out_dir={tmp}", f"run.name=bench-{compile}",
                                   f"run.compile={str(compile).lower()}", f"run.dtype={dtype}",
                                   f"train.global_batch={BATCH}", f"train.micro_batch={BATCH}",
                                   "train.global_batch_tokens=0", f"train.steps={steps}", "train.log_every=5",
                                   "eval.every=0", "eval.batches=1", "checkpoint.every=0", "run.tensorboard=false",
                                   *sets])
    train(cfg, quiet=True)
    # The first window holds warm-up (and, compiled, the compilation): skip it.
    rates = [r["tokens_per_s"] for r in read_metrics(cfg.run_dir) if r["kind"] == "train"][1:]
    return statistics.median(rates)


# -- peers: each returns (model, loss_fn(model, x) -> loss, optimizer) --------------------------------
def _shape(sets: tuple):
    from exaflop.config import load_config

    return load_config("lm-small", [f"model.vocab_size={VOCAB}", *sets]).model


def hf_gpt2(m):
    """nanoGPT's architecture (GPT-2: learned positions, LayerNorm, 4x GeLU MLP, tied head) in nanoGPT's
    loop: AdamW over decay / no-decay groups, betas (0.9, 0.95), fused only on CUDA."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=m.seq_len, n_embd=m.d_model, n_layer=m.n_layer,
                     n_head=m.n_head, n_inner=4 * m.d_model, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     attn_implementation="sdpa")
    model = GPT2LMHeadModel(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=False)
    return model, lambda mod, x: mod(input_ids=x, labels=x).loss, opt


def hf_llama(m):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=m.d_model, intermediate_size=m.d_ff,
                      num_hidden_layers=m.n_layer, num_attention_heads=m.n_head, num_key_value_heads=m.n_kv_head,
                      max_position_embeddings=m.seq_len, tie_word_embeddings=True, rms_norm_eps=m.norm_eps,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    return model, lambda mod, x: mod(input_ids=x, labels=x).loss, torch.optim.AdamW(model.parameters(), fused=True)


def litgpt_llama(m):
    from litgpt.config import Config
    from litgpt.model import GPT

    cfg = Config(name="bench", block_size=m.seq_len, vocab_size=VOCAB, padded_vocab_size=VOCAB, n_layer=m.n_layer,
                 n_head=m.n_head, n_embd=m.d_model, n_query_groups=m.n_kv_head, rotary_percentage=1.0,
                 parallel_residual=False, bias=False, norm_class_name="RMSNorm", norm_eps=m.norm_eps,
                 mlp_class_name="LLaMAMLP", intermediate_size=m.d_ff)
    model = GPT(cfg)

    def loss(mod, x):
        logits = mod(x)
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), x[:, 1:].reshape(-1))
    return model, loss, torch.optim.AdamW(model.parameters(), fused=True)


def torchtitan_llama(m):
    from torchtitan.models import llama3 as tt
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm

    dim = m.d_model
    norm = {"weight": torch.nn.init.ones_}
    cfg = tt.Llama3Model.Config(
        dim=dim, vocab_size=VOCAB,
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=dim, param_init=tt._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=norm),
        lm_head=Linear.Config(in_features=dim, out_features=VOCAB, param_init=tt._output_linear_init(dim)),
        layers=tt._build_llama3_layers(
            fuse_qkv=True, n_layers=m.n_layer, dim=dim, n_heads=m.n_head, n_kv_heads=m.n_kv_head, hidden_dim=m.d_ff,
            rope=ComplexRoPE.Config(dim=dim // m.n_head, max_seq_len=m.seq_len, theta=m.rope_theta),
            attn_backend="flex"))  # its language models take flex or varlen attention, not SDPA
    model = cfg.build()
    if hasattr(model, "init_weights"):
        model.init_weights()
    # One causal document per row; the block mask is built once here (torchtitan builds it per batch).
    positions = torch.arange(m.seq_len).repeat(BATCH, 1)
    masks = model.get_attention_masks(positions)

    def loss(mod, x):
        logits = mod(x, positions, masks)
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), x[:, 1:].reshape(-1))
    return model, loss, torch.optim.AdamW(model.parameters(), fused=True)


BUILDERS: dict[str, tuple[Callable, str]] = {
    "hf-gpt2": (hf_gpt2, "pip install transformers"), "hf-llama": (hf_llama, "pip install transformers"),
    "litgpt": (litgpt_llama, "pip install litgpt"), "torchtitan": (torchtitan_llama, "pip install torchtitan")}


def peer_tokens_per_s(name: str, m, steps: int, dtype: torch.dtype, compile: bool) -> float:
    """Median step rate of a plain training loop over the peer's model (after warm-up steps)."""
    torch.manual_seed(0)
    model, loss_fn, opt = BUILDERS[name][0](m)
    model.train()
    step_model = torch.compile(model) if compile else model
    x = torch.randint(0, VOCAB, (BATCH, m.seq_len))
    warm = 5 if compile else 3
    times = []
    for i in range(steps + warm):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = loss_fn(step_model, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warm:
            times.append(time.perf_counter() - t0)
    return BATCH * m.seq_len / statistics.median(times)


def measure_in_child(name: str, compiled: bool, args: argparse.Namespace, dtype: str) -> dict:
    """One measurement in a fresh Python process (this script with --one): {"tps": tokens/s},
    or {"missing": why} for a peer that is not installed (whole=True) or cannot run."""
    cmd = [sys.executable, __file__, "--one", f"{name}:{int(compiled)}", "--steps", str(args.steps),
           "--dtype", dtype, "--threads", str(args.threads)]
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--same-malloc"] if args.same_malloc else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"missing": f"failed (exit {proc.returncode}): {last[:160]}"}
    return json.loads(lines[-1])


def measure_one(job: str, args: argparse.Namespace) -> dict:
    """The child's side of measure_in_child."""
    name, compiled = job.split(":")[0], job.split(":")[1] == "1"
    sets = tuple(TINY_SETS) if args.tiny else ()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    try:
        if name == "exaflop":
            with tempfile.TemporaryDirectory() as tmp:
                return {"tps": exaflop_tokens_per_s(args.steps, Path(tmp), args.dtype, compiled, sets)}
        if args.same_malloc:
            keep_freed_memory()
        return {"tps": peer_tokens_per_s(name, _shape(sets), args.steps, dtype, compiled)}
    except ImportError as e:
        return {"missing": f"not installed ({e.name}): {BUILDERS[name][1]}", "whole": True}
    except Exception as e:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
        return {"missing": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                    help="compute dtype for every model (auto: what exaflop picks on this CPU)")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, from {', '.join(PEERS)}")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="skip the torch.compile runs (each costs ~30 s of compilation)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run everyone this many times, alternating the order (medians, paired ratios)")
    ap.add_argument("--same-malloc", action="store_true",
                    help="give the peers exaflop's allocator setting too (freed host buffers kept)")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long rehearsal (smoke test); numbers mean nothing")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: NAME:COMPILED, one measurement, JSON out
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure_one(args.one, args)))
        return
    sets = tuple(TINY_SETS) if args.tiny else ()
    if args.tiny:
        args.steps, args.compile, args.peers = 5, False, "hf-gpt2"
    from exaflop.engine.precision import resolve
    from exaflop.lm.model import flops_per_token

    precision = resolve(args.dtype, "cpu", flag="--dtype")
    dtype = torch.bfloat16 if precision.name == "bf16" else torch.float32
    m = _shape(sets)
    fpt = flops_per_token(m)
    peers = [p for p in args.peers.split(",") if p]
    for name in peers:
        if name not in BUILDERS:
            raise SystemExit(f"--peers: unknown peer {name!r}; choose from {', '.join(PEERS)}")
    modes = (False, True) if args.compile else (False,)
    runs: dict[str, list[float]] = {}  # label -> tokens/s of each repetition
    peaks: list[float] = []
    missing: dict[str, str] = {}
    # The peak probe's outputs are fresh buffers too: measured with freed memory kept, as the
    # trainer runs, so the peak (the MFU denominator) is not understated by page faults.
    keep_freed_memory()
    for rep in range(args.repeat):
        # This VM's speed drifts over minutes: each repetition measures the peak again and runs
        # everyone, exaflop first in even repetitions and last in odd ones.
        peak, rates = matmul_peak(dtype, 0.01, ((128, 128, 128),)) if args.tiny else matmul_peak(dtype)
        peaks.append(peak)
        jobs = [("exaflop", c) for c in modes] + [(name, c) for name in peers for c in modes]
        for name, compiled in (jobs if rep % 2 == 0 else jobs[::-1]):
            label = f"{name} {'compiled' if compiled else 'eager'}"
            if name in missing or label in missing:
                continue
            out = measure_in_child(name, compiled, args, precision.name)
            if "missing" in out:
                missing[name if out.get("whole") else label] = out["missing"]
                continue
            tps = out["tps"]
            runs.setdefault(label, []).append(tps)
            if args.repeat > 1:
                print(f"  rep {rep + 1} {label:<22} {tps:9.0f} tokens/s", flush=True)
    peak = statistics.median(peaks)
    print(f"CPU: {cpu_capability()}; threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"dtype {precision.name} ({precision.requested}), {fpt / 1e6:.1f} MFLOP/token, batch {BATCH} x {m.seq_len}")
    print(f"{precision.name} matmul GFLOP/s by shape (M,K,N), last repetition: "
          + ", ".join(f"{s}: {r / 1e9:.0f}" for s, r in rates.items()))
    print(f"{precision.name} matmul peak (best shape): {peak / 1e9:.1f} GFLOP/s"
          + (f" (median of {len(peaks)}: {', '.join(f'{x / 1e9:.0f}' for x in peaks)})" if len(peaks) > 1 else ""))
    for label, tps in runs.items():
        # MFU of each repetition against that repetition's own peak, then the median.
        mfu = statistics.median(100 * t * fpt / pk for t, pk in zip(tps, peaks, strict=False))
        print(f"{label:<24} {statistics.median(tps):9.0f} tokens/s   MFU {mfu:5.1f}%")
    for label, why in missing.items():
        print(f"{label:<24} {why}")
    for mode in ("eager", "compiled"):
        ours = runs.get(f"exaflop {mode}")
        if not ours:
            continue
        # Paired: each repetition's own ratio (the two ran minutes apart, not hours), then the median.
        ratios = [f"{name} {statistics.median(a / b for a, b in zip(ours, runs[f'{name} {mode}'], strict=False)):.2f}x"
                  for name in PEERS if f"{name} {mode}" in runs]
        print(f"ratio exaflop {mode} / peer {mode}: {', '.join(ratios) or 'no peer ran'}"
              + (f" (median of {args.repeat} repetitions' own ratios)" if args.repeat > 1 else ""))


if __name__ == "__main__":
    main()
