"""The request-body limit: 413 for a body over `max_bytes` (or, for a multipart body to one of the
paths in `per_path`, that path's own limit: the routes that take an image or a video upload), by
Content-Length or as it streams in. JSON bodies keep `max_bytes` everywhere, data-URL images included.

And the body timeout: a body that stops arriving is a 408 (BodyTimeoutMiddleware)."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.api.errors import error_response
from serve.errors import PayloadTooLarge, RequestTimeout


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, per_path: dict[str, int] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.per_path = per_path or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_bytes = self.max_bytes
        if scope.get("path", "") in self.per_path and any(
                name == b"content-type" and value.lower().startswith(b"multipart/form-data")
                for name, value in scope.get("headers", ())):
            max_bytes = self.per_path[scope["path"]]
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    if int(value) > max_bytes:
                        resp = error_response(413, "payload_too_large",
                                              f"request body is {int(value)} bytes; the limit is {max_bytes}")
                        return await resp(scope, receive, send)
                except ValueError:
                    pass
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > max_bytes:
                    raise PayloadTooLarge(f"request body exceeds the limit of {max_bytes} bytes")
            return msg
        await self.app(scope, limited_receive, send)


def _has_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
    return False


class BodyTimeoutMiddleware:
    """A request body that stalls - no piece of it for `idle_timeout_s` before its end - is answered
    408 request_timeout (the error envelope), and the replica's connection closed (HAProxy keeps
    the client's until its `timeout client`, waiting for the rest of the body). HAProxy in front forwards a
    body larger than its buffer as it comes, and would itself cut a silent client only at its
    `timeout client`, with a 400 (serve.config.HTTPFrontConfig). Once the body is complete,
    `receive` is no longer timed (a streaming answer waits on it for the client's disconnect)."""

    def __init__(self, app: ASGIApp, idle_timeout_s: float):
        self.app = app
        self.idle_timeout_s = idle_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            return await self.app(scope, receive, send)
        done = False

        async def timed_receive() -> Message:
            nonlocal done
            if done:
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), self.idle_timeout_s)
            except asyncio.TimeoutError:
                done = True
                raise RequestTimeout(f"the request body stopped arriving: nothing for {self.idle_timeout_s:g} s; "
                                     "the connection is closed") from None
            if msg["type"] != "http.request" or not msg.get("more_body", False):
                done = True
            return msg

        async def send_closing(msg: Message) -> None:
            # a 408 leaves the body unread: the connection cannot carry another request
            if msg["type"] == "http.response.start" and msg["status"] == 408:
                msg = {**msg, "headers": [*msg.get("headers", ()), (b"connection", b"close")]}
            await send(msg)
        await self.app(scope, timed_receive, send_closing)
