"""Prometheus metrics of the job service, in their own registry (no global state): HTTP requests
by route and status with latencies, jobs by status, queue depth, job and per-stage durations,
GPU memory and free disk."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_JOB_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)


class ServiceMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter("cinevivid_http_requests", "HTTP requests by route, method and status",
                                     ["route", "method", "status"], registry=r)
        self.http_latency = Histogram("cinevivid_http_request_duration_seconds", "HTTP request latency",
                                      ["route", "method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.jobs_submitted = Counter("cinevivid_jobs_submitted", "Jobs accepted into the queue", registry=r)
        self.jobs_finished = Counter("cinevivid_jobs_finished", "Jobs finished by this replica, by outcome",
                                     ["status", "reason"], registry=r)
        self.jobs_by_status = Gauge("cinevivid_jobs", "Job records by status (whole database)", ["status"],
                                    registry=r)
        self.queue_depth = Gauge("cinevivid_queue_depth", "Jobs waiting in the queue", registry=r)
        self.running_jobs = Gauge("cinevivid_running_jobs", "Jobs this replica is running", registry=r)
        self.job_duration = Histogram("cinevivid_job_duration_seconds", "Time from claim to completion",
                                      buckets=_JOB_BUCKETS, registry=r)
        self.queue_wait = Histogram("cinevivid_job_queue_wait_seconds", "Time from submit to claim",
                                    buckets=_JOB_BUCKETS, registry=r)
        self.stage_duration = Histogram("cinevivid_stage_duration_seconds", "Per-stage durations of jobs",
                                        ["stage"], buckets=_JOB_BUCKETS, registry=r)
        self.gpu_memory = Gauge("cinevivid_gpu_memory_used_bytes", "GPU memory in use", ["device"], registry=r)
        self.disk_free = Gauge("cinevivid_disk_free_bytes", "Free bytes on the artifact volume", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
