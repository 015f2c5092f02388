"""Prometheus metrics of the jobs (jobs by status, queue depth, job and per-stage durations, GPU
memory and free disk), in their own registry (no global state). The HTTP layer adds its request
metrics to the same registry (`serve.api.metrics`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

JOB_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)


class JobMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.jobs_submitted = Counter("cinevivid_jobs_submitted", "Jobs accepted into the queue", registry=r)
        self.jobs_finished = Counter("cinevivid_jobs_finished", "Jobs finished by this replica, by outcome",
                                     ["status", "reason"], registry=r)
        self.jobs_by_status = Gauge("cinevivid_jobs", "Job records by status (whole database)", ["status"],
                                    registry=r)
        self.queue_depth = Gauge("cinevivid_queue_depth", "Jobs waiting in the queue", registry=r)
        self.running_jobs = Gauge("cinevivid_running_jobs", "Jobs this replica is running", registry=r)
        self.job_duration = Histogram("cinevivid_job_duration_seconds", "Time from claim to completion",
                                      buckets=JOB_BUCKETS, registry=r)
        self.queue_wait = Histogram("cinevivid_job_queue_wait_seconds", "Time from submit to claim",
                                    buckets=JOB_BUCKETS, registry=r)
        self.stage_duration = Histogram("cinevivid_stage_duration_seconds", "Per-stage durations of jobs",
                                        ["stage"], buckets=JOB_BUCKETS, registry=r)
        self.gpu_memory = Gauge("cinevivid_gpu_memory_used_bytes", "GPU memory in use", ["device"], registry=r)
        self.disk_free = Gauge("cinevivid_disk_free_bytes", "Free bytes on the artifact volume", registry=r)
        self.webhook_attempts = Counter(
            "cinevivid_webhook_attempts", "Webhook delivery attempts by this replica, by the delivery's status "
            "after it (delivered; pending: will retry; failed: out of attempts)", ["status"], registry=r)
