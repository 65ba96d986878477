"""An operator's check before exposing `exaflop serve`: bursts of concurrent streams, then
abuse (an 8 MiB prompt, a 64 MiB header, wrong keys), against the same server idle.

    python bench/serve_abuse.py --run runs/lm-tiny                 # 4 bursts of 200 streams
    python bench/serve_abuse.py --run runs/lm-tiny --bursts 2 --streams 100

The baseline is the server itself: /health latency idle vs during each abuse, and RSS
after each burst vs after the first (memory must stay flat). Prints one table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from exaflop.engine.precision import cpu_capability

KEY = "bench-abuse-key-0123456789abcdef"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def burst(url: str, model: str, streams: int, max_tokens: int) -> tuple[int, int, float]:
    """`streams` concurrent streamed completions; (tokens, errors, seconds)."""
    limits = httpx.Limits(max_connections=streams + 8)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits,
                                 headers={"Authorization": f"Bearer {KEY}"}) as client:
        async def one(i: int) -> tuple[int, bool]:
            body = {"model": model, "prompt": f"def f{i}(", "max_tokens": max_tokens, "temperature": 0,
                    "stream": True, "logit_bias": {str(t): -100 for t in range(6)}}
            n = 0
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return 0, True
                async for line in r.aiter_lines():
                    n += line.startswith("data: {")
            return n, False

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(streams)))
        return sum(n for n, _ in results), sum(e for _, e in results), time.perf_counter() - t0


def health_during(url: str, action, seconds: float = 1.0) -> tuple[float, str]:
    """Max /health latency (ms) while `action()` runs in a thread; plus its outcome."""
    outcome: list[str] = []
    t = threading.Thread(target=lambda: outcome.append(action()))
    lat = []
    with httpx.Client(timeout=30) as http:
        t.start()
        t0 = time.monotonic()
        while t.is_alive() or time.monotonic() - t0 < seconds:
            s = time.perf_counter()
            http.get(url + "/health")
            lat.append((time.perf_counter() - s) * 1000)
            if time.monotonic() - t0 > 60:
                break
    t.join(60)
    return max(lat), outcome[0] if outcome else "no answer"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", help="a trained LM run directory (default with --tiny: a 1-step lm-tiny run)")
    p.add_argument("--bursts", type=int, default=4)
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="a seconds-long rehearsal (smoke test); numbers mean nothing")
    args = p.parse_args()
    wrong_keys = 1000
    if args.tiny:
        args.bursts, args.streams, args.max_tokens, wrong_keys = 1, 8, 4, 50
    if not args.run and not args.tiny:
        p.error("--run is required (a trained LM run directory, e.g. runs/lm-tiny)")
    if args.run:
        run = Path(args.run)
    else:
        from serve_load import make_run  # bench/ is on sys.path when run as a script

        run = make_run(Path(tempfile.mkdtemp(prefix="serve-abuse-")), "lm-tiny", args.threads)
    model = run.name
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
    env = {**os.environ, "EXAFLOP_API_KEYS": KEY, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "exaflop", "serve", str(run), "--port", str(port),
                             "--threads", str(args.threads), "--max-running", "32", "--max-queue", "512"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        print(f"CPU: {cpu_capability()}; server log {log.name}")
        rows = []
        first_rss = None
        for b in range(args.bursts):
            tokens, errors, secs = asyncio.run(burst(url, model, args.streams, args.max_tokens))
            rss = rss_mib(proc.pid)
            first_rss = first_rss or rss
            rows.append((f"burst {b + 1}: {args.streams} streams", f"{tokens / secs:,.0f} tok/s, {errors} errors",
                         f"RSS {rss:.0f} MiB ({rss / first_rss:.2f}x burst 1)"))
        idle = statistics.median(health_during(url, lambda: "idle", 0.5)[0] for _ in range(3))
        rows.append(("/health idle", f"max {idle:.1f} ms", ""))
        auth = {"Authorization": f"Bearer {KEY}"}
        big = {"model": model, "messages": [{"role": "user", "content": "hello world " * 699_000}], "max_tokens": 1}
        before = rss_mib(proc.pid)

        def big_prompt() -> str:
            r = httpx.post(url + "/v1/chat/completions", json=big, headers=auth, timeout=60)
            return f"{r.status_code} {r.json()['error']['code']}"

        worst, outcome = health_during(url, big_prompt)
        time.sleep(1)
        rows.append(("8 MiB chat prompt", outcome, f"/health max {worst:.1f} ms ({worst / idle:.1f}x idle); "
                     f"RSS {before:.0f} -> {rss_mib(proc.pid):.0f} MiB"))

        def big_header() -> str:
            with socket.create_connection(("127.0.0.1", port)) as s:
                t0 = time.perf_counter()
                try:
                    s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\nX-A: "
                              + b"a" * (64 << 20) + b"\r\n\r\n")
                except OSError:
                    pass
                s.settimeout(30)
                try:
                    reply = s.recv(64)
                except OSError:
                    reply = b"(reset)"
                return f"{reply[:12].decode(errors='replace')} in {(time.perf_counter() - t0) * 1000:.0f} ms"

        worst, outcome = health_during(url, big_header)
        rows.append(("64 MiB header, wrong key", outcome, f"/health max {worst:.1f} ms ({worst / idle:.1f}x idle)"))
        with httpx.Client(base_url=url, timeout=10) as http:
            t0 = time.perf_counter()
            codes = [http.get("/v1/models", headers={"Authorization": f"Bearer guess{i}"}).status_code
                     for i in range(wrong_keys)]
            secs = time.perf_counter() - t0
            ok = http.get("/v1/models", headers=auth).status_code
        rows.append((f"{wrong_keys} wrong keys", f"{codes.count(401)} x 401, {codes.count(429)} x 429 in {secs:.1f} s",
                     f"valid key meanwhile: {ok}"))
        m = httpx.get(url + "/metrics", headers=auth).text
        five = sum(float(line.rsplit(" ", 1)[1]) for line in m.splitlines()
                   if line.startswith("exaflop_requests_total") and 'status="5' in line)
        which = [line for line in m.splitlines() if line.startswith("exaflop_requests_total") and 'status="5' in line]
        rows.append(("5xx in /metrics", f"{five:.0f}", "; ".join(which)))
        width = max(len(r[0]) for r in rows)
        for r in rows:
            print(f"{r[0]:<{width}}  {r[1]:<40}  {r[2]}")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
