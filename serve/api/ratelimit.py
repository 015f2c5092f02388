"""Per-user request rate limit: a token bucket per user, one for the whole application.

Where the buckets live: one named async Ray actor per application (`RequestLimiterActor`,
created by whichever ingress replica asks first, `get_if_exists`, detached, in Serve's
namespace), not the database. The limit is taken on *every* authenticated request: in the
database that would be a write per request, and SQLite has a single writer (every request
would queue behind every other one's commit and behind the job writes); even on PostgreSQL it
is a row update and a WAL record per request for state that is worthless a minute later. The
actor is one in-memory call (a fraction of a millisecond to about one, measured in docs/http-api.md),
reachable from every replica on every node.

It is a single point, so it is never allowed to fail a request: if a call fails or takes
longer than `SHARED_TIMEOUT_S` (the actor died, its node is gone), the replica logs it, falls
back to its own per-replica bucket for `RETRY_AFTER_FAILURE_S`, then gets or recreates the
actor (Ray also restarts it). A restarted actor starts with full buckets; for a fairness limit
that is acceptable, which is also why the brute-force throttles, which must not reset, live in
the database instead (`serve.api.throttle`).

`limits.rate_limit_scope: replica` keeps the old behaviour: a bucket per replica, no hop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import ray

logger = logging.getLogger(__name__)

SHARED_TIMEOUT_S = 1.0  # a slower answer counts as a failure: the replica's own bucket decides
START_TIMEOUT_S = 30.0  # the first call to a new handle waits for the actor's worker to start
RETRY_AFTER_FAILURE_S = 5.0  # after a failure, the replica's own bucket decides this long


class RateLimiter:
    """Token buckets in one process's memory."""

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
                self._forget_full(now)
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate if self.rate > 0 else math.inf

    def _forget_full(self, now: float) -> None:
        """Drop the buckets that have refilled (the same as absent); all of them if none has."""
        full = [k for k, (tokens, last) in self._buckets.items()
                if tokens + (now - last) * self.rate >= self.burst]
        if not full:
            self._buckets.clear()
        for k in full:
            del self._buckets[k]


@ray.remote(num_cpus=0, max_restarts=-1)
class RequestLimiterActor:
    """The application's token buckets, shared by every ingress replica. Async, so calls run one
    at a time on its event loop with no lock and never wait on one another's I/O (there is none)."""

    def __init__(self):
        self._limiters: dict[tuple[float, int], RateLimiter] = {}

    async def ping(self) -> bool:
        return True

    async def take(self, key: str, per_minute: float, burst: int) -> float:
        limiter = self._limiters.get((per_minute, burst))
        if limiter is None:  # a redeploy with new limits gets new buckets
            limiter = self._limiters[(per_minute, burst)] = RateLimiter(per_minute, burst)
        return limiter.check(key)


def limiter_actor_name(app_name: str) -> str:
    return f"cinevivid-request-limiter:{app_name}"


SERVE_NAMESPACE = "serve"  # where Serve names its own actors (its controller, the replicas)


def limiter_namespace() -> str:
    """Serve's namespace inside a replica (its job's namespace may be another driver's), else
    the caller's own (the app run in-process, e.g. in tests)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        serve.get_replica_context()
    except RayServeException:
        return ray.get_runtime_context().namespace
    return SERVE_NAMESPACE


class SharedRateLimiter:
    """`check` asks the application's `RequestLimiterActor`; never fails (see the module doc).
    With `shared=False` (or no Ray, e.g. under bare uvicorn) the replica's own buckets decide."""

    def __init__(self, per_minute: float, burst: int, *, app_name: str, shared: bool = True):
        self.per_minute, self.burst, self.shared = per_minute, burst, shared
        self.name = limiter_actor_name(app_name)
        self.local = RateLimiter(per_minute, burst)
        self._actor = None
        self._ready = False  # the current handle has answered once
        self._connecting = asyncio.Lock()
        self._local_until = 0.0

    async def check(self, key: str) -> float:
        if not self.shared or not ray.is_initialized() or time.monotonic() < self._local_until:
            return self.local.check(key)
        try:
            actor = self._actor or await self._connect()
            wait = await asyncio.wait_for(actor.take.remote(key, self.per_minute, self.burst),
                                          SHARED_TIMEOUT_S if self._ready else START_TIMEOUT_S)
            self._ready = True
            return wait
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the request goes on
            self._actor, self._ready = None, False
            self._local_until = time.monotonic() + RETRY_AFTER_FAILURE_S
            logger.warning("shared request limiter %s unavailable (%r); this replica's own bucket decides "
                           "for %.0f s, then it is looked up or recreated", self.name, exc, RETRY_AFTER_FAILURE_S)
            return self.local.check(key)

    async def _connect(self):
        async with self._connecting:
            if self._actor is None:
                namespace = limiter_namespace()
                self._actor = await asyncio.wait_for(asyncio.to_thread(
                    lambda: RequestLimiterActor.options(name=self.name, namespace=namespace, get_if_exists=True,
                                                        lifetime="detached").remote()), START_TIMEOUT_S)
            return self._actor

    async def warm(self) -> None:
        """Get or start the actor ahead of the first request (at replica start)."""
        if self.shared and ray.is_initialized():
            try:
                actor = await self._connect()
                await asyncio.wait_for(actor.ping.remote(), START_TIMEOUT_S)
                self._ready = True
            except Exception as exc:  # noqa: BLE001 - the first request tries again
                self._actor = None
                logger.warning("shared request limiter %s did not start: %r", self.name, exc)
