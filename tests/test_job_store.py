"""The job store on its own (no Ray): migrations, the conditional-UPDATE claim, leases,
recovery of interrupted jobs, per-user limits and pagination."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text, update

from serve.jobs.db import Database, jobs
from serve.errors import TooManyJobsError
from serve.contracts import FAILED, IN_PROGRESS, QUEUED
from serve.jobs.store import JobStore

from pg_server import new_database


@pytest.fixture(params=[pytest.param("sqlite", marks=pytest.mark.fast), "postgresql"])
async def store(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}"
    else:
        url = await new_database(request.getfixturevalue("postgres_server"))
    db = Database(url)
    await db.migrate()
    await db.migrate()  # idempotent
    async with db.write() as conn:
        await conn.execute(text("INSERT INTO users (id, username, password_hash, role, disabled, created_at) "
                                "VALUES ('u1', 'u1', 'x', 'user', false, 0), ('u2', 'u2', 'x', 'user', false, 0)"))
    yield JobStore(db)
    await db.dispose()


async def _new(store, user="u1", **kw):
    return await store.create(user_id=user, model="m", prompt="p", spec_json="{}", **kw)


async def test_schema_is_managed_by_alembic_with_wal(store):
    async with store.db.read() as conn:
        assert (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar_one() == "0004_auth_failures"
        if not store.db.url.startswith("sqlite"):
            return
        assert (await conn.execute(text("PRAGMA journal_mode"))).scalar_one() == "wal"
        assert (await conn.execute(text("PRAGMA busy_timeout"))).scalar_one() == 5000


async def test_concurrent_claims_never_share_a_job(store, tmp_path):
    created = [(await _new(store))["id"] for _ in range(6)]
    other = JobStore(Database(store.db.url))  # a second "replica" with its own engine
    results = await asyncio.gather(*[(store if i % 2 else other).claim(f"owner{i}", 30) for i in range(10)])
    claimed = [r["id"] for r in results if r]
    assert sorted(claimed) == sorted(created) and len(set(claimed)) == 6
    assert all(r["status"] == IN_PROGRESS and r["attempts"] == 1 for r in results if r)
    await other.db.dispose()


async def test_heartbeat_complete_and_lost_ownership(store):
    job = await _new(store)
    claimed = await store.claim("me", 30)
    assert (await store.heartbeat(job["id"], "me", 30, progress=40, stage="transformer")) == {"cancel_requested": False}
    assert await store.heartbeat(job["id"], "someone-else", 30) is None
    assert (await store.get(job["id"]))["progress"] == 40
    assert await store.complete(claimed["id"], "me", video_path="v", thumbnail_path="t", has_audio=False,
                                duration_s=1.0)
    assert not await store.complete(claimed["id"], "me", video_path="v", thumbnail_path="t", has_audio=False,
                                    duration_s=1.0)  # only once


async def test_expired_leases_are_requeued_then_failed_after_max_attempts(store):
    job = await _new(store)
    for attempt in (1, 2):
        claimed = await store.claim("dead-replica", 0.01)
        assert claimed["id"] == job["id"] and claimed["attempts"] == attempt
        await asyncio.sleep(0.02)
        out = await store.recover_expired(max_attempts=2)
        if attempt == 1:
            assert out == {QUEUED: [job["id"]], FAILED: []}
        else:
            assert out == {QUEUED: [], FAILED: [job["id"]]}
    row = await store.get(job["id"])
    assert row["status"] == FAILED and row["error_code"] == "max_attempts_exceeded"
    assert "lease expired" in row["error_message"] and row["lease_owner"] is None


async def test_live_lease_is_left_alone(store):
    job = await _new(store)
    await store.claim("alive", 60)
    assert await store.recover_expired(max_attempts=3) == {QUEUED: [], FAILED: []}
    assert (await store.get(job["id"]))["status"] == IN_PROGRESS


async def test_cancel_queued_and_running(store):
    queued = await _new(store)
    running = await _new(store)
    async with store.db.write() as conn:  # make `running` the oldest so it is claimed first
        await conn.execute(update(jobs).where(jobs.c.id == running["id"]).values(seq=0))
    assert (await store.claim("me", 30))["id"] == running["id"]
    assert (await store.request_cancel(queued["id"], "u1"))["status"] == FAILED
    assert (await store.request_cancel(running["id"], "u1"))["status"] == IN_PROGRESS
    assert await store.heartbeat(running["id"], "me", 30) == {"cancel_requested": True}
    assert await store.request_cancel(running["id"], "u2") is None  # another user's job


async def test_per_user_active_limit_and_pagination(store):
    for _ in range(3):
        await _new(store, max_active_per_user=3)
    with pytest.raises(TooManyJobsError):
        await _new(store, max_active_per_user=3)
    await _new(store, user="u2", max_active_per_user=3)
    rows, more = await store.list(user_id="u1", limit=2, order="asc")
    assert more and len(rows) == 2
    rest, more2 = await store.list(user_id="u1", after=rows[-1]["id"], limit=2, order="asc")
    assert not more2 and len(rest) == 1
    assert {r["id"] for r in rows + rest} == {r["id"] for r in (await store.list(user_id="u1", limit=10))[0]}
    counts = await store.counts_by_status()
    assert counts == {"queued": 4, "in_progress": 0, "completed": 0, "failed": 0}
    assert await store.active_users() == 2
