"""A real webhook receiver for the tests: an HTTP server on 127.0.0.1 in a thread that verifies each
request's Standard Webhooks signature with the `standardwebhooks` package (against the secret
registered for its path), records it, and answers the statuses scripted for its path (then 200).
A path can be held: its requests wait, unanswered, until released."""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook, WebhookVerificationError


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    error: str | None
    answered: int | None  # the status it is answered with, once it is (None while held)

    @property
    def payload(self) -> dict:
        return json.loads(self.body)


@dataclass
class WebhookReceiver:
    secrets: dict[str, str] = field(default_factory=dict)  # path -> whsec_...
    script: dict[str, list[int]] = field(default_factory=dict)  # path -> statuses to answer, in order
    held: dict[str, threading.Event] = field(default_factory=dict)  # path -> answer once set
    received: list[Received] = field(default_factory=list)

    def __post_init__(self):
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                receiver._handle(self, body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _handle(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        path = handler.path
        headers = {k.lower(): v for k, v in handler.headers.items()}
        verified, error = False, None
        secret = self.secrets.get(path)
        try:
            if secret is None:
                raise WebhookVerificationError(f"no secret registered for {path}")
            Webhook(secret).verify(body, headers)
            verified = True
        except WebhookVerificationError as exc:
            error = str(exc)
        with self._cond:
            statuses = self.script.get(path) or []
            status = (statuses.pop(0) if statuses else 200) if verified else 401
            record = Received(path, headers, body, verified, error, None)
            self.received.append(record)
            self._cond.notify_all()
        hold = self.held.get(path)
        if hold is not None:
            hold.wait(30)
        record.answered = status  # before the answer goes out: the sender may act on it at once
        try:
            handler.send_response(status)
            handler.send_header("content-length", "2")
            handler.end_headers()
            handler.wfile.write(b"ok")
        except OSError:  # the sender went away while we were held
            pass
        with self._cond:
            self._cond.notify_all()

    def at(self, path: str) -> list[Received]:
        with self._cond:
            return [r for r in self.received if r.path == path]

    async def wait_for(self, path: str, count: int, *, answered: bool = True, timeout_s: float = 120.0
                       ) -> list[Received]:
        """Wait (without blocking the event loop) until `count` requests reached `path` (and were
        answered, with `answered`)."""
        def ready() -> bool:
            got = [r for r in self.received if r.path == path and (r.answered or not answered)]
            return len(got) >= count

        def wait() -> bool:
            with self._cond:
                return self._cond.wait_for(ready, timeout_s)

        if not await asyncio.to_thread(wait):
            raise AssertionError(f"{count} request(s) to {path} never arrived: {self.at(path)}")
        return self.at(path)

    def __enter__(self) -> "WebhookReceiver":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for event in self.held.values():
            event.set()
        self.server.shutdown()
        self.server.server_close()
