"""Serving: `exaflop serve` vs llama.cpp (llama-cpp-python's server) on the same weights.

One run, on this machine: an exaflop run (given, or a random model of a preset's shape)
is exported to GGUF; each server is started in turn, alone on the CPU, and answers the
same streamed /v1/completions requests (greedy, fixed length):
  * single stream: requests one after another;
  * 8 concurrent: 8 clients at once.
Prints output tokens/s (all tokens / wall time) and time to first token (TTFT), side by
side, and the ratios exaflop / llama.cpp. Needs `pip install 'llama-cpp-python[server]'`.
Usage:
    python bench/serve_vs_llamacpp.py [--run RUN | --preset lm-small] [--dtype f32] [--threads 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

warnings.filterwarnings("ignore")

PROMPTS = ["def parse(", "import os\n", "class Config:", "The standard library", "for i in range(",
           "return self.", "# Helper to", "if __name__"]


def need_llama_cpp() -> None:
    try:
        import llama_cpp  # noqa: F401
        import llama_cpp.server.app  # noqa: F401
    except ImportError as e:
        sys.exit(f"serve_vs_llamacpp: llama-cpp-python with its server is not installed ({e}); "
                 "install it with: pip install 'llama-cpp-python[server]' (compiles llama.cpp, minutes)")


def bench_run(preset: str, tmp: Path) -> Path:
    """A random model of the preset's shape whose special tokens never win greedy decoding, so every
    request generates exactly max_tokens on both servers (no logit_bias needed)."""
    import torch

    from exaflop.config import load_config
    from exaflop.lm.hf_import import write_run
    from exaflop.lm.model import LM
    from exaflop.lm.shards import build_text_dataset
    from exaflop.lm.tokenizer import SPECIAL_TOKENS, load_tokenizer

    base = load_config(preset)
    data = tmp / "data"
    build_text_dataset("stdlib", data, vocab_size=base.model.vocab_size, max_bytes=2_000_000, quiet=True)
    cfg = load_config(preset, [f"data.path={data}", f"run.out_dir={tmp}", "run.name=bench",
                               "model.tie_embeddings=false", "model.init_std=0.1"])
    torch.manual_seed(0)
    model = LM(cfg.model)
    tok = load_tokenizer(data / "tokenizer.json")
    with torch.no_grad():  # logit exactly 0 for special tokens: below the max of thousands of random logits
        for t in SPECIAL_TOKENS:
            model.lm_head.weight[tok.token_to_id(t)] = 0
    return write_run(cfg, model, "bench", force=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, path: str, timeout: float = 180) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before it was ready")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status < 500:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server on port {port} not ready after {timeout}s")


def stream_one(port: int, model: str, prompt: str, max_tokens: int) -> tuple[float, int, float]:
    """(TTFT s, output tokens, total s) of one streamed greedy completion."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json",
                                                 "Authorization": "Bearer bench"})
    r = c.getresponse()
    if r.status != 200:
        raise SystemExit(f"port {port}: HTTP {r.status}: {r.read()[:300]!r}")
    ttft, chunks, usage, finish = None, 0, None, None
    while line := r.readline():
        line = line.strip()
        if not line.startswith(b"data:") or line == b"data: [DONE]":
            continue
        msg = json.loads(line[5:])
        if msg.get("usage"):
            usage = msg["usage"].get("completion_tokens")
        for ch in msg.get("choices", []):
            finish = ch.get("finish_reason") or finish
            if ch.get("text"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    total = time.perf_counter() - t0
    # Without usage in the stream, "length" means exactly max_tokens (a chunk can hold
    # zero or several tokens while a multi-byte character is incomplete).
    tokens = usage or (max_tokens if finish == "length" else chunks)
    return ttft or total, tokens, total


def measure(port: int, model: str, max_tokens: int, requests: int, concurrency: int) -> dict[str, float]:
    stream_one(port, model, "warm up", 8)
    jobs = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: stream_one(port, model, p, max_tokens), jobs))
    wall = time.perf_counter() - t0
    tokens = sum(r[1] for r in results)
    if tokens != requests * max_tokens:  # a server that stops early would look faster than it is
        raise SystemExit(f"{model} on port {port}: {tokens} tokens generated, expected {requests} x {max_tokens}")
    return {"tokens_per_s": tokens / wall, "ttft_ms_p50": 1000 * statistics.median(r[0] for r in results),
            "tokens": tokens, "wall_s": wall}


def serve_and_measure(cmd: list[str], port: int, ready_path: str, model: str, args) -> dict[str, dict]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(port, proc, ready_path)
        return {"single": measure(port, model, args.max_tokens, args.requests, 1),
                "concurrent8": measure(port, model, args.max_tokens, 8 * args.requests // 2, 8)}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def best(runs: list[dict[str, dict]]) -> dict[str, dict]:
    """Best of the repeats per workload: highest tokens/s, lowest TTFT (noise only ever slows)."""
    return {load: {"tokens_per_s": max(r[load]["tokens_per_s"] for r in runs),
                   "ttft_ms_p50": min(r[load]["ttft_ms_p50"] for r in runs)} for load in runs[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="an exaflop LM run to serve (default: a random model of --preset)")
    ap.add_argument("--preset", default="lm-small", help="shape of the random model")
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16", "q8_0"],
                    help="GGUF weights for llama.cpp (exaflop serves its fp32 checkpoint on CPU)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=4, help="single-stream requests (8-way: 4x as many)")
    ap.add_argument("--repeat", type=int, default=1, help="measure each server this often, keep the best")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long rehearsal (smoke test); numbers mean nothing")
    args = ap.parse_args()
    if args.tiny:
        args.preset, args.max_tokens, args.requests = "lm-tiny", 4, 1
    need_llama_cpp()

    from exaflop.lm.gguf_export import export

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        run = Path(args.run) if args.run else bench_run(args.preset, tmp)
        gguf = export(run, tmp / "model.gguf", dtype=args.dtype)
        name = run.name
        p1, p2 = free_port(), free_port()
        exaflop_cmd = [sys.executable, "-m", "exaflop", "serve", str(run), "--port", str(p1),
                       "--threads", str(args.threads), "--reload-interval", "0", "--log-level", "warning"]
        llama_cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", name,
                     "--port", str(p2), "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                     "--n_ctx", "2048", "--verbose", "false",
                     # its default cancels a running stream when a new request comes
                     "--interrupt_requests", "false"]
        ours_runs, theirs_runs = [], []
        for _ in range(args.repeat):  # alternate, so load from elsewhere hits both alike
            ours_runs.append(serve_and_measure(exaflop_cmd, p1, "/health", name, args))
            theirs_runs.append(serve_and_measure(llama_cmd, p2, "/v1/models", name, args))
        ours, theirs = best(ours_runs), best(theirs_runs)
    print(f"model: {run} (GGUF {args.dtype} for llama.cpp), {args.max_tokens} greedy tokens per request, "
          f"{args.threads} threads, best of {args.repeat}")
    print(f"{'workload':<14}{'metric':<16}{'exaflop':>12}{'llama.cpp':>12}{'exaflop/llama.cpp':>19}")
    for load in ("single", "concurrent8"):
        for key, unit in (("tokens_per_s", "tok/s"), ("ttft_ms_p50", "TTFT p50 ms")):
            a, b = ours[load][key], theirs[load][key]
            print(f"{load:<14}{unit:<16}{a:>12.1f}{b:>12.1f}{a / b:>18.2f}x")
    print("(tok/s: higher is better; TTFT: lower is better; load average now "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: other work skews both sides)")
    if args.json:
        Path(args.json).write_text(json.dumps({"exaflop": ours, "llama.cpp": theirs, "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
