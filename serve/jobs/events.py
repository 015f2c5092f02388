"""Live job events inside one ingress replica: the dispatcher publishes `ProgressEvent`s, SSE
streams subscribe. Each running job keeps a bounded history so a client that connects late still
sees every step."""

from __future__ import annotations

import asyncio
from collections import deque

from serve.contracts import ProgressEvent


class ProgressBroker:
    def __init__(self, history: int = 2000):
        self._history_len = history
        self._history: dict[str, deque] = {}
        self._subscribers: dict[str, set[asyncio.Queue]] = {}

    def start(self, job_id: str) -> None:
        self._history[job_id] = deque(maxlen=self._history_len or None)

    def publish(self, job_id: str, event: ProgressEvent) -> None:
        hist = self._history.get(job_id)
        if hist is not None:
            hist.append(event)
        for q in list(self._subscribers.get(job_id, ())):
            q.put_nowait(event)

    def finish(self, job_id: str) -> None:
        self._history.pop(job_id, None)

    def subscribe(self, job_id: str) -> tuple[asyncio.Queue, list[ProgressEvent]]:
        """A queue of future events plus the history of the current run (empty if not running here)."""
        q: asyncio.Queue = asyncio.Queue()
        self._subscribers.setdefault(job_id, set()).add(q)
        return q, list(self._history.get(job_id, ()))

    def unsubscribe(self, job_id: str, q: asyncio.Queue) -> None:
        subs = self._subscribers.get(job_id)
        if subs is not None:
            subs.discard(q)
            if not subs:
                self._subscribers.pop(job_id, None)
