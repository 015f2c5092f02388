"""Brute-force throttles on sign-in: failed logins per username and per client address, failed
API keys and bearer tokens per client address. Past a threshold of failures (counted until
`window_s` passes without one) the next attempt is a 429 `too_many_failed_attempts` with
Retry-After; every attempt while locked, right or wrong, is refused without looking at the
password and locks again for twice as long (capped), so a correct guess cannot be told apart
during a lockout and a client that keeps hammering keeps waiting longer. A successful login
clears its username's count (never the address's: one valid account must not reset the count
of an address that sprays passwords at others).

A valid API key or token is never refused for its address's failures: keys are 256-bit random
and tokens are signed, so there is nothing to guess there, and users behind the same address
as an attacker keep working. Its lookup runs first; only a failed one is counted (and refused
with 429 once the address is locked).

Where the counts live: the database (table `auth_failures`), not the shared Ray actor that
holds the per-user request buckets (`serve.api.ratelimit`). They are written only on failures
and read only on login attempts, so good traffic pays nothing and one short write per failure
is cheap even on SQLite's single writer. They guard passwords, so they must fail closed and
outlive restarts: counts in an actor would vanish when it (or the cluster) restarts, and an
attacker who could crash or flood it would get unlimited guesses. One database already serves
every ingress replica on every node (PostgreSQL for several nodes), so the limit is one across
replicas with nothing more to run; when the database is down, nobody signs in anyway.

The client address is the TCP peer, or, when that peer is one of `ingress.trusted_proxies`, the
right-most X-Forwarded-For hop that is not a trusted proxy (what the nearest trusted proxy saw).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from typing import Iterable

from sqlalchemy import delete, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.dialects import postgresql, sqlite
from starlette.requests import Request

from serve.config import FailedAuthConfig
from serve.errors import TooManyFailedAttempts, is_disk_full
from serve.jobs.db import Database, auth_failures

logger = logging.getLogger(__name__)

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PRUNE_EVERY = 200  # failures recorded by one replica between sweeps of forgotten rows


def parse_networks(values: Iterable[str]) -> list[_Network]:
    return [ipaddress.ip_network(v, strict=False) for v in values]


def client_address(request: Request, trusted: list[_Network]) -> str:
    """The address the failed-auth throttles count by (IPv6 grouped by /64: one host holds many)."""
    peer = request.client.host if request.client else ""
    if trusted and _trusted(peer, trusted):
        hops = [h.strip() for v in request.headers.getlist("x-forwarded-for") for h in v.split(",")]
        hops = [h for h in hops if h]
        for hop in reversed(hops):
            if not _trusted(hop, trusted):
                return _group(hop)
        if hops:  # every hop is a trusted proxy: the first one is where the request came from
            return _group(hops[0])
    return _group(peer) if peer else "unknown"


def _trusted(host: str, trusted: list[_Network]) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def _group(host: str) -> str:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]  # not an address (a test client, a unix socket): counted as given
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class FailedAuthThrottle:
    """The failure counts and lockouts of sign-in attempts, in the database (see the module doc)."""

    def __init__(self, db: Database, config: FailedAuthConfig):
        self.db = db
        self.config = config
        self._since_prune = 0

    # ---- logins ----
    async def check_login(self, username: str, address: str) -> None:
        """Before a password is checked: 429 while the username or the address is locked (and
        the attempt counts, locking them longer)."""
        if not self.config.enabled:
            return
        keys = self._login_keys(username, address)
        async with self.db.read() as conn:
            locked = (await conn.execute(select(auth_failures.c.key).where(
                auth_failures.c.key.in_(list(keys)), auth_failures.c.locked_until > time.time()))).first()
        if locked:
            outcome = await self._record_or_skip(keys)
            raise self._refusal(max(until for _, until in outcome.values()) if outcome
                                else time.time() + self.config.lockout_s)

    async def login_failed(self, username: str, address: str) -> None:
        if self.config.enabled:
            await self._record_or_skip(self._login_keys(username, address))

    async def login_succeeded(self, username: str) -> None:
        """Clear the username's count; a write only when there is one (most logins find none)."""
        if not self.config.enabled:
            return
        key = _user_key(username)
        async with self.db.read() as conn:
            counted = (await conn.execute(select(auth_failures.c.key).where(auth_failures.c.key == key))).first()
        if counted:
            async with self.db.write() as conn:
                await conn.execute(delete(auth_failures).where(auth_failures.c.key == key))

    # ---- API keys and bearer tokens ----
    async def credential_failed(self, address: str) -> None:
        """Count a refused API key or token; raise 429 when the address was already locked."""
        if not self.config.enabled:
            return
        key = f"cred:{address}"
        outcome = await self._record_or_skip({key: self.config.credential_failures_per_address})
        if outcome and outcome[key][0]:
            raise self._refusal(outcome[key][1])

    # ---- the counts ----
    def _login_keys(self, username: str, address: str) -> dict[str, int]:
        return {_user_key(username): self.config.login_failures_per_username,
                f"addr:{address}": self.config.login_failures_per_address}

    def _refusal(self, until: float) -> TooManyFailedAttempts:
        wait = max(1.0, until - time.time())
        return TooManyFailedAttempts(f"too many failed sign-in attempts; try again in {math.ceil(wait)} s. "
                                     "Each attempt before then doubles the wait", retry_after_s=wait)

    async def _record_or_skip(self, thresholds: dict[str, int]) -> dict[str, tuple[bool, float]] | None:
        """`_record`, or nothing when the database cannot take the write, too busy or its disk
        full: the request is refused all the same (its 401 does not become a 503 or a 507), one
        failure goes uncounted."""
        try:
            return await self._record(thresholds)
        except OperationalError as exc:
            busy = "database is locked" in str(exc)
            if not busy and not is_disk_full(exc):
                raise
            logger.warning("database %s: a failed sign-in attempt was not counted (%s)", "busy" if busy else "full",
                           ", ".join(k.split(":", 1)[0] for k in thresholds))
            return None

    async def _record(self, thresholds: dict[str, int]) -> dict[str, tuple[bool, float]]:
        """One failure for each key (key -> its threshold), in one transaction. Returns, per key,
        whether it was locked before this failure and when its lock ends (0: not locked)."""
        cfg = self.config
        now = time.time()
        outcome: dict[str, tuple[bool, float]] = {}
        async with self.db.write() as conn:
            for key in sorted(thresholds):  # one order everywhere: no deadlock between two writers
                await conn.execute(self._insert_ignore().values(key=key, failures=0, lockouts=0,
                                                                last_failure_at=now, locked_until=0.0))
                row = (await conn.execute(select(auth_failures).where(auth_failures.c.key == key)
                                          .with_for_update())).mappings().one()
                failures, lockouts, until = row["failures"], row["lockouts"], row["locked_until"]
                was_locked = until > now
                if not was_locked and now - row["last_failure_at"] > cfg.window_s:
                    failures = lockouts = 0  # a quiet window forgives
                failures += 1
                if was_locked or failures >= thresholds[key]:
                    until = now + min(cfg.lockout_s * 2.0 ** min(lockouts, 40), cfg.max_lockout_s)
                    lockouts += 1
                    if not was_locked:
                        logger.warning("sign-in locked for %.0f s after %d failures: %s", until - now, failures,
                                       key.split(":", 1)[0])
                await conn.execute(update(auth_failures).where(auth_failures.c.key == key).values(
                    failures=failures, lockouts=lockouts, last_failure_at=now, locked_until=until))
                outcome[key] = (was_locked, until)
            self._since_prune += 1
            if self._since_prune >= PRUNE_EVERY:
                self._since_prune = 0
                await conn.execute(delete(auth_failures).where(
                    auth_failures.c.last_failure_at < now - cfg.window_s, auth_failures.c.locked_until < now))
        return outcome

    def _insert_ignore(self):
        dialect = postgresql if self.db.write_engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(auth_failures).on_conflict_do_nothing(index_elements=["key"])


def _user_key(username: str) -> str:
    return f"user:{username[:190]}"
