"""API keys and per-key rate limits.

Keys come from `--api-key-file` (one per line, `#` comments) and/or the
EXAFLOP_API_KEYS environment variable (comma-separated). A presented key is
compared with every configured key using `hmac.compare_digest`, without stopping
at the first match, so response time does not reveal how much of a key was right.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import threading
import time
from collections import deque
from pathlib import Path

from exaflop.errors import UserError

ENV_VAR = "EXAFLOP_API_KEYS"
WINDOW_S = 60.0


def load_keys(key_file: str | None) -> list[str]:
    keys: list[str] = []
    if key_file:
        path = Path(key_file)
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            raise UserError(f"--api-key-file {key_file}: cannot read ({e.strerror})") from None
        keys += [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if not keys:
            raise UserError(f"--api-key-file {key_file}: no keys in it (one key per line)")
    keys += [k.strip() for k in os.environ.get(ENV_VAR, "").split(",") if k.strip()]
    return keys


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, keys: list[str]) -> None:
    if not keys and not is_loopback(host):
        raise UserError(f"--host {host}: refusing to serve beyond this machine without API keys; "
                        f"pass --api-key-file FILE or set {ENV_VAR}, or bind 127.0.0.1")


class KeyChecker:
    def __init__(self, keys: list[str]):
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, presented: str | None) -> str | None:
        """The key's id (a short hash: safe in logs and metrics) if valid, else None."""
        if presented is None:
            return None
        given = presented.encode()
        ok = False
        for k in self._keys:
            ok |= hmac.compare_digest(given, k)
        return hashlib.sha256(given).hexdigest()[:12] if ok else None


class RateLimited(Exception):
    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class RateLimiter:
    """Sliding one-minute windows of requests and tokens per key; 0 disables a limit."""

    def __init__(self, requests_per_min: int = 0, tokens_per_min: int = 0):
        self.rpm, self.tpm = requests_per_min, tokens_per_min
        self._requests: dict[str, deque[float]] = {}
        self._tokens: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def admit(self, key: str, prompt_tokens: int) -> None:
        """Count one request with its prompt tokens, or raise RateLimited."""
        now = time.monotonic()
        with self._lock:
            reqs = self._requests.setdefault(key, deque())
            toks = self._tokens.setdefault(key, deque())
            while reqs and reqs[0] <= now - WINDOW_S:
                reqs.popleft()
            while toks and toks[0][0] <= now - WINDOW_S:
                toks.popleft()
            if self.rpm and len(reqs) >= self.rpm:
                raise RateLimited(f"Rate limit reached: {self.rpm} requests per minute for this key",
                                  reqs[0] + WINDOW_S - now)
            used = sum(n for _, n in toks)
            if self.tpm and toks and used + prompt_tokens > self.tpm:
                raise RateLimited(f"Rate limit reached: {self.tpm} tokens per minute for this key "
                                  f"({used} used in the last minute, {prompt_tokens} requested)",
                                  toks[0][0] + WINDOW_S - now)
            reqs.append(now)
            if prompt_tokens:
                toks.append((now, prompt_tokens))

    def charge(self, key: str, tokens: int) -> None:
        """Add generated tokens once known (they count against the next requests)."""
        if not self.tpm or not tokens:
            return
        with self._lock:
            self._tokens.setdefault(key, deque()).append((time.monotonic(), tokens))


class FailedAuthLimiter:
    """Failed authentications per client address in a sliding window.

    Past `limit` failures in `window_s` an address's further *failures* are answered 429
    with Retry-After instead of 401. A valid key is checked first and always passes, so
    clients behind the same address (a NAT, a proxy) are never slowed by someone else's
    guessing; the 429s and the metric make a key-guessing client visible to operators.
    Keys must be unguessable (>= 128 random bits) for this to be a defence at all.
    """

    def __init__(self, limit: int = 20, window_s: float = WINDOW_S, max_addresses: int = 10_000):
        self.limit, self.window_s, self.max_addresses = limit, window_s, max_addresses
        self._fails: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def failed(self, address: str) -> float | None:
        """Record a failure; seconds to wait if the address is over its limit, else None."""
        if self.limit <= 0:
            return None
        now = time.monotonic()
        with self._lock:
            if address not in self._fails and len(self._fails) >= self.max_addresses:
                self._prune(now)  # bounded memory under many addresses
            q = self._fails.setdefault(address, deque())
            while q and q[0] <= now - self.window_s:
                q.popleft()
            q.append(now)
            if len(q) > self.limit:
                while len(q) > self.limit + 1:  # keep only what decides the next answer
                    q.popleft()
                return q[0] + self.window_s - now
        return None

    def _prune(self, now: float) -> None:
        for addr in [a for a, q in self._fails.items() if not q or q[-1] <= now - self.window_s]:
            del self._fails[addr]
        while len(self._fails) >= self.max_addresses:
            self._fails.pop(next(iter(self._fails)))
