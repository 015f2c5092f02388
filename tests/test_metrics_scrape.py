"""GET /metrics after real jobs: the same HTTP app as the Ingress (in this process, its own SQLite
database) driving the deployed Generator of the tiny model. What Prometheus would scrape: requests
by route template (never a raw id) and status, the job, stage and denoising-step histograms, failures
by error code, the health of each service, free disk; no GPU family on a machine without NVML."""

from __future__ import annotations

import asyncio
import shutil
import time

from prometheus_client.parser import text_string_to_metric_families

from conftest import GRAPH_APP
from promql import cinevivid_exportable, sample_names
from tests.http_fixtures import local_service, make_local_user

DONE = {"prompt": "a lighthouse", "size": "32x32", "num_frames": 5, "num_inference_steps": 3, "seed": 1}
LONG = {"prompt": "a long one", "size": "256x256", "num_frames": 65, "num_inference_steps": 100}  # cancelled


async def _wait(c, h, vid: str, statuses: set[str], timeout_s: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = (await c.get(f"/v1/videos/{vid}", headers=h)).json()
        if v["status"] in statuses:
            return v
        await asyncio.sleep(0.05)
    raise AssertionError(f"{vid} never reached {statuses}: {v}")


def _samples(text: str) -> list:
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def _value(samples, name: str, **labels) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def test_metrics_after_real_jobs(graph_app, tmp_path):
    async with local_service(tmp_path, generator_app=GRAPH_APP) as (service, c):
        h = await make_local_user(service)
        # a job that completes, and what a client does with it
        done = (await c.post("/v1/videos", json=DONE, headers=h)).json()["id"]
        assert (await _wait(c, h, done, {"completed", "failed"}))["status"] == "completed"
        assert (await c.get(f"/v1/videos/{done}/content", headers=h)).status_code == 200
        assert (await c.get(f"/v1/videos/{done}/content?variant=thumbnail", headers=h)).status_code == 200
        assert (await c.get("/v1/videos?limit=5", headers=h)).status_code == 200
        # a job cancelled while it runs fails with the code "cancelled"
        long = (await c.post("/v1/videos", json=LONG, headers=h)).json()["id"]
        await _wait(c, h, long, {"in_progress"})
        assert (await c.post(f"/v1/videos/{long}/cancel", headers=h)).status_code == 200
        failed = await _wait(c, h, long, {"failed"})
        assert failed["error"]["code"] == "cancelled"
        # client errors: an unknown video (route matched), a path no route matches, no credentials
        assert (await c.get("/v1/videos/video_does_not_exist", headers=h)).status_code == 404
        assert (await c.get(f"/no/such/{done}")).status_code == 404
        assert (await c.get(f"/v1/videos/{done}")).status_code == 401
        assert (await c.get("/health")).status_code == 200

        r = await c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
    samples = _samples(text)

    # no raw id anywhere in the output: not in a label, not in a route
    for vid in (done, long, "video_does_not_exist"):
        assert vid not in text
    requests = [s for s in samples if s.name == "http_requests_total"]
    routes = {s.labels["route"] for s in requests}
    assert {"/v1/videos", "/v1/videos/{video_id}", "/v1/videos/{video_id}/content",
            "/v1/videos/{video_id}/cancel", "/health", "unmatched"} <= routes, routes
    assert all(r == "unmatched" or r.startswith("/") for r in routes)
    assert {s.labels["method"] for s in requests} <= {"GET", "POST"}
    assert _value(samples, "http_requests_total", route="/v1/videos", method="POST", status="200") == 2
    assert _value(samples, "http_requests_total", route="/v1/videos/{video_id}/content", status="200") == 2
    assert _value(samples, "http_requests_total", route="/v1/videos/{video_id}", status="404") == 1
    assert _value(samples, "http_requests_total", route="/v1/videos/{video_id}", status="401") == 1
    assert _value(samples, "http_requests_total", route="unmatched", status="404") == 1
    # normal traffic: 2xx and 4xx, no 5xx
    statuses = {s.labels["status"] for s in requests if s.value > 0}
    assert {"200", "401", "404"} <= statuses and not any(st.startswith("5") for st in statuses), statuses
    assert _value(samples, "http_request_duration_seconds_count", route="/v1/videos", method="POST") == 2

    # the completed job: its duration, each stage's, and one observation per denoising step
    assert _value(samples, "cinevivid_job_duration_seconds_count") == 1
    assert 0 < _value(samples, "cinevivid_job_duration_seconds_sum") < 180
    for stage in ("text_encoder", "transformer", "vae", "mux"):
        assert _value(samples, "cinevivid_stage_duration_seconds_count", stage=stage) == 1, stage
    model = service.model_cfg.name
    steps = _value(samples, "cinevivid_denoising_step_seconds_count", model=model)
    assert steps == DONE["num_inference_steps"]
    per_step = _value(samples, "cinevivid_denoising_step_seconds_sum", model=model) / steps
    transformer_s = _value(samples, "cinevivid_stage_duration_seconds_sum", stage="transformer")
    assert abs(per_step * steps - transformer_s) < 1e-6  # the transformer's time, spread over its steps
    # outcomes: one completed, one failed by code "cancelled"
    assert _value(samples, "cinevivid_jobs_finished_total", status="completed") == 1
    assert _value(samples, "cinevivid_jobs_finished_total", status="failed", reason="cancelled") == 1
    assert _value(samples, "cinevivid_jobs_finished_total", status="failed") == 1
    assert _value(samples, "cinevivid_jobs", status="completed") == 1
    assert _value(samples, "cinevivid_jobs", status="failed") == 1
    assert ("cinevivid_queue_depth", 0.0) in {(s.name, s.value) for s in samples}
    assert _value(samples, "cinevivid_jobs_submitted_total") == 2
    # the health of each service, as /health reported it
    health = {s.labels["service"]: s.value for s in samples if s.name == "cinevivid_service_healthy"}
    assert {"database", "storage", "text_encoder", "transformer", "vae", "generator"} <= set(health)
    assert set(health.values()) == {1.0}, health
    assert "gpu" not in health  # "unavailable" on a CPU machine: neither healthy nor unhealthy

    # the node gauges: free disk of the data dir (GB), and no GPU family at all on this CPU machine
    disk = [s for s in samples if s.name == "disk_free_gb"]
    assert len(disk) == 1 and disk[0].value > 0
    assert abs(disk[0].value - shutil.disk_usage(tmp_path).free / 1e9) < 1.0
    assert "gpu_memory_usage_percent" not in text
    assert "cinevivid_http_requests_total" not in text

    # every series in the scrape is one the rules and dashboard checks know (tests/test_prometheus.py)
    assert sample_names(text_string_to_metric_families(text)) <= cinevivid_exportable(tmp_path / "x")


async def test_a_queued_cancel_is_counted_too(graph_app, tmp_path):
    """A job cancelled before any replica claims it fails in the queue; it is a failure by code too."""
    async with local_service(tmp_path, generator_app=GRAPH_APP, dispatcher={"max_concurrent_jobs": 1}) as (service, c):
        h = await make_local_user(service)
        first = (await c.post("/v1/videos", json=LONG, headers=h)).json()["id"]
        queued = (await c.post("/v1/videos", json=DONE, headers=h)).json()["id"]
        await _wait(c, h, first, {"in_progress"})
        assert (await c.get(f"/v1/videos/{queued}", headers=h)).json()["status"] == "queued"
        assert (await c.post(f"/v1/videos/{queued}/cancel", headers=h)).json()["status"] == "failed"
        samples = _samples((await c.get("/metrics")).text)
        assert _value(samples, "cinevivid_jobs_finished_total", status="failed", reason="cancelled") == 1
        assert _value(samples, "cinevivid_queue_depth") == 0
        await c.delete(f"/v1/videos/{first}", headers=h)
