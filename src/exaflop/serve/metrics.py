"""Prometheus metrics in the text exposition format (version 0.0.4), no client library.

The engine threads and the HTTP handlers both update these, so every family
takes a lock; labels are given as keyword arguments.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Iterable

LabelKey = tuple[tuple[str, str], ...]


def _labels(key: LabelKey, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = key + extra
    if not items:
        return ""
    esc = [(k, v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")) for k, v in items]
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc) + "}"


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Family:
    kind = ""

    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Family):
    kind = "counter"

    def __init__(self, name: str, help: str):
        super().__init__(name, help)
        self._values: dict[LabelKey, float] = {}

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def get(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0)

    def lines(self) -> list[str]:
        with self._lock:
            return self.header() + [f"{self.name}{_labels(k)} {_num(v)}" for k, v in self._values.items()]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = value


class Histogram(_Family):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float]):
        super().__init__(name, help)
        self.buckets = sorted(buckets)
        # Per label set: how many values fell in each bucket (not cumulative: one bisect per
        # value; the engine observes every generated token), then the sum, then the count.
        self._data: dict[LabelKey, list[float]] = {}

    def observe(self, value: float, **labels: str) -> None:
        self.observe_many((value,), **labels)

    def observe_many(self, values: Iterable[float], **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            d = self._data.setdefault(key, [0.0] * (len(self.buckets) + 3))
            for v in values:
                d[bisect_left(self.buckets, v)] += 1  # index len(buckets): above every bound
                d[-2] += v
                d[-1] += 1

    def lines(self) -> list[str]:
        out = self.header()
        with self._lock:
            for key, d in self._data.items():
                below = 0.0
                for i, b in enumerate(self.buckets):
                    below += d[i]
                    out.append(f"{self.name}_bucket{_labels(key, (('le', _num(b)),))} {_num(below)}")
                out.append(f"{self.name}_bucket{_labels(key, (('le', '+Inf'),))} {_num(d[-1])}")
                out.append(f"{self.name}_sum{_labels(key)} {_num(d[-2])}")
                out.append(f"{self.name}_count{_labels(key)} {_num(d[-1])}")
        return out


LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        p = "exaflop"
        self.requests = Counter(f"{p}_requests_total", "HTTP requests by route and status code")
        self.running = Gauge(f"{p}_requests_running", "sequences decoding now")
        self.waiting = Gauge(f"{p}_requests_waiting", "sequences queued for a KV-cache slot")
        self.auth_limited = Counter(f"{p}_auth_rate_limited_total",
                                    "failed authentications answered 429 (an address over its limit)")
        self.http_refused = Counter(f"{p}_http_refused_total",
                                    "connections closed before the app: oversized or slow request heads")
        self.aborted = Counter(f"{p}_requests_aborted_total", "sequences dropped because the client left")
        self.failed = Counter(f"{p}_sequences_failed_total", "sequences ended by an error inside the engine")
        self.prompt_tokens = Counter(f"{p}_prompt_tokens_total", "prompt tokens prefilled")
        self.kv_blocks = Gauge(f"{p}_kv_cache_blocks", "paged KV-cache blocks of the current checkpoint by "
                               "state: used by running sequences, cached (kept for prefix reuse), free")
        self.prefix_queried = Counter(f"{p}_prefix_cache_queried_tokens_total",
                                      "prompt tokens looked up in the prefix cache")
        self.prefix_hits = Counter(f"{p}_prefix_cache_hit_tokens_total",
                                   "prompt tokens found in the prefix cache (not recomputed)")
        self.generated_tokens = Counter(f"{p}_generation_tokens_total", "tokens generated")
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "arrival to first token", LATENCY)
        self.itl = Histogram(f"{p}_inter_token_latency_seconds", "time between tokens of a sequence", LATENCY)
        self.e2e = Histogram(f"{p}_e2e_request_latency_seconds", "arrival to last token", LATENCY)
        self.batch = Histogram(f"{p}_decode_batch_size", "sequences per decode step", (1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.checkpoint_step = Gauge(f"{p}_checkpoint_step", "checkpoint step being served")
        self.reload_failures = Counter(f"{p}_reload_failures_total", "checkpoints that failed to load")

    def render(self) -> str:
        families = [self.requests, self.auth_limited, self.http_refused, self.running, self.waiting,
                    self.aborted, self.failed, self.prompt_tokens, self.kv_blocks, self.prefix_queried,
                    self.prefix_hits, self.generated_tokens, self.ttft, self.itl, self.e2e, self.batch,
                    self.checkpoint_step, self.reload_failures]
        return "\n".join(line for f in families for line in f.lines()) + "\n"
