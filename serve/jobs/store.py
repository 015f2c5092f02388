"""Job records: create, read, list, claim (one conditional UPDATE with a lease), progress,
finish, cancel, delete, and recovery of interrupted jobs. Every write is one short transaction.

Every write that gives a job its final status (completed or failed) also writes, in the same
transaction, the `video.completed` / `video.failed` webhook deliveries the job's owner subscribed
to (`serve.jobs.webhook_store.enqueue_job_event`); `on_webhooks` is then called to wake the sender.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable

from sqlalchemy import and_, delete, func, insert, or_, select, update

from serve.contracts import (
    ACTIVE_STATUSES, CANCELLED, CANCELLED_MESSAGE, COMPLETED, FAILED, IN_PROGRESS, JOB_STATUSES, QUEUED,
)
from serve.errors import InvalidRequest, MaxAttemptsExceeded, TooManyJobsError
from serve.jobs.db import Database, jobs
from serve.jobs.webhook_store import VIDEO_COMPLETED, VIDEO_FAILED, enqueue_job_event


def new_job_id() -> str:
    return f"video_{uuid.uuid4().hex}"


class JobStore:
    def __init__(self, db: Database, on_webhooks: Callable[[], None] | None = None):
        self.db = db
        self.on_webhooks = on_webhooks  # called after a commit that queued webhook deliveries

    def _queued_webhooks(self, n: int) -> None:
        if n and self.on_webhooks is not None:
            self.on_webhooks()

    # ---- create / read ----
    async def create(self, *, user_id: str, model: str, prompt: str, spec_json: str,
                     remixed_from: str | None = None, max_active_per_user: int | None = None,
                     job_id: str | None = None) -> dict:
        """A queued job; `job_id`: one made beforehand with `new_job_id()` (its inputs are saved
        under it before the job exists, so no dispatcher can claim a job whose inputs are missing)."""
        now = time.time()
        row = {"id": job_id or new_job_id(), "user_id": user_id, "model": model, "prompt": prompt, "spec": spec_json,
               "status": QUEUED, "progress": 0, "attempts": 0, "remixed_from": remixed_from,
               "created_at": now, "updated_at": now, "cancel_requested": False, "has_audio": False}
        async with self.db.write() as conn:
            if max_active_per_user is not None:
                active = (await conn.execute(select(func.count()).select_from(jobs).where(
                    jobs.c.user_id == user_id, jobs.c.status.in_(ACTIVE_STATUSES)))).scalar_one()
                if active >= max_active_per_user:
                    raise TooManyJobsError(
                        f"you have {active} queued or running jobs; the limit is {max_active_per_user}",
                        retry_after_s=5)
            await conn.execute(insert(jobs).values(**row))
            created = (await conn.execute(select(jobs).where(jobs.c.id == row["id"]))).mappings().one()
        return dict(created)

    async def active_count(self, user_id: str) -> int:
        """The user's queued and running jobs (a read: the check that counts is `create`'s)."""
        async with self.db.read() as conn:
            return (await conn.execute(select(func.count()).select_from(jobs).where(
                jobs.c.user_id == user_id, jobs.c.status.in_(ACTIVE_STATUSES)))).scalar_one()

    async def get(self, job_id: str, user_id: str | None = None) -> dict | None:
        stmt = select(jobs).where(jobs.c.id == job_id)
        if user_id is not None:
            stmt = stmt.where(jobs.c.user_id == user_id)
        async with self.db.read() as conn:
            row = (await conn.execute(stmt)).mappings().first()
        return dict(row) if row else None

    async def list(self, *, user_id: str, after: str | None = None, limit: int = 20,
                   order: str = "desc") -> tuple[list[dict], bool]:
        stmt = select(jobs).where(jobs.c.user_id == user_id)
        async with self.db.read() as conn:
            if after:
                seq = (await conn.execute(select(jobs.c.seq).where(
                    jobs.c.id == after, jobs.c.user_id == user_id))).scalar_one_or_none()
                if seq is None:
                    raise InvalidRequest(f"no video with id {after!r}", param="after")
                stmt = stmt.where(jobs.c.seq < seq if order == "desc" else jobs.c.seq > seq)
            stmt = stmt.order_by(jobs.c.seq.desc() if order == "desc" else jobs.c.seq.asc()).limit(limit + 1)
            rows = [dict(r) for r in (await conn.execute(stmt)).mappings().all()]
        return rows[:limit], len(rows) > limit

    # ---- dispatcher side ----
    async def claim(self, owner: str, lease_s: float, *, hold_models: set[str] | frozenset[str] = frozenset()
                    ) -> dict | None:
        """Claim the oldest queued job (of a model not in `hold_models`: those wait for a replica):
        one conditional UPDATE (`... WHERE id = :id AND status = 'queued'`) so two dispatchers never
        run the same job."""
        now = time.time()
        cond = jobs.c.status == QUEUED
        if hold_models:
            cond = and_(cond, jobs.c.model.notin_(sorted(hold_models)))
        async with self.db.write() as conn:
            for _ in range(3):
                cand = (await conn.execute(select(jobs.c.id).where(cond)
                                           .order_by(jobs.c.seq).limit(1))).scalar_one_or_none()
                if cand is None:
                    return None
                res = await conn.execute(update(jobs).where(jobs.c.id == cand, jobs.c.status == QUEUED).values(
                    status=IN_PROGRESS, lease_owner=owner, lease_expires_at=now + lease_s,
                    attempts=jobs.c.attempts + 1, started_at=now, updated_at=now, progress=0, stage=None))
                if res.rowcount == 1:
                    return dict((await conn.execute(select(jobs).where(jobs.c.id == cand))).mappings().one())
        return None

    async def heartbeat(self, job_id: str, owner: str, lease_s: float, *, progress: int | None = None,
                        stage: str | None = None) -> dict | None:
        """Renew the lease (and record progress). Returns {cancel_requested} or None when the job
        is no longer ours (deleted, or re-queued after our lease expired)."""
        now = time.time()
        values: dict[str, Any] = {"lease_expires_at": now + lease_s, "updated_at": now}
        if progress is not None:
            values["progress"] = progress
        if stage is not None:
            values["stage"] = stage
        async with self.db.write() as conn:
            res = await conn.execute(update(jobs).where(
                jobs.c.id == job_id, jobs.c.lease_owner == owner, jobs.c.status == IN_PROGRESS).values(**values))
            if res.rowcount != 1:
                return None
            cancel = (await conn.execute(select(jobs.c.cancel_requested).where(jobs.c.id == job_id))).scalar_one()
        return {"cancel_requested": bool(cancel)}

    async def complete(self, job_id: str, owner: str, *, video_path: str, thumbnail_path: str,
                       has_audio: bool, duration_s: float) -> bool:
        now = time.time()
        async with self.db.write() as conn:
            res = await conn.execute(update(jobs).where(
                jobs.c.id == job_id, jobs.c.lease_owner == owner, jobs.c.status == IN_PROGRESS).values(
                status=COMPLETED, progress=100, stage="done", video_path=video_path,
                thumbnail_path=thumbnail_path, has_audio=has_audio, duration_s=duration_s,
                completed_at=now, updated_at=now, lease_owner=None, lease_expires_at=None))
            hooks = await enqueue_job_event(conn, job_id, VIDEO_COMPLETED) if res.rowcount == 1 else 0
        self._queued_webhooks(hooks)
        return res.rowcount == 1

    async def fail(self, job_id: str, owner: str | None, *, code: str, message: str,
                   param: str | None = None) -> bool:
        now = time.time()
        cond = [jobs.c.id == job_id, jobs.c.status.in_(ACTIVE_STATUSES)]
        if owner is not None:
            cond.append(jobs.c.lease_owner == owner)
        async with self.db.write() as conn:
            res = await conn.execute(update(jobs).where(*cond).values(
                status=FAILED, error_code=code, error_message=message[:2000], error_param=param,
                completed_at=now, updated_at=now, lease_owner=None, lease_expires_at=None))
            hooks = await enqueue_job_event(conn, job_id, VIDEO_FAILED) if res.rowcount == 1 else 0
        self._queued_webhooks(hooks)
        return res.rowcount == 1

    async def release(self, job_id: str, owner: str) -> str | None:
        """Give back a job this owner was running, at a clean shutdown (`cinevivid down`, a rolling
        update): re-queue it and hand back the attempt its claim counted, since nothing went wrong
        with the job (a cancel requested meanwhile fails it `cancelled`). Returns the new status,
        or None when it was no longer ours."""
        now = time.time()
        cond = and_(jobs.c.id == job_id, jobs.c.lease_owner == owner, jobs.c.status == IN_PROGRESS)
        async with self.db.write() as conn:
            row = (await conn.execute(select(jobs.c.id, jobs.c.cancel_requested).where(cond))).mappings().first()
            if row is None:
                return None
            if row["cancel_requested"]:
                values = dict(status=FAILED, error_code=CANCELLED, error_message=CANCELLED_MESSAGE,
                              completed_at=now)
            else:
                # a running job's claim counted one attempt (attempts >= 1 here)
                values = dict(status=QUEUED, progress=0, stage=None, attempts=jobs.c.attempts - 1)
            await conn.execute(update(jobs).where(cond).values(
                lease_owner=None, lease_expires_at=None, updated_at=now, **values))
            hooks = await enqueue_job_event(conn, row["id"], VIDEO_FAILED) if values["status"] == FAILED else 0
        self._queued_webhooks(hooks)
        return values["status"]

    async def recover_expired(self, max_attempts: int) -> dict[str, list[str]]:
        """Re-queue (or fail, after `max_attempts`) every in-progress job whose lease expired."""
        now = time.time()
        cond = and_(jobs.c.status == IN_PROGRESS,
                    or_(jobs.c.lease_expires_at.is_(None), jobs.c.lease_expires_at < now))
        async with self.db.read() as conn:
            ids = (await conn.execute(select(jobs.c.id).where(cond))).scalars().all()
        out: dict[str, list[str]] = {QUEUED: [], FAILED: []}
        for job_id in ids:
            status = await self._requeue_or_fail(and_(cond, jobs.c.id == job_id), max_attempts,
                                                 "its worker stopped (lease expired)")
            if status:
                out[status].append(job_id)
        return out

    async def lease_owners(self) -> list[str]:
        """The distinct lease owners of the in-progress jobs."""
        async with self.db.read() as conn:
            return list((await conn.execute(select(jobs.c.lease_owner).where(
                jobs.c.status == IN_PROGRESS, jobs.c.lease_owner.is_not(None)).distinct())).scalars().all())

    async def recover_owner(self, owner: str, max_attempts: int, reason: str) -> dict[str, list[str]]:
        """Re-queue (or fail, after `max_attempts`) every in-progress job leased by `owner`, a
        worker known to be gone, without waiting for its leases to expire (as `recover_expired`)."""
        cond = and_(jobs.c.status == IN_PROGRESS, jobs.c.lease_owner == owner)
        async with self.db.read() as conn:
            ids = (await conn.execute(select(jobs.c.id).where(cond))).scalars().all()
        out: dict[str, list[str]] = {QUEUED: [], FAILED: []}
        for job_id in ids:
            status = await self._requeue_or_fail(and_(cond, jobs.c.id == job_id), max_attempts, reason)
            if status:
                out[status].append(job_id)
        return out

    async def _requeue_or_fail(self, cond, max_attempts: int, reason: str) -> str | None:
        now = time.time()
        async with self.db.write() as conn:
            row = (await conn.execute(select(jobs.c.id, jobs.c.attempts, jobs.c.cancel_requested)
                                      .where(cond))).mappings().first()
            if row is None:
                return None
            if row["cancel_requested"]:
                values = dict(status=FAILED, error_code=CANCELLED, error_message=CANCELLED_MESSAGE,
                              completed_at=now)
            elif row["attempts"] >= max_attempts:
                values = dict(status=FAILED, error_code=MaxAttemptsExceeded.code, completed_at=now,
                              error_message=f"the job was interrupted {row['attempts']} time(s) and has used up "
                                            f"its {max_attempts} attempt(s); last interruption: {reason}")
            else:
                values = dict(status=QUEUED, progress=0, stage=None)
            await conn.execute(update(jobs).where(jobs.c.id == row["id"]).values(
                lease_owner=None, lease_expires_at=None, updated_at=now, **values))
            hooks = await enqueue_job_event(conn, row["id"], VIDEO_FAILED) if values["status"] == FAILED else 0
        self._queued_webhooks(hooks)
        return values["status"]

    # ---- user actions ----
    async def request_cancel(self, job_id: str, user_id: str) -> dict | None:
        """A queued job fails `cancelled` at once; a running one is flagged for its dispatcher.
        Finished jobs are left as they are. Returns the record, or None if not found."""
        now = time.time()
        hooks = 0
        async with self.db.write() as conn:
            row = (await conn.execute(select(jobs.c.status).where(
                jobs.c.id == job_id, jobs.c.user_id == user_id))).first()
            if row is None:
                return None
            if row.status == QUEUED:
                await conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                    status=FAILED, error_code=CANCELLED, error_message=CANCELLED_MESSAGE,
                    completed_at=now, updated_at=now, cancel_requested=True))
                hooks = await enqueue_job_event(conn, job_id, VIDEO_FAILED)
            elif row.status == IN_PROGRESS:
                await conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                    cancel_requested=True, updated_at=now))
            out = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).mappings().one()
        self._queued_webhooks(hooks)
        return dict(out)

    async def delete(self, job_id: str, user_id: str) -> dict | None:
        async with self.db.write() as conn:
            row = (await conn.execute(select(jobs).where(
                jobs.c.id == job_id, jobs.c.user_id == user_id))).mappings().first()
            if row is None:
                return None
            await conn.execute(delete(jobs).where(jobs.c.id == job_id))
        return dict(row)

    # ---- the backlog (serve.jobs.backlog) ----
    async def backlog(self) -> list[dict]:
        """The active jobs (queued and in progress): id, model, status, stage and spec, oldest first."""
        async with self.db.read() as conn:
            rows = (await conn.execute(select(jobs.c.id, jobs.c.model, jobs.c.status, jobs.c.stage, jobs.c.spec)
                                       .where(jobs.c.status.in_(ACTIVE_STATUSES)).order_by(jobs.c.seq))).mappings()
            return [dict(r) for r in rows]

    async def set_queued_stage(self, job_ids: list[str], stage: str | None) -> int:
        """Set the progress phase of queued jobs (e.g. "starting the model"); running ones are left alone."""
        if not job_ids:
            return 0
        async with self.db.write() as conn:
            res = await conn.execute(update(jobs).where(jobs.c.id.in_(job_ids), jobs.c.status == QUEUED)
                                     .values(stage=stage, updated_at=time.time()))
            return res.rowcount

    # ---- stats ----
    async def counts_by_status(self) -> dict[str, int]:
        async with self.db.read() as conn:
            rows = (await conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status))).all()
        counts = {s: 0 for s in JOB_STATUSES}
        counts.update({s: n for s, n in rows})
        return counts

    async def active_users(self, since_s: float = 24 * 3600) -> int:
        async with self.db.read() as conn:
            return (await conn.execute(select(func.count(func.distinct(jobs.c.user_id))).where(
                jobs.c.created_at >= time.time() - since_s))).scalar_one()
