"""Load test: `exaflop serve` vs Hugging Face transformers `generate`, same weights, one run.

    python bench/serve_load.py                       # lm-small-shaped model, concurrency 1, 8, 32
    python bench/serve_load.py --compile --hf-compile   # each system's compiled mode too
    python bench/serve_load.py --run runs/lm-small   # an existing run instead
    python bench/serve_load.py --rate 4 --requests 64   # Poisson arrivals (exaflop only)

Workload: a fixed, seeded list of requests with varied prompt lengths and output
lengths (token-id prompts, greedy, special tokens banned so every request produces
exactly its length). Every system serves the same requests; output tokens/s counts
only the tokens each request asked for.

- exaflop: the real server in a subprocess, streamed over HTTP by an asyncio client
  at fixed concurrency (or Poisson arrivals). TTFT = first streamed token; ITL = gaps
  between streamed chunks; TPOT = (e2e - TTFT) / (tokens - 1).
- transformers, one at a time: `LlamaForCausalLM.generate` per request.
- transformers, batched: the same requests in batches of --hf-batch, left-padded;
  a batch runs until its longest request is done (static batching). With --hf-compile,
  also batched with transformers' static KV cache, which makes `generate` run a
  torch.compile'd forward.
- exaflop with --compile: the server's torch.compile'd decode step (`serve --compile`).

The exaflop checkpoint is mapped into a LlamaForCausalLM (RoPE uses the same
half-split layout, so q/k need no permutation) and logits are checked to agree.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

SPECIALS = 6  # exaflop tokenizers reserve ids 0-5 for special tokens


def make_run(root: Path, preset: str, threads: int) -> Path:
    """A checkpoint of the preset's architecture (one training step on a small corpus)."""
    from exaflop.config import load_config
    from exaflop.engine.trainer import train
    from exaflop.lm.shards import build_text_dataset

    src = root / "corpus"
    src.mkdir(parents=True)
    for i, f in enumerate(sorted(Path(json.__file__).parent.parent.glob("email/*.py"))):
        (src / f"{i}.txt").write_text(f.read_text())
    build_text_dataset(str(src), str(root / "data"), vocab_size=2048, quiet=True)
    from exaflop.lm.tokenizer import load_tokenizer

    # Model vocabulary = tokenizer vocabulary, so every sampled id decodes to text (and a chunk).
    vocab = load_tokenizer(root / "data" / "tokenizer.json").get_vocab_size()
    cfg = load_config(preset, [f"data.path={root / 'data'}", f"model.vocab_size={vocab}", f"run.out_dir={root / 'runs'}", "run.name=bench",
                               "train.steps=1", "train.global_batch=2", "train.global_batch_tokens=0",
                               "train.micro_batch=2", "checkpoint.every=1", "eval.every=1000",
                               "run.tensorboard=false", "run.dtype=fp32", f"run.threads={threads}"])
    train(cfg, quiet=True)
    return root / "runs" / "bench"


def workload(n: int, vocab: int, ctx: int, seed: int, prompt_range: tuple[int, int],
             out_range: tuple[int, int]) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        p = rng.randint(*prompt_range)
        o = min(rng.randint(*out_range), ctx - p)
        reqs.append(([rng.randrange(SPECIALS, vocab) for _ in range(p)], o))
    return reqs


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summarize(name: str, wall: float, records: list[dict], client_cpu: float | None = None) -> dict:
    ttft = [r["ttft"] for r in records]
    itl = [g for r in records for g in r["itl"]]
    tpot = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in records if r["tokens"] > 1]
    tokens = sum(r["tokens"] for r in records)
    return {"system": name, "requests": len(records), "output_tokens": tokens, "wall_s": round(wall, 2),
            "output_tok_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(1000 * pct(ttft, 50), 1), "ttft_p99_ms": round(1000 * pct(ttft, 99), 1),
            "tpot_p50_ms": round(1000 * pct(tpot, 50), 2), "tpot_p99_ms": round(1000 * pct(tpot, 99), 2),
            "itl_p50_ms": round(1000 * pct(itl, 50), 2), "itl_p99_ms": round(1000 * pct(itl, 99), 2),
            # CPU the load generator itself burned, as a share of one core: on a small machine
            # the client competes with the server for the same cores.
            "client_cpu": round(client_cpu / wall, 2) if client_cpu is not None else None}


# -- exaflop over HTTP ---------------------------------------------------------
async def _one(client: httpx.AsyncClient, url: str, prompt: list[int], n_out: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": n_out, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logit_bias": {str(i): -100 for i in range(SPECIALS)}}
    t0 = time.perf_counter()
    times, tokens, buf = [], 0, b""
    # Events are split on the raw bytes and only the usage event is parsed: the client
    # shares the machine with the server, so it should cost as little CPU as possible.
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for data in r.aiter_raw():
            buf += data
            *events, buf = buf.split(b"\n\n")
            now = time.perf_counter()
            for ev in events:
                if ev.startswith(b'data: {"id"') and b'"choices":[]' not in ev:
                    times.append(now)
                elif b'"usage":{' in ev:
                    tokens = json.loads(ev[6:])["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"ttft": times[0] - t0, "e2e": end - t0, "tokens": tokens,
            "itl": [b - a for a, b in zip(times, times[1:], strict=False)]}


async def run_exaflop(url: str, reqs: list, concurrency: int, rate: float) -> tuple[float, list[dict]]:
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        records: list[dict] = []
        t0 = time.perf_counter()
        if rate > 0:  # open loop: Poisson arrivals, no concurrency cap
            rng, tasks = random.Random(1), []
            for prompt, n_out in reqs:
                tasks.append(asyncio.create_task(_one(client, url, prompt, n_out)))
                await asyncio.sleep(rng.expovariate(rate))
            records = list(await asyncio.gather(*tasks))
        else:
            queue = list(reversed(reqs))

            async def worker():
                while queue:
                    prompt, n_out = queue.pop()
                    records.append(await _one(client, url, prompt, n_out))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0, records


def start_server(run: Path, port: int, max_running: int, threads: int, dtype: str,
                 compile: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "exaflop", "serve", str(run), "--port", str(port), "--max-running",
           str(max_running), "--log-level", "warning", "--reload-interval", "0", "--dtype", dtype]
    if compile:
        cmd.append("--compile")
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(1500):  # up to 5 minutes: --compile adds ~30 s of start-up
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("exaflop server did not become healthy")


# -- transformers ----------------------------------------------------------------
def to_llama(model):
    """A LlamaForCausalLM holding the exaflop LM's weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.cfg
    hf = LlamaForCausalLM(LlamaConfig(
        hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, head_dim=c.head_dim,
        vocab_size=c.vocab_size, max_position_embeddings=c.seq_len, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings, attention_bias=False, mlp_bias=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=0))
    names = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    parts = {"attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
             "attn.wo": "self_attn.o_proj", "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj",
             "mlp.w2": "mlp.down_proj", "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    state = {}
    for k, v in model.state_dict().items():
        if k in names:
            state[names[k]] = v
            continue
        _, i, rest = k.split(".", 2)  # blocks.{i}.{part}.weight
        part = rest.rsplit(".", 1)[0]
        state[f"model.layers.{i}.{parts[part]}.weight"] = v
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    if c.tie_embeddings:
        hf.tie_weights()
    return hf.eval()


class _Clock:
    """A generate() streamer that only records when each step's tokens appear."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def run_hf(hf, reqs: list, batch: int, generation_config=None) -> tuple[float, list[dict]]:
    records = []
    t0 = time.perf_counter()
    for start in range(0, len(reqs), batch):
        group = reqs[start:start + batch]
        width = max(len(p) for p, _ in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for r, (p, _) in enumerate(group):  # left padding: every row's last prompt token lines up
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        longest = max(n for _, n in group)
        clock = _Clock()
        b0 = time.perf_counter()
        hf.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                    streamer=clock, pad_token_id=0, suppress_tokens=list(range(1, SPECIALS)),
                    generation_config=generation_config)
        steps = clock.times[1:]  # the first put() is the prompt
        for _, n in group:  # a request is done when its n-th token appears
            mine = steps[:n]
            records.append({"ttft": mine[0] - b0, "e2e": mine[-1] - b0, "tokens": n,
                            "itl": [b - a for a, b in zip(mine, mine[1:], strict=False)]})
    return time.perf_counter() - t0, records


def compiled_static(hf):
    """The same LlamaForCausalLM set up for transformers' own compiled decoding: a static
    KV cache, which makes `generate` torch.compile the forward (on CPU only when asked)."""
    import copy

    from transformers import CompileConfig

    gc = copy.deepcopy(hf.generation_config)
    gc.cache_implementation = "static"
    gc.compile_config = CompileConfig()
    gc.compile_config._compile_all_devices = True  # transformers compiles on GPUs only by default
    return gc


def check_same_weights(model, hf) -> float:
    x = torch.randint(SPECIALS, model.cfg.vocab_size, (2, 17))
    with torch.inference_mode():
        ours, _ = model(x)
        theirs = hf(x).logits
    return float((ours - theirs).abs().max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="serve this run instead of building a fresh lm-small-shaped one")
    ap.add_argument("--preset", default="lm-small", help="architecture when building the run")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests-per-slot", type=int, default=8,
                    help="requests = this x concurrency; enough that the drain at the end (fewer "
                    "than `concurrency` requests left) is a small part of the run")
    ap.add_argument("--hf-requests", type=int, default=16, help="requests for transformers one at a time")
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--rate", type=float, default=0, help="Poisson arrivals per second (exaflop only)")
    ap.add_argument("--requests", type=int, default=64, help="requests in --rate mode")
    ap.add_argument("--prompt-len", default="16,128")
    ap.add_argument("--output-len", default="16,128")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both systems (0: default)")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"],
                    help="weights, activations and KV cache of both systems (bf16: this CPU's fast path)")
    ap.add_argument("--rounds", type=int, default=2, help="alternate the systems this many times; report each's best")
    ap.add_argument("--compile", action="store_true", help="serve with --compile (torch.compile'd decode step)")
    ap.add_argument("--hf-compile", action="store_true",
                    help="also run transformers batched with a static cache and its torch.compile'd forward")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--skip-hf", action="store_true", help="only the exaflop server")
    ap.add_argument("--out", help="also write the results as JSON here")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long rehearsal (smoke test); numbers mean nothing")
    args = ap.parse_args()
    if args.tiny:
        args.preset, args.concurrency, args.requests_per_slot, args.rounds = "lm-tiny", "1,2", 1, 1
        args.hf_requests, args.hf_batch, args.prompt_len, args.output_len, args.dtype = 1, 2, "4,8", "4,8", "fp32"
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from exaflop.engine.checkpoint import load_for_inference

    tmp = tempfile.TemporaryDirectory()
    run = Path(args.run) if args.run else make_run(Path(tmp.name), args.preset, args.threads)
    _, _, model = load_for_inference(run)
    hf = to_llama(model)
    diff = check_same_weights(model, hf)
    assert diff < 1e-3, f"weights do not map: max logit difference {diff}"
    if args.dtype == "bf16":
        hf.to(torch.bfloat16)
    ctx, vocab = model.cfg.seq_len, model.cfg.vocab_size
    pr = tuple(int(x) for x in args.prompt_len.split(","))
    orng = tuple(int(x) for x in args.output_len.split(","))
    levels = [int(c) for c in args.concurrency.split(",")]
    big = max(levels)
    rounds: list[list[dict]] = []
    proc = start_server(run, args.port, max(levels + [args.hf_batch]), args.threads, args.dtype, args.compile)
    url = f"http://127.0.0.1:{args.port}/v1/completions"
    try:
        asyncio.run(run_exaflop(url, workload(4, vocab, ctx, 99, pr, orng), 4, 0))  # warm-up
        if not args.skip_hf:
            run_hf(hf, workload(2, vocab, ctx, 99, pr, orng), 2)  # warm-up
        static = compiled_static(hf) if args.hf_compile else None
        if static is not None:  # compiles here, not in a timed round
            run_hf(hf, workload(2 * args.hf_batch, vocab, ctx, 99, pr, orng), args.hf_batch, static)
        # Rounds alternate the systems, so a slow spell of a shared machine hits both
        # rather than one; each system's best round is reported (as timeit does).
        for _ in range(args.rounds):
            results = []
            if args.rate:
                reqs = workload(args.requests, vocab, ctx, 0, pr, orng)
                wall, recs = asyncio.run(run_exaflop(url, reqs, 0, args.rate))
                results.append(summarize(f"exaflop, Poisson {args.rate}/s", wall, recs))
            for c in levels:
                reqs = workload(args.requests_per_slot * c, vocab, ctx, 0, pr, orng)
                cpu0 = time.process_time()
                wall, recs = asyncio.run(run_exaflop(url, reqs, c, 0))
                results.append(summarize(f"exaflop, concurrency {c}", wall, recs, time.process_time() - cpu0))
            if not args.skip_hf:  # the server idles meanwhile (its engine thread sleeps)
                reqs = workload(args.requests_per_slot * big, vocab, ctx, 0, pr, orng)
                results.append(summarize("transformers, one at a time", *run_hf(hf, reqs[:args.hf_requests], 1)))
                results.append(summarize(f"transformers, batched {args.hf_batch}", *run_hf(hf, reqs, args.hf_batch)))
                if static is not None:
                    results.append(summarize(f"transformers, batched {args.hf_batch}, static cache + compile",
                                             *run_hf(hf, reqs, args.hf_batch, static)))
            rounds.append(results)
    finally:
        proc.terminate()
        proc.wait()
    best: dict[str, dict] = {}
    for r in (r for results in rounds for r in results):
        if r["system"] not in best or r["output_tok_s"] > best[r["system"]]["output_tok_s"]:
            best[r["system"]] = r
    report(list(best.values()), rounds, model, diff, args)
    if args.out:
        Path(args.out).write_text(json.dumps({"best": list(best.values()), "rounds": rounds}, indent=1))
    return 0


def ratios(results: list[dict]) -> str:
    top = max((r for r in results if r["system"].startswith("exaflop, concurrency")),
              key=lambda r: int(r["system"].rsplit(" ", 1)[1]), default=None)
    hf = [r for r in results if r["system"].startswith("transformers")]
    if top is None or not hf:
        return ""
    hf_best = max(r["output_tok_s"] for r in hf)
    hf_one = next((r["output_tok_s"] for r in hf if r["system"] == "transformers, one at a time"), hf_best)
    return (f"{top['system']}: {top['output_tok_s'] / hf_one:.1f}x transformers one at a time, "
            f"{top['output_tok_s'] / hf_best:.1f}x the best transformers mode")


def report(results: list[dict], rounds: list[list[dict]], model, diff: float, args) -> None:
    c = model.cfg
    print(f"model: {c.n_layer} layers, d_model {c.d_model}, {model.num_params(False) / 1e6:.1f}M params, "
          f"context {c.seq_len}; {args.dtype}; torch threads {torch.get_num_threads()}; max |logit diff| vs HF {diff:.1e}")
    print(f"prompts {args.prompt_len} tokens, outputs {args.output_len} tokens (uniform, seeded); "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")
    cols = ["system", "requests", "output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms",
            "itl_p50_ms", "itl_p99_ms", "client_cpu"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r[k]) for k in cols) + " |")
    print(f"\nbest of {len(rounds)} rounds: {ratios(results)}")
    for i, rnd in enumerate(rounds):
        line = ratios(rnd) or ", ".join(f"{r['system']} {r['output_tok_s']}" for r in rnd)
        print(f"round {i + 1}: {line}")


if __name__ == "__main__":
    sys.exit(main())
