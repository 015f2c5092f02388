"""GET /metrics after real jobs: the same HTTP app as the Ingress (in this process, its own SQLite
database) driving the deployed Generator of the tiny model. What Prometheus would scrape: requests
by route template (never a raw id) and status, the job, stage and denoising-step histograms, failures
by error code, the health of each service, free disk; no GPU family on a machine without NVML.
And a real Prometheus server (Debian `prometheus`) with configs/prometheus/ scraping the deployed app."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import missing_tool, GRAPH_APP
from promql import cinevivid_exportable, sample_names
from serve.ops.serve_env import free_port
from tests.http_fixtures import *  # noqa: F401,F403
from tests.http_fixtures import wait_local
from tests.http_fixtures import local_service, make_local_user, wait_for_status

PROM = Path(__file__).resolve().parents[1] / "configs" / "prometheus"

DONE = {"prompt": "a lighthouse", "size": "32x32", "num_frames": 5, "num_inference_steps": 3, "seed": 1}
LONG = {"prompt": "a long one", "size": "128x128", "num_frames": 33, "num_inference_steps": 100}  # cancelled




def _samples(text: str) -> list:
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def _value(samples, name: str, **labels) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def test_metrics_after_real_jobs(graph_app, tmp_path):
    async with local_service(tmp_path, generator_app=GRAPH_APP) as (service, c):
        h = await make_local_user(service)
        # a job that completes, and what a client does with it
        done = (await c.post("/v1/videos", json=DONE, headers=h)).json()["id"]
        assert (await wait_local(c, h, done, {"completed", "failed"}))["status"] == "completed"
        assert (await c.get(f"/v1/videos/{done}/content", headers=h)).status_code == 200
        assert (await c.get(f"/v1/videos/{done}/content?variant=thumbnail", headers=h)).status_code == 200
        assert (await c.get("/v1/videos?limit=5", headers=h)).status_code == 200
        # a job cancelled while it runs fails with the code "cancelled"
        long = (await c.post("/v1/videos", json=LONG, headers=h)).json()["id"]
        await wait_local(c, h, long, {"in_progress"})
        assert (await c.post(f"/v1/videos/{long}/cancel", headers=h)).status_code == 200
        failed = await wait_local(c, h, long, {"failed"})
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

    # cumulative series carry the replica's id (scrapes through the HTTP port reach any replica);
    # gauges, the same whichever replica answers, do not
    replica = service.dispatcher.replica
    for s in samples:
        cumulative = s.name.endswith(("_total", "_bucket", "_sum", "_count", "_created"))
        assert (s.labels.get("replica") == replica) if cumulative else ("replica" not in s.labels), s

    # every series in the scrape is one the rules and dashboard checks know (tests/test_prometheus.py)
    assert sample_names(text_string_to_metric_families(text)) <= cinevivid_exportable(tmp_path / "x")


async def test_a_queued_cancel_is_counted_too(graph_app, tmp_path):
    """A job cancelled before any replica claims it fails in the queue; it is a failure by code too."""
    async with local_service(tmp_path, generator_app=GRAPH_APP, dispatcher={"max_concurrent_jobs": 1}) as (service, c):
        h = await make_local_user(service)
        first = (await c.post("/v1/videos", json=LONG, headers=h)).json()["id"]
        queued = (await c.post("/v1/videos", json=DONE, headers=h)).json()["id"]
        await wait_local(c, h, first, {"in_progress"})
        assert (await c.get(f"/v1/videos/{queued}", headers=h)).json()["status"] == "queued"
        assert (await c.post(f"/v1/videos/{queued}/cancel", headers=h)).json()["status"] == "failed"
        samples = _samples((await c.get("/metrics")).text)
        assert _value(samples, "cinevivid_jobs_finished_total", status="failed", reason="cancelled") == 1
        assert _value(samples, "cinevivid_queue_depth") == 0
        await c.delete(f"/v1/videos/{first}", headers=h)


def _prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        msg = "the prometheus server is not installed: apt-get install prometheus"
        missing_tool(msg)
    return path


def test_a_real_prometheus_scrapes_it_with_the_shipped_config(http_env, alice, tmp_path):
    """configs/prometheus/prometheus.yml, pointed at this test's HTTP port (and scraping every
    second), loaded by a real Prometheus: the `cinevivid` target is up, its series are queryable
    with route templates as labels, and all the alerting rules load and evaluate."""
    binary = _prometheus_binary()
    vid = httpx.post(f"{http_env.url}/v1/videos", json={"prompt": "scraped", "num_inference_steps": 1},
                     headers=alice.headers).json()["id"]
    wait_for_status(http_env.url, alice.headers, vid, {"completed"})

    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    cfg["rule_files"] = [str(PROM / "alerting_rules.yml")]
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    assert set(jobs) == {"cinevivid", "ray"}
    jobs["cinevivid"]["static_configs"] = [{"targets": [http_env.url.split("://", 1)[1]]}]
    jobs["ray"]["file_sd_configs"] = [{"files": [str(tmp_path / "no-ray-here.json")]}]  # hermetic
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--web.listen-address=127.0.0.1:{port}", f"--storage.tsdb.path={tmp_path / 'data'}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        def query(q: str) -> list:
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"{api}/query", params={"query": q}, timeout=10)
                if r.status_code == 200:
                    return r.json()["data"]["result"]
            return []

        def eventually(fn, what: str, timeout_s: float = 90.0):
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
                out = fn()
                if out:
                    return out
                time.sleep(0.5)
            raise AssertionError(f"{what}; prometheus log:\n{(tmp_path / 'prometheus.log').read_text()[-3000:]}")

        up = eventually(lambda: [r for r in query('up{job="cinevivid"}') if r["value"][1] == "1"],
                        "the cinevivid target never came up")
        assert len(up) == 1
        series = eventually(lambda: query('http_requests_total{job="cinevivid", route="/v1/videos/{video_id}"}'),
                            "no http_requests_total series for /v1/videos/{video_id}")
        assert all(vid not in str(r["metric"]) for r in query('{job="cinevivid"}'))
        assert "GET" in {r["metric"]["method"] for r in series}  # (other tests share the app: DELETEs too)
        assert eventually(lambda: query('disk_free_gb{job="cinevivid"}'), "no disk_free_gb")
        assert query('gpu_memory_usage_percent') == []  # no GPU on this machine
        assert eventually(lambda: query('cinevivid_job_duration_seconds_count{job="cinevivid"} > 0'),
                          "no completed job in cinevivid_job_duration_seconds")

        def alert_rules() -> list[dict]:
            groups = httpx.get(f"{api}/rules", params={"type": "alert"}, timeout=10).json()["data"]["groups"]
            return [rule for g in groups for rule in g["rules"]]

        def evaluated_since(before: dict[str, str]) -> list[dict]:
            """The alerting rules, once each has evaluated (healthy) again since `before`."""
            rules = alert_rules()
            fresh = rules and all(r["health"] == "ok" and r.get("lastEvaluation") != before.get(r["name"])
                                  for r in rules)
            return rules if fresh else []

        def not_inactive(rules: list[dict]) -> list[tuple[str, str]]:
            """(name, state) of every alert that is pending or firing."""
            return sorted((r["name"], r["state"]) for r in rules if r["state"] != "inactive")

        # every rule evaluated once more after the series above were queryable, so on them
        first = eventually(lambda: evaluated_since({}), "the alerting rules never all evaluated")
        rules = eventually(lambda: evaluated_since({r["name"]: r["lastEvaluation"] for r in first}),
                           "the alerting rules were not evaluated again")
        names = {rule["name"] for rule in rules}
        assert {"HighErrorRate", "GPUMemoryHigh", "DiskSpaceLow", "JobQueueGrowing", "JobFailureRatioHigh",
                "StageUnhealthy", "JobLatencyP95High", "CineVividDown"} <= names
        # a healthy test stack: every alert is inactive, not even pending (each has a `for:` of 2 minutes
        # or more, so a condition that holds now shows as pending, never yet as firing); only a nearly
        # full disk on the machine running the tests would be a true DiskSpaceLow
        healthy = [("DiskSpaceLow", "pending")] if shutil.disk_usage(http_env.data_dir).free < 5e9 else []
        assert not_inactive(rules) == healthy, [r for r in rules if r["state"] != "inactive"]
        listed = httpx.get(f"{api}/alerts", timeout=10).json()["data"]["alerts"]
        assert sorted((a["labels"]["alertname"], a["state"]) for a in listed) == healthy, listed

        # ... and the check can fail: the same rules with one whose condition always holds (reloaded
        # with SIGHUP) show that alert pending, while "none is firing" would still have passed
        broken = yaml.safe_load((PROM / "alerting_rules.yml").read_text())
        (rule,) = [r for g in broken["groups"] for r in g["rules"] if r["alert"] == "GPUMemoryHigh"]
        rule["expr"] = "vector(1) > 0"
        (tmp_path / "broken_rules.yml").write_text(yaml.safe_dump(broken))
        cfg["rule_files"] = [str(tmp_path / "broken_rules.yml")]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        before = {r["name"]: r["lastEvaluation"] for r in rules}
        proc.send_signal(signal.SIGHUP)

        def broken_evaluated() -> list[dict]:
            rules = evaluated_since(before)
            return rules if any(r["name"] == "GPUMemoryHigh" and r["query"] == "vector(1) > 0" for r in rules) else []

        rules = eventually(broken_evaluated, "the broken rules were never loaded and evaluated")
        assert not_inactive(rules) == sorted(healthy + [("GPUMemoryHigh", "pending")]), rules
        assert [r["name"] for r in rules if r["state"] == "firing"] == []
        listed = httpx.get(f"{api}/alerts", timeout=10).json()["data"]["alerts"]
        assert ("GPUMemoryHigh", "pending") in {(a["labels"]["alertname"], a["state"]) for a in listed}, listed
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
