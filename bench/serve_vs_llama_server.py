"""Serving: `exaflop serve` vs llama.cpp's own `llama-server`, same weights, 1 / 8 / 32 streams.

One run, on this machine: an exaflop run (given, or a random model of a preset's shape) is
exported to GGUF in the precision exaflop serves in; then, for each stream count N, each
server is started alone on the CPU with N slots (`llama-server -np N -cb`, `exaflop serve
--max-running N`) and answers N concurrent streamed `/v1/completions` requests (same
prompt, greedy, exactly --max-tokens tokens each). Repeated --repeat times, alternating
which server goes first; prints the median output tokens/s (all tokens / wall time), the
median time to first token, and the ratios exaflop / llama-server, with the CPU named.

llama-server is found with --llama-server PATH, $LLAMA_SERVER or on PATH, or built from the
llama.cpp sources vendored in the llama-cpp-python sdist (nothing is downloaded here):
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/llama
    python bench/serve_vs_llama_server.py --build /tmp/llama/llama_cpp_python-0.3.36.tar.gz
(cmake + a C++ compiler; ~5-10 minutes on 2 cores; the binary is kept next to the sources).
To compare the AVX2-only path fairly on a newer CPU, hold both sides to AVX2: `--build-isa avx2`
builds llama-server without AVX-512 / AMX (in build-avx2/), and the caps go on exaflop's side:
    MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 \
        python bench/serve_vs_llama_server.py --build SDIST --build-isa avx2
Usage:
    python bench/serve_vs_llama_server.py [--run RUN | --preset lm-124m] [--dtype auto] [--kv-dtype auto]
                                          [--peer-kv f16] [--streams 1,8,32] [--repeat 3]
llama-server keeps its KV cache in f16 by default whatever the weights; exaflop keeps it in the
weights' dtype (fp32 where `auto` serves fp32). `--peer-kv f32` gives llama-server an fp32 cache
too (like for like); `--kv-dtype bf16` gives exaflop a 16-bit one.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

warnings.filterwarnings("ignore")

PROMPT = "def parse_config(path):\n    \"\"\"Read the settings file at"


def find_llama_server(args) -> Path | None:
    if args.build:
        return build_llama_server(Path(args.build), args.build_isa)
    for cand in (args.llama_server, os.environ.get("LLAMA_SERVER"), shutil.which("llama-server")):
        if cand and Path(cand).is_file():
            return Path(cand)
    return None


# llama.cpp's CPU options for an AVX2-only build (cmake prints the variant: -mavx2 -mfma -mf16c).
AVX2_FLAGS = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
              *(f"-DGGML_{x}=OFF" for x in ("AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_TILE",
                                            "AMX_INT8", "AMX_BF16", "AVX_VNNI"))]


def build_llama_server(src: Path, isa: str = "native") -> Path:
    """Build llama-server from the llama.cpp vendored in a llama-cpp-python sdist (.tar.gz or
    unpacked), for this CPU (`native`) or for AVX2 only, no network; reuse an earlier build."""
    if src.is_file():
        dest = src.parent
        with tarfile.open(src) as tf:
            top = tf.getnames()[0].split("/")[0]
            if not (dest / top).exists():
                tf.extractall(dest, filter="data")
        src = dest / top
    root = src / "vendor" / "llama.cpp" if (src / "vendor" / "llama.cpp").is_dir() else src
    build = "build" if isa == "native" else f"build-{isa}"
    binary = root / build / "bin" / "llama-server"
    if binary.is_file():
        return binary
    if not (root / "CMakeLists.txt").is_file():
        raise SystemExit(f"--build {src}: no llama.cpp sources there (expected vendor/llama.cpp/CMakeLists.txt)")
    print(f"building llama-server ({isa}) in {root}/{build} (minutes) ...", flush=True)
    flags = [*(["-DGGML_NATIVE=ON"] if isa == "native" else AVX2_FLAGS), "-DLLAMA_CURL=OFF",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
             "-DCMAKE_BUILD_TYPE=Release"]
    subprocess.run(["cmake", "-B", build, *flags], cwd=root, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", build, "--target", "llama-server", "-j", str(os.cpu_count() or 1)],
                   cwd=root, check=True, stdout=subprocess.DEVNULL)
    return binary


def bench_run(preset: str, vocab: int, tmp: Path) -> Path:
    """A random model of the preset's shape whose special tokens never win greedy decoding, so every
    request generates exactly max_tokens on both servers."""
    import torch

    from exaflop.config import load_config
    from exaflop.lm.hf_import import write_run
    from exaflop.lm.model import LM
    from exaflop.lm.shards import build_text_dataset
    from exaflop.lm.tokenizer import SPECIAL_TOKENS, load_tokenizer

    data = tmp / "data"
    build_text_dataset("stdlib", data, vocab_size=vocab, max_bytes=2_000_000, quiet=True)
    cfg = load_config(preset, [f"data.path={data}", f"run.out_dir={tmp}", "run.name=bench",
                               f"model.vocab_size={vocab}", "model.tie_embeddings=false", "model.init_std=0.1"])
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


def wait_ready(port: int, proc: subprocess.Popen, path: str, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            err = proc.stderr.read()[-2000:] if proc.stderr else ""
            raise SystemExit(f"server exited with {proc.returncode} before it was ready:\n{err}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"server on port {port} not ready after {timeout}s")


def stream_one(port: int, model: str, max_tokens: int, extra: dict) -> tuple[float, int]:
    """(TTFT s, completion tokens from the server's usage) of one streamed greedy completion."""
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}, **extra})
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise SystemExit(f"port {port}: HTTP {r.status}: {r.read()[:300]!r}")
    ttft, usage = None, None
    while line := r.readline():
        line = line.strip()
        if not line.startswith(b"data:") or line == b"data: [DONE]":
            continue
        msg = json.loads(line[5:])
        if msg.get("usage"):
            usage = msg["usage"].get("completion_tokens")
        if ttft is None and any(ch.get("text") for ch in msg.get("choices", [])):
            ttft = time.perf_counter() - t0
    c.close()
    if usage is None:
        raise SystemExit(f"port {port}: the stream carried no usage (completion_tokens)")
    return ttft or time.perf_counter() - t0, usage


def measure(port: int, model: str, streams: int, max_tokens: int, extra: dict) -> dict[str, float]:
    stream_one(port, model, 4, extra)  # warm-up: first-request costs are not serving speed
    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda _: stream_one(port, model, max_tokens, extra), range(streams)))
    wall = time.perf_counter() - t0
    tokens = sum(r[1] for r in results)
    if tokens != streams * max_tokens:  # a server that stops early would look faster than it is
        raise SystemExit(f"{model} on port {port}: {tokens} tokens generated, expected {streams} x {max_tokens}")
    return {"tokens_per_s": tokens / wall, "ttft_ms": 1000 * statistics.median(r[0] for r in results)}


def wait_compiled(port: int, model: str, proc: subprocess.Popen, timeout: float = 900) -> str:
    """exaflop's model card until its decode step is no longer "compiling" (`--compile auto`
    compiles beside serving): serving speed is measured at the steady state. Returns the mode."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"exaflop serve exited with {proc.returncode} while compiling")
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", f"/v1/models/{model}")
        mode = json.loads(c.getresponse().read()).get("decode", "eager")
        if mode != "compiling":
            return mode
        time.sleep(0.5)
    raise SystemExit(f"exaflop serve on port {port}: still compiling after {timeout}s")


def serve_and_measure(cmd: list[str], port: int, model: str, streams: int, max_tokens: int,
                      extra: dict, env: dict, exaflop: bool) -> dict[str, float]:
    """Start a server, measure it, stop it. Also returns its start-up: `ready_s` until /health
    answers 200, `steady_s` until it serves at full speed (exaflop: its decode step compiled)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_ready(port, proc, "/health")
        ready = time.perf_counter() - t0
        if exaflop:
            wait_compiled(port, model, proc)
        steady = time.perf_counter() - t0
        return {**measure(port, model, streams, max_tokens, extra), "ready_s": ready, "steady_s": steady}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="an exaflop LM run to serve (default: a random model of --preset)")
    ap.add_argument("--preset", default="lm-124m", help="shape of the random model")
    ap.add_argument("--vocab", type=int, default=4096, help="vocabulary of the random model")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                    help="exaflop's serving precision (auto: what `serve` picks on this CPU); the GGUF matches it")
    ap.add_argument("--streams", default="1,8,32", help="comma-separated concurrent stream counts")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3, help="runs per server and stream count (median reported)")
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                    help="exaflop serve --compile (auto, its default: compiled beside serving; measured once compiled)")
    ap.add_argument("--quantize", default="none", choices=["none", "int8"],
                    help="int8: exaflop serve --quantize int8 against llama-server on a Q8_0 export "
                         "(run with --no-repack: its repacked Q8_0 path dies with SIGILL on this VM's CPU)")
    ap.add_argument("--kv-dtype", default="auto", choices=["auto", "fp32", "bf16"],
                    help="exaflop serve --kv-dtype (auto: the weights' dtype; llama-server's is --peer-kv)")
    ap.add_argument("--peer-kv", default="f16", choices=["f16", "f32", "bf16"],
                    help="llama-server's KV cache type (-ctk/-ctv; f16 is its default): f32 matches exaflop's "
                         "fp32 cache, for a like-for-like row beside the default one")
    ap.add_argument("--llama-server", help="path of a llama-server binary (also $LLAMA_SERVER, PATH)")
    ap.add_argument("--build", help="build llama-server from a llama-cpp-python sdist (.tar.gz or unpacked dir)")
    ap.add_argument("--build-isa", default="native", choices=["native", "avx2"],
                    help="with --build: for this CPU, or AVX2 only (to compare the AVX2 path on a newer CPU)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long rehearsal (smoke test); numbers mean nothing")
    args = ap.parse_args()
    if args.tiny:
        args.preset, args.vocab, args.max_tokens, args.repeat, args.streams = "lm-tiny", 512, 4, 1, "1,2"
        args.compile = "off"  # a compile per server start is not a rehearsal's business
    llama = find_llama_server(args)
    if llama is None:
        sys.exit("serve_vs_llama_server: no llama-server found: pass --llama-server PATH, set $LLAMA_SERVER, or "
                 "--build the llama-cpp-python sdist (see this script's docstring)")
    streams = [int(s) for s in args.streams.split(",")]

    from exaflop.engine.precision import cpu_capability, resolve
    from exaflop.lm.gguf_export import export

    precision = resolve(args.dtype, "cpu", flag="--dtype").name
    gguf_type = "q8_0" if args.quantize == "int8" else {"fp32": "f32", "bf16": "bf16"}[precision]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results: dict[str, dict[int, list[dict]]] = {"exaflop": {n: [] for n in streams},
                                                 "llama-server": {n: [] for n in streams}}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        run = Path(args.run) if args.run else bench_run(args.preset, args.vocab, tmp)
        gguf = export(run, tmp / "model.gguf", dtype=gguf_type)
        name = run.name
        ctx = 512  # per slot: prompt + max_tokens fit with room
        for rep in range(args.repeat):
            for n in streams:
                port = free_port()
                ours = [sys.executable, "-m", "exaflop", "serve", str(run), "--port", str(port),
                        "--threads", str(args.threads), "--reload-interval", "0", "--log-level", "warning",
                        "--max-running", str(n), "--dtype", precision, "--quantize", args.quantize,
                        "--kv-dtype", args.kv_dtype]
                ours += ["--compile", args.compile]
                theirs = [str(llama), "-m", str(gguf), "--alias", name, "--port", str(port), "--host", "127.0.0.1",
                          "-t", str(args.threads), "-tb", str(args.threads), "-np", str(n), "-cb",
                          "-c", str(ctx * n), "--no-webui", "--log-disable", "-ctk", args.peer_kv, "-ctv", args.peer_kv]
                theirs += ["--no-repack"] if gguf_type == "q8_0" else []
                order = [("exaflop", ours, {}), ("llama-server", theirs, {"ignore_eos": True})]
                for who, cmd, extra in (order if rep % 2 == 0 else order[::-1]):  # alternate who goes first
                    r = serve_and_measure(cmd, port, name, n, args.max_tokens, extra, env, who == "exaflop")
                    results[who][n].append(r)
                    print(f"  rep {rep + 1} {who:<13} {n:>3} streams: {r['tokens_per_s']:8.1f} tok/s, "
                          f"TTFT {r['ttft_ms']:7.1f} ms; answering {r['ready_s']:5.1f} s, full speed "
                          f"{r['steady_s']:5.1f} s after launch", flush=True)
    med = {who: {n: {k: statistics.median(r[k] for r in runs)
                     for k in ("tokens_per_s", "ttft_ms", "ready_s", "steady_s")}
                 for n, runs in per.items()} for who, per in results.items()}
    print(f"CPU: {cpu_capability()}, {args.threads} threads per server; model {run.name} "
          f"({args.preset if not args.run else 'given run'}), weights {precision} (GGUF {gguf_type}), "
          f"{args.max_tokens} greedy tokens per stream, median of {args.repeat}"
          f", exaflop --compile {args.compile} --kv-dtype {args.kv_dtype} (llama-server's KV cache: {args.peer_kv})"
          f"{', exaflop --quantize int8 vs Q8_0 (llama-server --no-repack)' if args.quantize == 'int8' else ''}")
    # The two servers of one repetition run back to back, so their ratio shares the machine's
    # state of that minute (this VM's speed drifts by 2x over minutes): the median of those
    # paired ratios is the steadier figure; the ratio of medians is printed next to it.
    paired = {n: statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in
                                   zip(results["exaflop"][n], results["llama-server"][n], strict=True))
              for n in streams}
    print(f"{'streams':>7} {'exaflop tok/s':>14} {'llama-server':>13} {'ratio':>7} {'paired':>7} "
          f"{'TTFT exaflop ms':>16} {'llama-server':>13} {'ratio':>7}")
    for n in streams:
        a, b = med["exaflop"][n], med["llama-server"][n]
        print(f"{n:>7} {a['tokens_per_s']:>14.1f} {b['tokens_per_s']:>13.1f} "
              f"{a['tokens_per_s'] / b['tokens_per_s']:>6.2f}x {paired[n]:>6.2f}x {a['ttft_ms']:>16.1f} "
              f"{b['ttft_ms']:>13.1f} {a['ttft_ms'] / b['ttft_ms']:>6.2f}x")
    starts = {who: (statistics.median(r["ready_s"] for per in results[who].values() for r in per),
                    statistics.median(r["steady_s"] for per in results[who].values() for r in per)) for who in results}
    print("start-up (median over every start): " + "; ".join(
        f"{who} answering after {a:.1f} s, at full speed after {b:.1f} s" for who, (a, b) in starts.items()))
    print(f"(tok/s ratio: of the medians, and the median of each repetition's own ratio (paired); higher is "
          f"better; TTFT ratio: lower is better; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    if args.json:
        Path(args.json).write_text(json.dumps({"median": med, "paired": paired, "runs": results, "cpu": cpu_capability(),
                                               "precision": precision, "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
