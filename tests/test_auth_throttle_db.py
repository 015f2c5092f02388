"""The failed-auth counts and the API-key cap on their own (no Ray), on SQLite and PostgreSQL:
two "replicas" (two engines on one database) failing at once count every failure once, and
concurrent key creations never pass the cap."""

from __future__ import annotations

import asyncio

import pytest

from serve.api.auth import Authenticator
from serve.api.throttle import FailedAuthThrottle
from serve.config import FailedAuthConfig
from serve.errors import ConflictError, TooManyFailedAttempts
from serve.jobs.db import Database

from pg_server import new_database


async def _never() -> bool:
    raise AssertionError("the password is checked during a lock only from a known address")


async def _right() -> bool:
    return True


@pytest.fixture(params=["sqlite", "postgresql"])
async def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'auth.db'}"
    return await new_database(request.getfixturevalue("postgres_server"))


async def test_two_replicas_share_one_count(url):
    cfg = FailedAuthConfig(login_failures_per_username=6, login_failures_per_pair=1000,
                           login_failures_per_address=1000, lockout_s=30,
                           max_lockout_s=120)
    a, b = Database(url), Database(url)
    await a.migrate()
    try:
        ta, tb = FailedAuthThrottle(a, cfg), FailedAuthThrottle(b, cfg)
        # six failures, three through each replica, all at once: the sixth locks
        await asyncio.gather(*[t.login_failed("carol", "192.0.2.1") for t in (ta, tb) * 3])
        with pytest.raises(TooManyFailedAttempts) as locked:
            await tb.check_login("carol", "192.0.2.99", _never)
        assert 25 <= locked.value.retry_after_s <= 30  # refused while locked, and not extended
        await ta.check_login("dave", "192.0.2.1", _never)  # other names are not affected
        await ta.login_succeeded("carol", "192.0.2.1")  # (carol's known address, seen by both replicas)
        await tb.check_login("carol", "192.0.2.1", _right)  # the right password passes the name's lock
        with pytest.raises(TooManyFailedAttempts):
            await tb.check_login("carol", "192.0.2.99", _never)
    finally:
        await a.dispose()
        await b.dispose()


async def test_concurrent_key_creations_stay_under_the_cap(url):
    a, b = Database(url), Database(url)
    await a.migrate()
    try:
        auth_a, auth_b = Authenticator(a, secret="-"), Authenticator(b, secret="-")
        user = await auth_a.create_user("erin", "pw")
        results = await asyncio.gather(*[auth.create_api_key(user["id"], "k", max_active=3)
                                         for auth in (auth_a, auth_b) * 4], return_exceptions=True)
        assert sum(isinstance(r, dict) for r in results) == 3, results
        assert all(isinstance(r, ConflictError) and r.code == "api_key_limit_reached"
                   for r in results if not isinstance(r, dict)), results
        assert len(await auth_a.list_api_keys(user["id"])) == 3
    finally:
        await a.dispose()
        await b.dispose()


async def test_a_busy_database_leaves_the_refusal_a_refusal(tmp_path):
    """While another writer holds SQLite's lock past the busy timeout, a bad credential is still
    refused as it would be (no 503): the failure just goes uncounted."""
    import sqlite3

    url = f"sqlite+aiosqlite:///{tmp_path / 'busy.db'}"
    db = Database(url, busy_timeout_ms=100)
    await db.migrate()
    throttle = FailedAuthThrottle(db, FailedAuthConfig(credential_failures_per_address=1))
    holder = sqlite3.connect(tmp_path / "busy.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        await throttle.credential_failed("192.0.2.5")  # not raised: neither 429 nor "database is locked"
        await throttle.login_failed("frank", "192.0.2.5")
        holder.execute("ROLLBACK")
        await throttle.credential_failed("192.0.2.5")  # counted now: the threshold of 1 locks
        with pytest.raises(TooManyFailedAttempts):
            await throttle.credential_failed("192.0.2.5")
    finally:
        holder.close()
        await db.dispose()


SLOW_READ = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000000) SELECT count(*) FROM c"


@pytest.mark.parametrize("cancels", [1, 2])
async def test_a_write_cancelled_mid_statement_gives_the_lock_back(tmp_path, cancels):
    """A request cancelled inside a write while SQLite runs one of its statements (its client went
    away: Serve cancels the handler), even when the cancellation comes again during the rollback,
    leaves no transaction open: every other process can write again once the statement has run,
    not only when this process ends."""
    import sqlite3

    from sqlalchemy import text

    path = tmp_path / "cancel.db"
    db = Database(f"sqlite+aiosqlite:///{path}", busy_timeout_ms=100)
    await db.migrate()
    running = asyncio.Event()

    async def writer():
        async with db.write() as conn:
            await conn.execute(text("DELETE FROM users"))  # a write transaction now
            running.set()
            await conn.execute(text(SLOW_READ))  # cancelled while SQLite runs this

    task = asyncio.ensure_future(writer())
    await running.wait()
    await asyncio.sleep(0.05)
    for _ in range(cancels):  # a second one lands while the rollback waits for the statement
        task.cancel()
        await asyncio.sleep(0.01)
    with pytest.raises(asyncio.CancelledError):
        await task
    other = sqlite3.connect(path, timeout=30, isolation_level=None)  # waits out the statement, not forever
    try:
        other.execute("BEGIN IMMEDIATE")  # "database is locked" after 30 s if the transaction were left open
        other.execute("ROLLBACK")
    finally:
        other.close()
    async with db.write() as conn:  # and this process writes again
        await conn.execute(text("DELETE FROM users"))
    await db.dispose()
