"""Prometheus metrics of the HTTP layer, registered beside the job metrics (`serve.jobs.metrics`)
so `/metrics` renders both: `http_requests_total{route,method,status}` and
`http_request_duration_seconds{route,method}`. `route` is the matched route's path template
(`/v1/videos/{video_id}`), never a raw id; a path no route matches is counted as `unmatched`.

Counters and histograms are rendered with a `replica` label (the replica's dispatcher id): scrapes
through the HTTP port reach whichever Ingress replica HAProxy picks, and without it the cumulative
series of two replicas would interleave under one label set and read as counter resets. Gauges
(the whole database's jobs and queue, the node's disk and GPUs, service health) carry none: any
replica reports the same value."""

from __future__ import annotations

import copy
import time
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNMATCHED_ROUTE = "unmatched"
# any other method a client sends is counted as "other" (a label value per made-up method would
# let clients grow the series without bound)
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class HttpMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry, *, replica: str | None = None):
        self.registry = registry
        self.replica = replica
        self.requests = Counter("http_requests", "HTTP requests by route template, method and status",
                                ["route", "method", "status"], registry=registry)
        self.latency = Histogram("http_request_duration_seconds", "HTTP request latency by route template",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=registry)

    def render(self) -> bytes:
        return generate_latest(_ReplicaLabelled(self.registry, self.replica) if self.replica else self.registry)


class _ReplicaLabelled:
    """The registry's families, with `replica="<id>"` on every sample of a cumulative family."""

    CUMULATIVE = frozenset({"counter", "histogram", "summary"})

    def __init__(self, registry: CollectorRegistry, replica: str):
        self.registry = registry
        self.replica = replica

    def collect(self) -> Iterable[Metric]:
        for family in self.registry.collect():
            if family.type in self.CUMULATIVE:
                family = copy.copy(family)
                family.samples = [s._replace(labels={**s.labels, "replica": self.replica}) for s in family.samples]
            yield family


class MetricsMiddleware:
    """Count requests by route template (never a raw id), method and status; observe latencies."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_wrapper(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or UNMATCHED_ROUTE
            method = scope.get("method", "")
            method = method if method in KNOWN_METHODS else "other"
            self.metrics.requests.labels(label, method, str(status)).inc()
            self.metrics.latency.labels(label, method).observe(time.perf_counter() - start)
