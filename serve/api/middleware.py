"""The request-body limit: 413 for a body over `max_bytes` (or, for a multipart body to one of the
paths in `per_path`, that path's own limit: the routes that take an image or a video upload), by
Content-Length or as it streams in. JSON bodies keep `max_bytes` everywhere, data-URL images included."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.api.errors import error_response
from serve.errors import PayloadTooLarge


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
