"""Job lifecycle over HTTP: SSE progress, cancel/delete freeing the slot, crash recovery,
health and metrics."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from client.http import aiter_events, iter_events
from serve.jobs.db import Database
from serve.jobs.store import JobStore
from tests.http_fixtures import *  # noqa: F401,F403
from tests.http_fixtures import wait_local
from tests.http_fixtures import local_service, make_local_user, wait_for_status
from serve.stages import GENERATOR

HEAVY = {"prompt": "a long one", "size": "256x256", "num_frames": 65, "num_inference_steps": 100}
MEDIUM = {"prompt": "medium", "size": "128x128", "num_frames": 17, "num_inference_steps": 12}




@pytest.mark.fast
def test_sse_progress_goes_up_one_event_per_step_and_ends_completed(http_env, alice):
    r = httpx.post(f"{http_env.url}/v1/videos", json={"prompt": "sse", "num_inference_steps": 6}, headers=alice.headers)
    vid = r.json()["id"]
    with httpx.Client(base_url=http_env.url, headers=alice.headers, timeout=120) as http:
        events = list(iter_events(http, vid))  # (httpx-sse checks the text/event-stream content type)
    progress = [e["progress"] for _, e in events]
    assert progress == sorted(progress), progress
    steps = [e["step"] for k, e in events if k == "step"]
    assert steps == [1, 2, 3, 4, 5, 6], events
    assert {e["stage"] for k, e in events if k == "stage"} >= {"text_encoder", "transformer", "vae"}
    assert events[-1][0] == "status" and events[-1][1]["status"] == "completed" and progress[-1] == 100, events[-1]
    # a finished job's stream is one final status event
    with httpx.Client(base_url=http_env.url, headers=alice.headers, timeout=30) as http:
        again = list(iter_events(http, vid))
    assert again == [("status", {**again[0][1], "status": "completed", "progress": 100})]


def test_task_routes(http_env, alice):
    r = httpx.post(f"{http_env.url}/generate/text-to-video", json={"prompt": "task", "num_frames": 5},
                   headers=alice.headers)
    assert r.status_code == 202, r.text
    task = r.json()
    assert task["status"] == "queued" and task["task_id"].startswith("video_")
    wait_for_status(http_env.url, alice.headers, task["task_id"], {"completed"})
    t = httpx.get(f"{http_env.url}/tasks/{task['task_id']}", headers=alice.headers).json()
    assert t["status"] == "completed" and t["progress"] == 100
    mp4 = httpx.get(f"{http_env.url}{t['video_url']}", headers=alice.headers)
    assert mp4.status_code == 200 and mp4.content[4:8] == b"ftyp"
    info = httpx.get(f"{http_env.url}/").json()
    assert info["name"] == "CineVivid" and "POST /v1/videos" in info["endpoints"]


@pytest.mark.fast
@pytest.mark.parametrize("action", ["cancel", "delete"])
async def test_cancel_and_delete_free_the_slot(http_env, tmp_path, action):
    async with local_service(tmp_path, dispatcher={"max_concurrent_jobs": 1}) as (service, c):
        h = await make_local_user(service)
        a = (await c.post("/v1/videos", json=HEAVY, headers=h)).json()["id"]
        b = (await c.post("/v1/videos", json={"prompt": "next", "num_inference_steps": 2}, headers=h)).json()["id"]
        await wait_local(c, h, a, {"in_progress"})
        assert (await c.get(f"/v1/videos/{b}", headers=h)).json()["status"] == "queued"
        if action == "cancel":
            r = await c.post(f"/v1/videos/{a}/cancel", headers=h)
            assert r.status_code == 200, r.text
            v = r.json()
            assert v["status"] == "failed" and v["error"]["code"] == "cancelled" and v["progress"] < 100
        else:
            r = await c.delete(f"/v1/videos/{a}", headers=h)
            assert r.status_code == 200 and r.json()["deleted"] is True
            assert (await c.get(f"/v1/videos/{a}", headers=h)).status_code == 404
        done = await wait_local(c, h, b, {"completed", "failed"})
        assert done["status"] == "completed"
        assert not list((tmp_path / "videos").glob(f"{a}*"))  # no artifact for the stopped job


async def test_restart_on_same_database_finishes_the_job(http_env, tmp_path):
    overrides = {"dispatcher": {"max_concurrent_jobs": 1, "max_attempts": 3}}
    async with local_service(tmp_path, **overrides) as (service, c):
        h = await make_local_user(service)
        done = (await c.post("/v1/videos", json={"prompt": "kept", "num_inference_steps": 1}, headers=h)).json()["id"]
        await wait_local(c, h, done, {"completed"})
        vid = (await c.post("/v1/videos", json=MEDIUM, headers=h)).json()["id"]
        await wait_local(c, h, vid, {"in_progress"})
    # the app is gone mid-job: the job went back to the queue, nothing is in progress
    store = JobStore(Database(service.db.url))
    row = await store.get(vid)  # a clean shutdown spends no attempt
    assert row["status"] == "queued" and row["attempts"] == 0 and row["lease_owner"] is None
    async with local_service(tmp_path, **overrides) as (service2, c2):
        v = await wait_local(c2, h, vid, {"completed", "failed"})
        assert v["status"] == "completed"
        assert (await store.get(vid))["attempts"] == 1
        kept = (await c2.get(f"/v1/videos/{done}", headers=h)).json()
        assert kept["status"] == "completed"
        assert (await c2.get(f"/v1/videos/{done}/content", headers=h)).content[4:8] == b"ftyp"
    await store.db.dispose()


async def test_a_clean_shutdown_spends_no_attempt(http_env, tmp_path):
    """With one attempt allowed, a job interrupted by clean shutdowns (`cinevivid down`, a rolling
    update) is still re-queued each time and then runs to completion. (A crash does spend one: the
    expired-lease path, tests/test_job_store.py.)"""
    overrides = {"dispatcher": {"max_concurrent_jobs": 1, "max_attempts": 1}}
    async with local_service(tmp_path, **overrides) as (service, c):
        h = await make_local_user(service)
        vid = (await c.post("/v1/videos", json=MEDIUM, headers=h)).json()["id"]
        await wait_local(c, h, vid, {"in_progress"})
    store = JobStore(Database(service.db.url))
    row = await store.get(vid)
    assert row["status"] == "queued" and row["attempts"] == 0, row
    async with local_service(tmp_path, **overrides) as (service, c):  # interrupted again
        await wait_local(c, h, vid, {"in_progress"})
    row = await store.get(vid)
    assert row["status"] == "queued" and row["attempts"] == 0, row
    async with local_service(tmp_path, **overrides) as (service2, c2):
        v = await wait_local(c2, h, vid, {"completed", "failed"})
        assert v["status"] == "completed", v
    await store.db.dispose()


# A hard crash of the Ingress replica mid-job (the job re-run to the same video): tests/test_chaos.py.


async def test_health_degraded_when_database_unreachable(http_env, tmp_path):
    async with local_service(tmp_path, database_url="postgresql+asyncpg://cv:cv@127.0.0.1:9/cv",
                             health_timeout_s=3) as (service, c):
        r = await c.get("/health")
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "degraded", body
        assert body["services"]["database"]["status"] == "unhealthy"
        assert body["services"]["transformer"]["status"] == "healthy"


async def test_health_degraded_when_a_deployment_is_unhealthy(http_env, tmp_path):
    """A real unhealthy stage: an app whose Transformer cannot be scheduled (it asks for more CPUs
    than the cluster has) never becomes healthy; the ingress driving its Generator says degraded."""
    from ray import serve
    from ray.serve import RunTarget

    from serve.app import build_app
    from conftest import tiny_app_args

    name = "sick"
    args = tiny_app_args(name=name, deployments={"transformer": {"ray_actor_options": {"num_cpus": 10_000}}})
    serve.run_many([RunTarget(target=build_app(args), name=name, route_prefix=None)],
                   wait_for_applications_running=False)
    try:
        deadline = time.monotonic() + 120
        body = None
        async with local_service(tmp_path, generator_app=name, health_timeout_s=5) as (service, c):
            while time.monotonic() < deadline:
                body = (await c.get("/health")).json()
                if body["services"].get("text_encoder", {}).get("status") == "healthy":
                    break  # the rest of the app is up; the Transformer never will be
                await asyncio.sleep(0.5)
            assert body["status"] == "degraded", body
            assert body["services"]["transformer"]["status"] == "unhealthy", body
            assert body["services"]["text_encoder"]["status"] == "healthy", body
            assert body["services"]["database"]["status"] == "healthy"
            # and when the Generator itself cannot be reached at all
            from ray.serve.handle import DeploymentHandle

            from serve.jobs.generation_backend import GeneratorHandleBackend

            service.generator = GeneratorHandleBackend(DeploymentHandle(GENERATOR.deployment, "no-such-app"))
            body = (await c.get("/health")).json()
            assert body["status"] == "degraded" and body["services"]["generator"]["status"] == "unhealthy"
    finally:
        serve.delete(name, _blocking=False)


def test_health_of_the_deployed_app(http_env):
    body = httpx.get(f"{http_env.url}/health").json()
    assert body["status"] == "healthy", body
    assert {"database", "storage", "text_encoder", "transformer", "vae", "gpu"} <= set(body["services"])


@pytest.mark.fast
def test_the_http_port_is_served_by_haproxy(http_env):
    """Requests reach the Ingress replica through HAProxy, not Serve's Python proxy (serve_env)."""
    import psutil

    port = int(http_env.url.rsplit(":", 1)[1])
    listeners = {psutil.Process(c.pid).name() for c in psutil.net_connections("tcp")
                 if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid}
    assert any("haproxy" in name for name in listeners), listeners


def _metrics(url) -> dict:
    text = httpx.get(f"{url}/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "replica")))] = s.value
    return out


def test_metrics_move_with_traffic(http_env, alice):
    def val(m, name, **labels):
        return m.get((name, tuple(sorted(labels.items()))), 0.0)

    before = _metrics(http_env.url)
    vid = httpx.post(f"{http_env.url}/v1/videos", json={"prompt": "metrics", "num_inference_steps": 1},
                     headers=alice.headers).json()["id"]
    wait_for_status(http_env.url, alice.headers, vid, {"completed"})
    httpx.get(f"{http_env.url}/no-such-thing")
    after = _metrics(http_env.url)
    assert val(after, "http_requests_total", route="/v1/videos", method="POST", status="200") == \
        val(before, "http_requests_total", route="/v1/videos", method="POST", status="200") + 1
    assert val(after, "http_requests_total", route="unmatched", method="GET", status="404") >= \
        val(before, "http_requests_total", route="unmatched", method="GET", status="404") + 1
    assert val(after, "cinevivid_jobs_submitted_total") >= val(before, "cinevivid_jobs_submitted_total") + 1
    assert val(after, "cinevivid_jobs_finished_total", status="completed", reason="") >= \
        val(before, "cinevivid_jobs_finished_total", status="completed", reason="") + 1
    assert val(after, "cinevivid_jobs", status="completed") >= val(before, "cinevivid_jobs", status="completed") + 1
    assert ("cinevivid_queue_depth", ()) in after and ("disk_free_gb", ()) in after
    assert any(k[0] == "cinevivid_stage_duration_seconds_count" for k in after)
    assert any(k[0] == "http_request_duration_seconds_bucket" for k in after)


def test_openapi_and_offline_docs(http_env):
    spec = httpx.get(f"{http_env.url}/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    assert "post" in spec["paths"]["/v1/videos"] and "VideoCreateRequest" in spec["components"]["schemas"]
    assert "multipart/form-data" in spec["paths"]["/v1/videos"]["post"]["requestBody"]["content"]
    docs = httpx.get(f"{http_env.url}/docs")
    assert docs.status_code == 200 and "openapi.json" in docs.text
    assert "http://" not in docs.text and "https://" not in docs.text  # no external assets


async def test_sse_from_another_replica_follows_the_job_record(http_env, tmp_path):
    """Two ingress replicas on one database: the events stream of the replica that is not
    running the job follows its record until it completes."""
    async with local_service(tmp_path, dispatcher={"max_concurrent_jobs": 1}) as (runner, c1):
        h = await make_local_user(runner)
        vid = (await c1.post("/v1/videos", json=MEDIUM, headers=h)).json()["id"]
        await wait_local(c1, h, vid, {"in_progress"})
        async with local_service(tmp_path) as (other, c2):
            c2.headers.update(h)
            events = [ev async for ev in aiter_events(c2, vid)]
            assert vid not in other.dispatcher.running_ids
    progress = [e["progress"] for _, e in events]
    assert progress == sorted(progress)
    assert events[0][0] == "status" and events[0][1]["status"] == "in_progress"
    assert events[-1] == ("status", {**events[-1][1], "status": "completed"}) and progress[-1] == 100, events[-1]
    assert {k for k, _ in events} <= {"status", "progress"}


async def test_two_ingress_replicas_share_one_postgresql_queue(http_env, tmp_path, postgres_server):
    """The multi-replica setup DESIGN.md names: two HTTP services with running dispatchers on one
    PostgreSQL database. Every job is claimed once, runs to completion, and either replica serves it."""
    from pg_server import new_database

    url = await new_database(postgres_server)
    overrides = {"database_url": url, "dispatcher": {"max_concurrent_jobs": 1}}
    async with local_service(tmp_path / "a", **overrides) as (one, c1):
        async with local_service(tmp_path / "a", **overrides) as (two, c2):
            h = await make_local_user(one)
            ids = [(await (c1 if i % 2 else c2).post("/v1/videos", json={"prompt": f"pg {i}", "num_inference_steps": 2},
                                                     headers=h)).json()["id"] for i in range(4)]
            done = [await wait_local(c1 if i % 2 else c2, h, vid, {"completed", "failed"}) for i, vid in enumerate(ids)]
            assert [v["status"] for v in done] == ["completed"] * 4
            store = JobStore(Database(url))
            assert [(await store.get(vid))["attempts"] for vid in ids] == [1, 1, 1, 1]
            await store.db.dispose()
            for vid in ids:  # the artifacts are on the shared data dir; both replicas serve them
                assert (await c2.get(f"/v1/videos/{vid}/content", headers=h)).content[4:8] == b"ftyp"
                assert (await c1.get(f"/v1/videos/{vid}", headers=h)).json()["status"] == "completed"
