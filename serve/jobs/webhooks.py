"""The webhook delivery worker inside the ingress, started and stopped with the job service like the
dispatcher. It claims due deliveries from the job database (conditional UPDATE + lease, so two
replicas never send the same attempt at once), POSTs each one signed the Standard Webhooks way
(`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256>`), and records the
outcome. Delivery is at least once: a delivery is `pending` in the database until an endpoint
answers 2xx, so one in flight when a replica stops is sent again by the next replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from datetime import datetime, timezone

import httpx
from standardwebhooks import Webhook

from serve.config import WebhooksConfig
from serve.jobs.metrics import JobMetrics
from serve.jobs.webhook_store import WebhookStore, resolve_receiver

logger = logging.getLogger(__name__)

USER_AGENT = "CineVivid-Webhooks/1"


class _CheckedBackend:
    """httpcore's network backend that resolves the receiver's host itself, refuses it when any of
    its addresses is internal (`resolve_receiver`), and connects to the address it checked: a name
    that resolves to a public address for the check and to an internal one a moment later (DNS
    rebinding) cannot slip through. TLS still verifies the certificate against the host name."""

    def __init__(self, config: WebhooksConfig):
        import httpcore

        self.config = config
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options=None):
        import httpcore

        addresses, refusal = await resolve_receiver(host, port, self.config)
        if refusal is not None:
            raise httpcore.ConnectError(f"not sent: {refusal}")
        last: Exception | None = None
        for address in addresses:
            try:
                return await self.inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                    socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise RuntimeError("webhooks are sent over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def checked_transport(config: WebhooksConfig) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose every connection goes through `_CheckedBackend`; no proxy from the
    environment (a proxy would do its own resolving)."""
    import httpcore

    transport = httpx.AsyncHTTPTransport(trust_env=False)
    transport._pool = httpcore.AsyncConnectionPool(  # noqa: SLF001 - httpx takes no network backend
        ssl_context=httpx.create_ssl_context(), network_backend=_CheckedBackend(config))
    return transport


def signed_headers(secret: str, msg_id: str, payload: str, timestamp: float | None = None) -> dict[str, str]:
    """The Standard Webhooks headers for `payload` (the exact body sent), signed with `secret`."""
    ts = int(timestamp if timestamp is not None else time.time())
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(ts, tz=timezone.utc), payload)
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": signature,
            "content-type": "application/json", "user-agent": USER_AGENT}


class WebhookWorker:
    def __init__(self, store: WebhookStore, config: WebhooksConfig, metrics: JobMetrics | None = None):
        self.store = store
        self.config = config
        self.metrics = metrics
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = asyncio.Event()
        self._inflight: dict[str, asyncio.Task] = {}
        self._loop_task: asyncio.Task | None = None
        self._client: httpx.AsyncClient | None = None
        self._stopping = False

    # ---- lifecycle ----
    async def start(self) -> None:
        if not self.config.enabled or self._loop_task is not None:
            return
        self._stopping = False
        # no redirects: a 3xx is a failed attempt, the endpoint's URL is what the user registered
        self._client = httpx.AsyncClient(timeout=self.config.timeout_s, follow_redirects=False, trust_env=False,
                                         transport=checked_transport(self.config))
        self._loop_task = asyncio.create_task(self._loop(), name="cinevivid-webhooks")
        logger.info("webhook worker %s started", self.owner)

    async def stop(self) -> None:
        """Stop sending; deliveries in flight stay pending and their leases are given back, so the
        next replica (or this app restarted) sends them at once."""
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        inflight = list(self._inflight.items())
        for _, task in inflight:
            task.cancel()
        await asyncio.gather(*(t for _, t in inflight), return_exceptions=True)
        if inflight:
            try:
                await self.store.release([d for d, _ in inflight], self.owner)
            except Exception:  # noqa: BLE001 - their leases expire anyway
                logger.warning("webhook worker %s: releasing leases failed", self.owner, exc_info=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        logger.info("webhook worker %s stopped; released %d delivery(ies) in flight", self.owner, len(inflight))

    def wake(self) -> None:
        self._wake.set()

    # ---- main loop ----
    async def _loop(self) -> None:
        while not self._stopping:
            try:
                free = self.config.max_concurrent_deliveries - len(self._inflight)
                if free > 0:
                    for delivery in await self.store.claim_due(self.owner, free):
                        self._launch(delivery)
            except asyncio.CancelledError:
                raise
            except Exception:  # the DB may be down; keep trying
                logger.exception("webhook worker %s: loop error", self.owner)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.poll_interval_s)
            except asyncio.TimeoutError:
                pass

    def _launch(self, delivery: dict) -> None:
        delivery_id = delivery["id"]
        task = asyncio.create_task(self._deliver(delivery), name=f"webhook-{delivery_id}")
        self._inflight[delivery_id] = task

        def _done(_t, delivery_id=delivery_id):
            self._inflight.pop(delivery_id, None)
            self._wake.set()  # a slot is free
        task.add_done_callback(_done)

    # ---- one attempt ----
    async def _deliver(self, d: dict) -> None:
        attempt = d["attempts"] + 1
        log_ctx = f"webhook {d['id']} ({d['event_type']} of {d['job_id']} to {d['endpoint_id']}, attempt {attempt})"
        started = time.time()
        t0 = time.monotonic()
        status_code: int | None = None
        error: str | None = None
        try:
            assert self._client is not None
            # the host is resolved and checked again as the connection opens (`_CheckedBackend`)
            async with self._client.stream("POST", d["url"], content=d["payload"].encode(),
                                           headers=signed_headers(d["secret"], d["id"], d["payload"])) as r:
                status_code = r.status_code  # the body is never read
            if not 200 <= r.status_code < 300:
                # the status only: the receiver's answer is never shown (it could be an internal page)
                error = f"HTTP {r.status_code}"
        except httpx.TimeoutException:
            error = f"timed out after {self.config.timeout_s:g} s"
        except httpx.HTTPError as exc:
            text = str(exc)
            error = text[:500] if text.startswith("not sent: ") else f"{type(exc).__name__}: {text}"[:500]
        ok = error is None
        try:
            status = await asyncio.shield(self.store.record_attempt(
                d["id"], self.owner, status_code=status_code, error=error, ok=ok, started_at=started,
                duration_ms=(time.monotonic() - t0) * 1000))
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the lease expires; the delivery is sent again
            logger.exception("%s: recording the attempt failed", log_ctx)
            return
        if status is None:
            logger.info("%s: endpoint deleted meanwhile; dropped", log_ctx)
            return
        if self.metrics is not None:
            self.metrics.webhook_attempts.labels(status).inc()
        if ok:
            logger.info("%s: delivered (HTTP %s)", log_ctx, status_code)
        else:
            logger.warning("%s: %s; now %s", log_ctx, error, status)
