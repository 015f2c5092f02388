"""Webhook records: a user's endpoints (URL, events, signing secret), the deliveries a finished job
owes them, and every attempt to send one. Every write is one short transaction.

A delivery is written by `enqueue_job_event` inside the job store's transaction that sets the
job's final status, so a job is never finished without its deliveries (nor the reverse). Sending
is `serve.jobs.webhooks.WebhookWorker`'s: it claims due deliveries with one conditional UPDATE and
a lease (`claim_due`), so two ingress replicas never send the same attempt at once, and records
each outcome (`record_attempt`): delivered, retried later with exponential backoff, or failed
after `max_attempts`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import socket
import time
import uuid
from datetime import datetime, timezone
from urllib.parse import urlsplit

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from serve.config import WebhooksConfig
from serve.errors import InvalidSpecError, TooManyWebhooks
from serve.jobs.db import Database, jobs, users, webhook_attempts, webhook_deliveries, webhook_endpoints
from serve.jobs.views import video_view

logger = logging.getLogger(__name__)

VIDEO_COMPLETED = "video.completed"
VIDEO_FAILED = "video.failed"
WEBHOOK_EVENTS = (VIDEO_COMPLETED, VIDEO_FAILED)
SECRET_PREFIX = "whsec_"
# delivery statuses
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


def new_secret() -> str:
    """A Standard Webhooks signing secret: `whsec_` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def validate_endpoint_url(url: str, max_length: int) -> str:
    """An absolute http(s) URL with a host, at most `max_length` characters (400 naming `url`)."""
    url = url.strip()
    if not url:
        raise InvalidSpecError("url must not be empty", param="url")
    if len(url) > max_length:
        raise InvalidSpecError(f"url is {len(url)} characters long; the limit is {max_length}", param="url")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise InvalidSpecError("url must not contain whitespace or control characters", param="url")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise InvalidSpecError(f"url is not a valid URL: {exc}", param="url") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidSpecError(f"url must be an http:// or https:// URL (got scheme {parts.scheme!r})",
                               param="url")
    if not parts.hostname:
        raise InvalidSpecError("url must name a host, e.g. https://example.com/hooks", param="url")
    return url


async def resolve_receiver(host: str, port: int | None, config: WebhooksConfig) -> tuple[list[str], str | None]:
    """The addresses `host` resolves to now, and why a delivery to it may not be sent (any one of
    its addresses internal and not allowed, see `WebhooksConfig.address_refusal`), or None when it may."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):  # UnicodeError: a name IDNA refuses (an empty or over-long label)
        return [], f"url's host {host!r} does not resolve"
    addresses = sorted({info[4][0] for info in infos})
    if not addresses:
        return [], f"url's host {host!r} does not resolve"
    for address in addresses:
        why = config.address_refusal(host, address)
        if why is not None:
            return addresses, (f"url's host {host!r} resolves to {why}; webhooks go only to public addresses, "
                               "outside the networks this server refuses (an operator may allow one: "
                               "webhooks.allowed_networks / allowed_hosts)")
    return addresses, None


async def receiver_refusal(url: str, config: WebhooksConfig) -> str | None:
    """Why a delivery to `url` may not be sent (its host resolved now, every address checked), or
    None when it may."""
    return (await resolve_receiver(urlsplit(url).hostname or "", None, config))[1]


def backoff_s(attempt: int, config: WebhooksConfig) -> float:
    """The wait after failed attempt number `attempt` (1-based): initial, doubling, capped."""
    return min(config.backoff_max_s, config.backoff_initial_s * 2 ** (attempt - 1))


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


async def enqueue_job_event(conn: AsyncConnection, job_id: str, event_type: str) -> int:
    """Write one pending delivery of `event_type` for job `job_id` to each of the job owner's
    endpoints that subscribe to it, on the caller's connection (so in the caller's transaction,
    the one that finishes the job). Returns how many were written."""
    job = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).mappings().first()
    if job is None:
        return 0
    endpoints = (await conn.execute(select(webhook_endpoints.c.id, webhook_endpoints.c.events).where(
        webhook_endpoints.c.user_id == job["user_id"]))).all()
    targets = [e.id for e in endpoints if event_type in json.loads(e.events)]
    if not targets:
        return 0
    now = time.time()
    try:
        data = video_view(dict(job))
    except Exception:  # noqa: BLE001 - a malformed record must not keep the job from finishing
        logger.exception("job %s: could not render the video for its webhook; sending the basics", job_id)
        data = {"id": job["id"], "object": "video", "status": job["status"]}
    payload = json.dumps({"type": event_type, "timestamp": _iso(job["completed_at"] or now), "data": data},
                         separators=(",", ":"))
    await conn.execute(insert(webhook_deliveries), [
        {"id": f"msg_{uuid.uuid4().hex}", "endpoint_id": endpoint_id, "user_id": job["user_id"],
         "job_id": job_id, "event_type": event_type, "payload": payload, "status": PENDING, "attempts": 0,
         "next_attempt_at": now, "created_at": now, "updated_at": now}
        for endpoint_id in targets])
    logger.info("job %s: %s queued for %d webhook endpoint(s)", job_id, event_type, len(targets))
    return len(targets)


class WebhookStore:
    def __init__(self, db: Database, config: WebhooksConfig):
        self.db = db
        self.config = config

    # ---- endpoints (the user's) ----
    async def create_endpoint(self, *, user_id: str, url: str, events: list[str], description: str = "") -> dict:
        """A new endpoint, with its secret (the only time the secret is returned)."""
        url = validate_endpoint_url(url, self.config.max_url_length)
        refusal = await receiver_refusal(url, self.config)
        if refusal is not None:
            raise InvalidSpecError(refusal, param="url")
        unknown = sorted(set(events) - set(WEBHOOK_EVENTS))
        if unknown or not events:
            raise InvalidSpecError(f"events must be a non-empty list of {list(WEBHOOK_EVENTS)}", param="events")
        row = {"id": f"whep_{uuid.uuid4().hex}", "user_id": user_id, "url": url, "events": json.dumps(events),
               "description": description, "secret": new_secret(), "created_at": time.time()}
        cap = self.config.max_endpoints_per_user
        async with self.db.write() as conn:
            have = (await conn.execute(select(func.count()).select_from(webhook_endpoints).where(
                webhook_endpoints.c.user_id == user_id))).scalar_one()
            if have >= cap:
                raise TooManyWebhooks(f"you have {have} webhook endpoints; the limit is {cap}. "
                                      "Delete one (DELETE /v1/webhooks/{id}) first", param="url")
            await conn.execute(insert(webhook_endpoints).values(**row))
            owner = (await conn.execute(select(users.c.username).where(users.c.id == user_id))).scalar_one()
        return {**self._endpoint_view(row, owner), "secret": row["secret"]}

    async def list_endpoints(self, user_id: str | None) -> list[dict]:
        """The endpoints of `user_id`, or of every user when None (admins), oldest first."""
        stmt = (select(webhook_endpoints, users.c.username)
                .join(users, users.c.id == webhook_endpoints.c.user_id).order_by(webhook_endpoints.c.seq))
        if user_id is not None:
            stmt = stmt.where(webhook_endpoints.c.user_id == user_id)
        async with self.db.read() as conn:
            rows = (await conn.execute(stmt)).mappings().all()
        return [self._endpoint_view(r, r["username"]) for r in rows]

    async def get_endpoint(self, endpoint_id: str, user_id: str | None) -> dict | None:
        stmt = select(webhook_endpoints).where(webhook_endpoints.c.id == endpoint_id)
        if user_id is not None:
            stmt = stmt.where(webhook_endpoints.c.user_id == user_id)
        async with self.db.read() as conn:
            row = (await conn.execute(stmt)).mappings().first()
        return dict(row) if row else None

    async def delete_endpoint(self, endpoint_id: str, user_id: str | None) -> bool:
        """Delete an endpoint (of `user_id`; any when None) and, with it, its undelivered
        deliveries: nothing more is sent to it."""
        cond = [webhook_endpoints.c.id == endpoint_id]
        if user_id is not None:
            cond.append(webhook_endpoints.c.user_id == user_id)
        async with self.db.write() as conn:
            found = (await conn.execute(select(webhook_endpoints.c.id).where(*cond))).scalar_one_or_none()
            if found is None:
                return False
            # explicit, not only ON DELETE CASCADE: the order matters for the foreign keys
            ids = select(webhook_deliveries.c.id).where(webhook_deliveries.c.endpoint_id == endpoint_id)
            await conn.execute(delete(webhook_attempts).where(webhook_attempts.c.delivery_id.in_(ids)))
            await conn.execute(delete(webhook_deliveries).where(webhook_deliveries.c.endpoint_id == endpoint_id))
            await conn.execute(delete(webhook_endpoints).where(webhook_endpoints.c.id == endpoint_id))
        return True

    async def list_deliveries(self, endpoint_id: str, limit: int = 50) -> list[dict]:
        """The endpoint's newest deliveries, each with its attempts (oldest first)."""
        async with self.db.read() as conn:
            rows = [dict(r) for r in (await conn.execute(
                select(webhook_deliveries).where(webhook_deliveries.c.endpoint_id == endpoint_id)
                .order_by(webhook_deliveries.c.seq.desc()).limit(limit))).mappings().all()]
            attempts = (await conn.execute(
                select(webhook_attempts).where(webhook_attempts.c.delivery_id.in_([r["id"] for r in rows]))
                .order_by(webhook_attempts.c.seq))).mappings().all() if rows else []
        by_delivery: dict[str, list[dict]] = {}
        for a in attempts:
            by_delivery.setdefault(a["delivery_id"], []).append(dict(a))
        return [{**r, "attempt_log": by_delivery.get(r["id"], [])} for r in rows]

    @staticmethod
    def _endpoint_view(row, owner: str) -> dict:
        return {"id": row["id"], "object": "webhook_endpoint", "url": row["url"],
                "events": json.loads(row["events"]), "description": row["description"],
                "created_at": int(row["created_at"]), "owner": owner}

    # ---- deliveries (the worker's) ----
    async def claim_due(self, owner: str, limit: int) -> list[dict]:
        """Lease up to `limit` pending deliveries that are due and not leased by a live replica:
        one conditional UPDATE each, so a delivery is claimed by one replica at a time. Each comes
        with its endpoint's url and secret."""
        now = time.time()
        free = or_(webhook_deliveries.c.lease_expires_at.is_(None), webhook_deliveries.c.lease_expires_at < now)
        due = and_(webhook_deliveries.c.status == PENDING, webhook_deliveries.c.next_attempt_at <= now, free)
        claimed: list[str] = []
        async with self.db.read() as conn:  # nothing due (the usual case): no write lock taken
            if (await conn.execute(select(webhook_deliveries.c.id).where(due).limit(1))).first() is None:
                return []
        async with self.db.write() as conn:
            cands = (await conn.execute(select(webhook_deliveries.c.id).where(due)
                                        .order_by(webhook_deliveries.c.next_attempt_at, webhook_deliveries.c.seq)
                                        .limit(limit))).scalars().all()
            for delivery_id in cands:
                res = await conn.execute(update(webhook_deliveries).where(
                    webhook_deliveries.c.id == delivery_id, due).values(
                    lease_owner=owner, lease_expires_at=now + self.config.lease_seconds, updated_at=now))
                if res.rowcount == 1:
                    claimed.append(delivery_id)
            if not claimed:
                return []
            rows = (await conn.execute(
                select(webhook_deliveries, webhook_endpoints.c.url, webhook_endpoints.c.secret)
                .join(webhook_endpoints, webhook_endpoints.c.id == webhook_deliveries.c.endpoint_id)
                .where(webhook_deliveries.c.id.in_(claimed)).order_by(webhook_deliveries.c.seq))).mappings().all()
        return [dict(r) for r in rows]

    async def record_attempt(self, delivery_id: str, owner: str, *, status_code: int | None, error: str | None,
                             ok: bool, started_at: float, duration_ms: float) -> str | None:
        """Record one attempt of a delivery this owner leased and release the lease: `delivered`,
        `pending` again (next attempt after the backoff), or `failed` after `max_attempts`.
        Returns the new status, or None when the delivery is gone (its endpoint was deleted)."""
        now = time.time()
        async with self.db.write() as conn:
            attempts = (await conn.execute(select(webhook_deliveries.c.attempts).where(
                webhook_deliveries.c.id == delivery_id, webhook_deliveries.c.lease_owner == owner,
                webhook_deliveries.c.status == PENDING))).scalar_one_or_none()
            if attempts is None:
                return None
            attempt = attempts + 1
            values: dict = {"attempts": attempt, "last_status_code": status_code, "last_error": error,
                            "lease_owner": None, "lease_expires_at": None, "updated_at": now}
            if ok:
                values.update(status=DELIVERED, delivered_at=now)
            elif attempt >= self.config.max_attempts:
                values.update(status=FAILED)
            else:
                values.update(status=PENDING, next_attempt_at=now + backoff_s(attempt, self.config))
            await conn.execute(update(webhook_deliveries).where(webhook_deliveries.c.id == delivery_id)
                               .values(**values))
            await conn.execute(insert(webhook_attempts).values(
                delivery_id=delivery_id, attempt=attempt, status_code=status_code,
                error=error[:2000] if error else None, started_at=started_at, duration_ms=duration_ms))
        return values["status"]

    async def release(self, delivery_ids: list[str], owner: str) -> None:
        """Give back leases (shutdown) so another replica, or this one restarted, sends them now."""
        if not delivery_ids:
            return
        async with self.db.write() as conn:
            await conn.execute(update(webhook_deliveries).where(
                webhook_deliveries.c.id.in_(delivery_ids), webhook_deliveries.c.lease_owner == owner).values(
                lease_owner=None, lease_expires_at=None, updated_at=time.time()))

    async def counts_by_status(self) -> dict[str, int]:
        async with self.db.read() as conn:
            rows = (await conn.execute(select(webhook_deliveries.c.status, func.count())
                                       .group_by(webhook_deliveries.c.status))).all()
        return {PENDING: 0, DELIVERED: 0, FAILED: 0, **{s: n for s, n in rows}}
