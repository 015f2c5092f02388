"""Prometheus metrics of the jobs, in their own registry (no global state): jobs by status, queue
depth, job / queue-wait / per-stage durations, seconds per denoising step, failures by error code,
voice-over failures by provider and the health of each service. The node gauges the alert rules
use (`disk_free_gb`, `gpu_memory_usage_percent`) are read at scrape time (`serve.jobs.node_metrics`),
and the HTTP layer adds its request metrics to the same registry (`serve.api.metrics`).

Labels never carry a job id, a user or a prompt: only bounded sets (statuses, error codes, stage,
service and model names from the config, TTS providers)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from serve.contracts import COMPLETED, FAILED, GenerationResult
from serve.jobs.node_metrics import DiskCollector, NvmlGpuCollector

JOB_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


class JobMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, data_dir: Path | None = None,
                 gpu: bool = True):
        r = self.registry = registry or CollectorRegistry()
        self.jobs_submitted = Counter("cinevivid_jobs_submitted", "Jobs accepted into the queue", registry=r)
        self.jobs_finished = Counter(
            "cinevivid_jobs_finished", "Jobs finished by this replica, by outcome; `reason` is the error "
            "code of a failed job (e.g. cancelled, out_of_memory, tts_quota_exceeded), empty otherwise",
            ["status", "reason"], registry=r)
        self.job_retries = Counter(
            "cinevivid_job_retries", "Jobs re-run from the start because a stage replica stopped while running "
            "them, by the stage whose replica stopped", ["stage"], registry=r)
        self.busy_waits = Counter(
            "cinevivid_job_busy_waits", "Waits of running jobs that a stage refused because its queue "
            "(max_queued_requests) was full, by that stage", ["stage"], registry=r)
        self.jobs_by_status = Gauge("cinevivid_jobs", "Job records by status (whole database)", ["status"],
                                    registry=r)
        self.queue_depth = Gauge("cinevivid_queue_depth", "Jobs waiting in the queue (whole database)", registry=r)
        self.running_jobs = Gauge("cinevivid_running_jobs", "Jobs this replica is running", registry=r)
        self.job_duration = Histogram("cinevivid_job_duration_seconds", "Time from claim to completion",
                                      buckets=JOB_BUCKETS, registry=r)
        self.queue_wait = Histogram("cinevivid_job_queue_wait_seconds", "Time from submit to claim",
                                    buckets=JOB_BUCKETS, registry=r)
        self.stage_duration = Histogram("cinevivid_stage_duration_seconds", "Per-stage durations of completed jobs",
                                        ["stage"], buckets=JOB_BUCKETS, registry=r)
        self.step_duration = Histogram(
            "cinevivid_denoising_step_seconds", "Seconds per denoising step (a job's transformer time over its "
            "steps, observed once per step)", ["model"], buckets=STEP_BUCKETS, registry=r)
        self.cold_start = Histogram(
            "cinevivid_model_cold_start_seconds", "Seconds a model's jobs waited for its first Transformer replica "
            "when it was at zero replicas (from the first such job seen queued to the replica running)", ["model"],
            buckets=JOB_BUCKETS, registry=r)
        self.models_waiting = Gauge(
            "cinevivid_model_starting", "1 while a model is at zero Transformer replicas with jobs waiting for one",
            ["model"], registry=r)
        self.tts_failures = Counter("cinevivid_tts_failures", "Voice-over failures by provider and error code",
                                    ["provider", "code"], registry=r)
        self.service_healthy = Gauge(
            "cinevivid_service_healthy", "1 if the service (database, storage, each stage) was healthy at the "
            "last health check, else 0", ["service"], registry=r)
        self.webhook_attempts = Counter(
            "cinevivid_webhook_attempts", "Webhook delivery attempts by this replica, by the delivery's status "
            "after it (delivered; pending: will retry; failed: out of attempts)", ["status"], registry=r)
        if data_dir is not None:
            r.register(DiskCollector(data_dir))
        if gpu:
            r.register(NvmlGpuCollector())

    def observe_result(self, result: GenerationResult, elapsed_s: float) -> None:
        """A completed job: its duration, each stage's, and its seconds per denoising step."""
        self.job_duration.observe(elapsed_s)
        self.jobs_finished.labels(COMPLETED, "").inc()
        for t in result.timings:
            self.stage_duration.labels(t.stage).observe(max(0.0, t.seconds))
        denoise = result.timing("transformer")
        steps = result.spec.num_inference_steps
        if denoise is not None and steps > 0:
            per_step = max(0.0, denoise.seconds) / steps
            step_hist = self.step_duration.labels(result.spec.model)
            for _ in range(steps):
                step_hist.observe(per_step)

    def observe_failure(self, code: str, *, tts_provider: str | None = None) -> None:
        self.jobs_finished.labels(FAILED, code).inc()
        if tts_provider is not None:
            self.tts_failures.labels(tts_provider, code).inc()

    def set_health(self, services: dict[str, dict]) -> None:
        """Health as /health reports it; a service that is "unavailable" (no GPU here) is left out,
        and services no longer reported are dropped rather than left at a stale value."""
        self.service_healthy.clear()
        for name, h in services.items():
            if h.get("status") in ("healthy", "unhealthy"):
                self.service_healthy.labels(name).set(1.0 if h["status"] == "healthy" else 0.0)
