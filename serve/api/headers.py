"""Security headers on every answer of the API (HAProxy in front adds `nosniff` to its own answers
too: serve.ops.haproxy_front). A header the route set itself (the web UI's Content-Security-Policy)
is kept."""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",  # a download is what its Content-Type says, never sniffed
    "X-Frame-Options": "DENY",  # no page of this server inside someone else's frame
    "Referrer-Policy": "no-referrer",  # ids in URLs stay here
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}
# for answers that are not a page (JSON, media): nothing in them may run or load anything
API_CSP = "default-src 'none'; frame-ancestors 'none'; sandbox"


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                headers = MutableHeaders(scope=msg)
                for name, value in SECURITY_HEADERS.items():
                    if name not in headers:
                        headers[name] = value
                if "content-security-policy" not in headers and \
                        not headers.get("content-type", "").startswith("text/html"):
                    headers["Content-Security-Policy"] = API_CSP
            await send(msg)
        await self.app(scope, receive, send_with_headers)
