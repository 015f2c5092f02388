"""Brute-force throttles on sign-in, built so that they cannot be turned against a user.

Failed logins are counted per (username, client address) pair, per username (across addresses) and
per client address (across usernames); failed API keys and bearer tokens per client address. Past
a threshold of failures (counted until `window_s` passes without one) the key is locked: a 429
`too_many_failed_attempts` with Retry-After. Lockouts grow exponentially (OWASP Authentication
Cheat Sheet, "Account Lockout": an exponential back-off, not a permanent lock): after a lock ends,
the next failure locks again for twice as long, up to `max_lockout_s`.

What keeps a lockout from being a denial of service:
- Attempts *during* a lock are refused without being counted: nothing an attacker sends, right
  or wrong, extends a lock (a correct password during a lock never re-arms it).
- The tight bound is the pair's: an attacker guessing from their own address locks only their own
  pair, not the user signing in from elsewhere.
- The username's and the address's bounds (distributed guessing, password spraying) let through a
  correct password from an address this username has signed in from before (a *known* address,
  remembered for `known_address_days`; the OWASP cheat sheet's "device cookie" idea, keyed by
  address): the user keeps signing in while their name is under attack from elsewhere, and users
  behind the same address as an attacker keep signing in. Only then is the password checked
  during a lock; anywhere else a locked attempt is refused unchecked, so a guess cannot be told
  right from wrong.
A successful login clears its pair's count only: the username's count (guesses from elsewhere)
and the address's (guesses at other names) are not the signing-in user's to reset.

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
from typing import Awaitable, Callable, Iterable

from sqlalchemy import delete, insert, select, update
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
    async def check_login(self, username: str, address: str, password_ok: Callable[[], Awaitable[bool]]) -> None:
        """Before a password counts: 429 while the pair, the username or the address is locked,
        unless only the username's or the address's bound is locked, the address is known for the
        username and `password_ok()` says the password is right. Nothing is recorded here."""
        if not self.config.enabled:
            return
        now = time.time()
        pair, user, addr, known = (_pair_key(username, address), _user_key(username), f"addr:{address}",
                                   _known_key(username, address))
        async with self.db.read() as conn:
            rows = {r.key: r.locked_until for r in (await conn.execute(
                select(auth_failures.c.key, auth_failures.c.locked_until).where(
                    auth_failures.c.key.in_([pair, user, addr, known])))).all()}
        locked = {k: until for k, until in rows.items() if k != known and until > now}
        if not locked:
            return
        if pair not in locked and rows.get(known, 0.0) > now:
            if await password_ok():
                logger.info("sign-in from a known address passed a lock of its %s",
                            " and ".join(k.split(":", 1)[0] for k in sorted(locked)))
                return
            # a wrong guess from a known address counts towards its pair (which then locks it)
            await self.login_failed(username, address)
        raise self._refusal(max(locked.values()))

    async def login_failed(self, username: str, address: str) -> None:
        if self.config.enabled:
            await self._record_or_skip(self._login_keys(username, address))

    async def login_succeeded(self, username: str, address: str) -> None:
        """Clear the pair's count and remember the address for the username (one write)."""
        if not self.config.enabled:
            return
        now = time.time()
        known = _known_key(username, address)
        async with self.db.write() as conn:
            await conn.execute(delete(auth_failures).where(auth_failures.c.key.in_(
                [_pair_key(username, address), known])))
            # a known address: a row that is never a lock (check_login reads it apart); its
            # locked_until is when it is forgotten
            await conn.execute(insert(auth_failures).values(
                key=known, failures=0, lockouts=0, last_failure_at=now,
                locked_until=now + self.config.known_address_days * 86400.0))

    # ---- API keys and bearer tokens ----
    async def credential_failed(self, address: str) -> None:
        """Count a refused API key or token; raise 429 when the address was already locked."""
        if not self.config.enabled:
            return
        key = f"cred:{address}"
        outcome = await self._record_or_skip({key: self.config.credential_failures_per_address}, extend_locked=True)
        if outcome and outcome[key][0]:
            raise self._refusal(outcome[key][1])

    # ---- the counts ----
    def _login_keys(self, username: str, address: str) -> dict[str, int]:
        return {_pair_key(username, address): self.config.login_failures_per_pair,
                _user_key(username): self.config.login_failures_per_username,
                f"addr:{address}": self.config.login_failures_per_address}

    def _refusal(self, until: float) -> TooManyFailedAttempts:
        wait = max(1.0, until - time.time())
        return TooManyFailedAttempts(f"too many failed sign-in attempts; try again in {math.ceil(wait)} s "
                                     "(each lockout after a new failure is twice as long)", retry_after_s=wait)

    async def _record_or_skip(self, thresholds: dict[str, int], *,
                              extend_locked: bool = False) -> dict[str, tuple[bool, float]] | None:
        """`_record`, or nothing when the database cannot take the write, too busy or its disk
        full: the request is refused all the same (its 401 does not become a 503 or a 507), one
        failure goes uncounted."""
        try:
            return await self._record(thresholds, extend_locked=extend_locked)
        except OperationalError as exc:
            busy = "database is locked" in str(exc)
            if not busy and not is_disk_full(exc):
                raise
            logger.warning("database %s: a failed sign-in attempt was not counted (%s)", "busy" if busy else "full",
                           ", ".join(k.split(":", 1)[0] for k in thresholds))
            return None

    async def _record(self, thresholds: dict[str, int], *, extend_locked: bool = False
                      ) -> dict[str, tuple[bool, float]]:
        """One failure for each key (key -> its threshold), in one transaction. Returns, per key,
        whether it was locked before this failure and when its lock ends (0: not locked). With
        `extend_locked` a failure during a lock locks again for twice as long (bad API keys and
        tokens: a valid key is never refused, so that cannot lock a user out); without, a lock is
        left as it is (sign-ins)."""
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
                if was_locked and not extend_locked:  # a sign-in lock is never extended during it
                    outcome[key] = (True, until)
                    continue
                if failures >= thresholds[key]:
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


def _pair_key(username: str, address: str) -> str:
    return f"pair:{address[:64]}|{username[:120]}"


def _known_key(username: str, address: str) -> str:
    return f"known:{address[:64]}|{username[:120]}"
