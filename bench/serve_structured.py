"""What constrained decoding costs: time per output token with and without an output grammar.

One `exaflop serve` process (an lm-small-shaped model, vocab 8192, random weights: the cost
of masking does not depend on what the model learned), N concurrent streaming chat requests
of `--tokens` output tokens each, at temperature 1, two ways in the same run:
  free        — plain text;
  json_schema — `response_format` with a schema the output never completes before
                `--tokens` (an object holding an unbounded array of integers), so every
                step of every row computes and applies its llguidance mask.
Time per output token (TPOT) of a stream = (last chunk - first chunk) / (chunks - 1); the
median over streams and repetitions is reported, with the ratio.
    python bench/serve_structured.py [--streams 32] [--tokens 64] [--reps 3] [--tiny]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

SCHEMA = {"type": "object", "properties": {"values": {"type": "array", "items": {"type": "integer"}}},
          "required": ["values"], "additionalProperties": False}


def make_run(tmp: Path, tiny: bool, seq_len: int = 512) -> Path:
    """A run holding a random lm-small-shaped model (tiny: a 2-layer one) and its tokenizer."""
    import torch

    from exaflop.config import Config
    from exaflop.lm.hf_import import write_run
    from exaflop.lm.model import LM
    from exaflop.lm.shards import build_text_dataset

    vocab = 512 if tiny else 8192
    build_text_dataset("stdlib", tmp / "data", vocab_size=vocab, max_bytes=300_000 if tiny else 3_000_000, quiet=True)
    model = {"n_layer": 2, "d_model": 64, "n_head": 4, "n_kv_head": 2} if tiny else \
        {"n_layer": 6, "d_model": 384, "n_head": 6, "n_kv_head": 6}
    cfg = Config.model_validate({"task": "lm", "run": {"name": "m", "out_dir": str(tmp / "runs"), "dtype": "fp32"},
                                 "model": {**model, "vocab_size": vocab, "seq_len": seq_len},
                                 "data": {"path": str(tmp / "data")}})
    torch.manual_seed(0)
    return write_run(cfg, LM(cfg.model), "bench", force=False)


def one_round(client, streams: int, tokens: int, constrained: bool) -> list[float]:
    tpots: list[float] = []
    lock = threading.Lock()

    def stream(i: int) -> None:
        kw = {"response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": SCHEMA}}} \
            if constrained else {}
        times = []
        for chunk in client.chat.completions.create(model="m", stream=True, max_tokens=tokens, temperature=1.0,
                                                    seed=i, messages=[{"role": "user", "content": "numbers"}], **kw):
            if chunk.choices and chunk.choices[0].delta.content:
                times.append(time.perf_counter())
        if len(times) > 2:
            with lock:
                tpots.append((times[-1] - times[0]) / (len(times) - 1))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tpots


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="a seconds-long rehearsal (smoke test); numbers mean nothing")
    a = ap.parse_args()
    if a.tiny:
        a.streams, a.tokens, a.reps = 4, 12, 1
    import openai

    from exaflop.engine.precision import cpu_capability
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.serve.conftest import ServerProcess

    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp), a.tiny)
        # The later --threads wins over the test harness's default of 1.
        server = ServerProcess([run], Path(tmp) / "server.log", "--max-running", str(a.streams),
                               "--threads", str(a.threads))
        try:
            server.wait_ready(300)
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=600)
            one_round(client, min(a.streams, 4), 4, True)  # warm-up: both paths, first masks, allocations
            one_round(client, min(a.streams, 4), 4, False)
            free, constrained = [], []
            for _ in range(a.reps):  # interleaved, so drift on a shared machine hits both alike
                free += one_round(client, a.streams, a.tokens, False)
                constrained += one_round(client, a.streams, a.tokens, True)
        finally:
            server.stop()
    f, c = statistics.median(free), statistics.median(constrained)
    shape = "tiny" if a.tiny else "lm-small shape (6 x 384, vocab 8192)"
    print(f"{shape}, fp32, --threads {a.threads}; {a.streams} concurrent streams x {a.tokens} tokens, "
          f"{a.reps} reps; CPU: {cpu_capability()}")
    print(f"  free text   : TPOT median {1000 * f:7.2f} ms ({len(free)} streams)")
    print(f"  json_schema : TPOT median {1000 * c:7.2f} ms ({len(constrained)} streams)")
    print(f"constrained / free: {c / f:.3f}x ({100 * (c / f - 1):+.1f}% time per output token)")


if __name__ == "__main__":
    main()
