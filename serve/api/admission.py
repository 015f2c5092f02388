"""What may run at once on an ingress replica, so that no kind of request starves another.

Long-lived responses (Server-Sent Events of a job, video and thumbnail downloads) are *streams*:
bounded per user (`limits.max_streams_per_user`) and per replica (`limits.max_streams_total`), a
429 `too_many_streams` beyond either. Every other request counts against the replica's request
slots (`deployments.ingress.max_ongoing_requests`), a 503 `overloaded` with Retry-After beyond
them. `/health` and `/metrics` count against neither.

Serve's own `max_ongoing_requests` for the Ingress is set by the builder to the request slots plus
`max_streams_total` plus `INGRESS_RESERVED_SLOTS` (serve.config.ingress_serve_slots), so streams, however many the limits let in,
never fill the slots that other routes and `/health` need, and a request over a limit is answered
at once instead of waiting in Serve's queue behind streams that may last minutes.
"""

from __future__ import annotations

import re
from typing import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from serve.api.errors import error_response
from serve.errors import OverloadedError, TooManyStreams

# Paths that never wait for a slot (cheap, and needed most when the replica is busy)
UNCOUNTED_PATHS = frozenset({"/health", "/metrics"})
# The routes whose responses are streams (counted by `StreamLimiter` once the caller is known)
STREAM_PATH = re.compile(r"^/v1/videos/[^/]+/(events|content)$")


class StreamLimiter:
    """Open streams per user and in total on this replica."""

    def __init__(self, per_user: int, total: int):
        self.per_user, self.total = per_user, total
        self.open: dict[str, int] = {}
        self.count = 0

    def acquire(self, user_id: str) -> Callable[[], None]:
        """Count one more stream of `user_id` (429 too_many_streams past a bound); returns its release."""
        mine = self.open.get(user_id, 0)
        if mine >= self.per_user:
            raise TooManyStreams(f"you have {mine} progress streams and downloads open; the limit is "
                                 f"{self.per_user}. Close one first", retry_after_s=1)
        if self.count >= self.total:
            raise TooManyStreams(f"the server has {self.count} progress streams and downloads open, its limit; "
                                 "try again shortly (or poll GET /v1/videos/{id})", retry_after_s=2)
        self.open[user_id] = mine + 1
        self.count += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.count -= 1
            left = self.open[user_id] - 1
            if left:
                self.open[user_id] = left
            else:
                del self.open[user_id]
        return release


class CountedStream:
    """An ASGI response that gives its stream slot back when it is done, however it ends (sent,
    client gone, error)."""

    def __init__(self, response: ASGIApp, release: Callable[[], None]):
        self.response, self.release = response, release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.response(scope, receive, send)
        finally:
            self.release()


class AdmissionMiddleware:
    """Ordinary requests beyond `slots` at once: 503 overloaded at once (see the module doc)."""

    def __init__(self, app: ASGIApp, slots: int):
        self.app, self.slots = app, slots
        self.busy = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):  # an app under a route prefix: the route's own path
            path = path[len(root):] or "/"
        if scope["type"] != "http" or path in UNCOUNTED_PATHS or STREAM_PATH.match(path):
            return await self.app(scope, receive, send)
        if self.busy >= self.slots:
            resp = error_response(OverloadedError.status, OverloadedError.code, f"the server is handling {self.busy} requests, its limit; "
                                  "try again shortly", headers={"Retry-After": "1"})
            return await resp(scope, receive, send)
        self.busy += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.busy -= 1
