"""API keys and per-key rate limits.

Keys come from `--api-key` or a file (one per line, `#` comments); they are never logged: a key is
known in logs and metrics by a short hash. A presented key is compared with every configured key
in constant time (`hmac.compare_digest`, and no early exit), so response timing does not reveal
how much of a key was right or which key matched.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from pathlib import Path

from budgetlm.errors import UserError


def read_keys_file(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"cannot read the API keys file {path}: {e.strerror}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise UserError(f"the API keys file {path} holds no key")
    return keys


def key_id(key: str) -> str:
    """What logs and metrics call a key: the first 8 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


class KeyChecker:
    """No keys: every request passes (as "anonymous"). Otherwise `Authorization: Bearer KEY` must match one."""

    def __init__(self, keys: list[str] | None):
        self.keys = [k.encode() for k in (keys or [])]
        for k in self.keys:
            if not k or any(c in k for c in b" \t\r\n"):
                raise UserError("an API key must be non-empty and contain no whitespace")

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def check(self, authorization: str | None) -> str | None:
        """The caller's key id, or None when the header holds no valid key."""
        if not self.keys:
            return "anonymous"
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return None
        given = presented.strip().encode()
        match = None
        for k in self.keys:  # all of them, every time
            if hmac.compare_digest(given, k):
                match = k
        return key_id(match.decode()) if match is not None else None


class RateLimiter:
    """A token bucket per key: `per_minute` requests a minute on average, bursts of up to `burst`."""

    def __init__(self, per_minute: float, burst: int | None = None, clock=time.monotonic):
        self.rate = per_minute / 60.0
        self.capacity = float(burst if burst is not None else max(1, math.ceil(per_minute / 6)))  # 10 s worth by default
        self.clock = clock
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last time)
        self.lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when the request may go ahead, else the seconds until it would."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        with self.lock:
            tokens, last = self.buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self.buckets[key] = (tokens - 1, now)
                return 0.0
            self.buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate
