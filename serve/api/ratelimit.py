"""Per-user request rate limit: a token bucket per user, in the ingress replica's memory."""

from __future__ import annotations

import math
import time


class RateLimiter:
    def __init__(self, per_minute: float, burst: int, max_users: int = 100_000):
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.max_users = max_users
        self._buckets: dict[str, tuple[float, float]] = {}  # user -> (tokens, last time)

    def check(self, key: str) -> float:
        """Take one token: 0.0 when allowed, else the seconds until one is available."""
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            if len(self._buckets) >= self.max_users and key not in self._buckets:
                self._buckets.clear()
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate if self.rate > 0 else math.inf
