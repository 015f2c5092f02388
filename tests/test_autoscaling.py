"""Scaling on the backlog (issue 21): the policy's arithmetic and the plan's facts, and, on the
session cluster, an app whose Transformer scales 0..2 seen going 0 -> 2 -> 0 under a burst of jobs,
with the frames of each job equal to the same job on the session app's single fixed replica."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from client.http import iter_events
from serve.app import deployment_plan, parse_args, scaling_facts
from serve.contracts import STARTING_MODEL, WAITING_FOR_CAPACITY
from serve.runtime.autoscale import POLICY_FUNCTION, desired_replicas, job_load, token_steps
from tests.http_fixtures import *  # noqa: F401,F403
from tests.http_fixtures import HttpEnv, http_ingress_args, wait_for_status, wait_healthy
from tests.media_probe import decode_rgb_frames
from conftest import tiny_app_args
from serve.stages import TRANSFORMER

SCALE_APP = "scale"
SMALL = {"ray_actor_options": {"num_cpus": 0.1}}


@pytest.mark.fast
def test_load_is_token_steps_over_the_default_job():
    default = (9, 64, 64, 4)
    assert job_load(9, 64, 64, 4, default=default) == 1.0
    assert job_load(9, 64, 64, 8, default=default) == 2.0  # twice the steps
    assert job_load(17, 64, 64, 4, default=default) == token_steps(17, 64, 64, 4) / token_steps(*default) == 5 / 3
    assert job_load(9, 128, 128, 4, default=default) == 4.0


@pytest.mark.fast
@pytest.mark.parametrize("demand,target,want", [(0, 1, 0), (0.2, 1, 1), (1, 1, 1), (1.01, 1, 2), (7, 2, 4),
                                                (100, 1, 100)])
def test_replicas_for_a_demand(demand, target, want):
    assert desired_replicas(demand, target) == want


@pytest.mark.fast
def test_plan_gives_autoscaling_transformers_the_backlog_policy_and_the_dispatch_limit():
    args = parse_args(tiny_app_args(with_ingress=True, deployments={
        "transformer": {"autoscaling_config": {"min_replicas": 0, "max_replicas": 3}, "max_ongoing_requests": 2},
        "generator": {"num_replicas": 1, "max_ongoing_requests": 4}, "ingress": {"num_replicas": 2}}))
    plan = deployment_plan(args)
    assert plan[TRANSFORMER.deployment]["autoscaling_config"]["policy"] == {"policy_function": POLICY_FUNCTION}
    facts = scaling_facts(args, plan)
    assert facts["models"][args.models[0].name] == {"deployment": TRANSFORMER.deployment, "min_replicas": 0,
                                                    "max_replicas": 3, "backlog_policy": True}
    # the Transformer holds 3 x 2 = 6, the Generator 1 x 4 = 4: 4 jobs over 2 ingress replicas
    assert facts["dispatch_limit"] == 2
    # a fixed replica count: no policy to give, and nothing is held back at zero
    args = parse_args(tiny_app_args(with_ingress=True, deployments={"transformer": {"num_replicas": 2}}))
    facts = scaling_facts(args, deployment_plan(args))
    assert facts["models"][args.models[0].name]["backlog_policy"] is False


def _transformer_replicas(app: str = SCALE_APP) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or TRANSFORMER.deployment not in status.deployments:
        return -1
    return int(status.deployments[TRANSFORMER.deployment].replica_states.get("RUNNING", 0))


def _wait_replicas(want: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while (n := _transformer_replicas()) != want:
        assert time.monotonic() < deadline, f"the Transformer has {n} running replicas, not {want}"
        time.sleep(0.25)


def _submit_all(url: str, headers: dict, jobs: list[dict]) -> list[str]:
    ids = []
    for job in jobs:
        r = httpx.post(f"{url}/v1/videos", json=job, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    return ids


def _frames(url: str, headers: dict, vid: str) -> np.ndarray:
    r = httpx.get(f"{url}/v1/videos/{vid}/content", headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return decode_rgb_frames(r.content)


@pytest.fixture
def scale_app(http_env, tmp_path):
    """App "scale" at /scale: the tiny model, its Transformer autoscaling 0..2 on the backlog
    (1 standard job per replica, short delays), the dispatch limit from the plan."""
    from ray import serve

    from serve.app import build_app

    data_dir = tmp_path / "scale-data"
    transformer = {**SMALL, "max_ongoing_requests": 1,
                   "autoscaling_config": {"min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 1,
                                          "upscale_delay_s": 0.5, "downscale_delay_s": 3,
                                          "downscale_to_zero_delay_s": 3}}
    ingress = http_ingress_args(data_dir, dispatcher={"max_concurrent_jobs": None})
    args = tiny_app_args(name=SCALE_APP, with_ingress=True, ingress=ingress,
                         deployments={"ingress": SMALL, "transformer": transformer})
    serve.run(build_app(args), name=SCALE_APP, route_prefix=f"/{SCALE_APP}")
    url = f"{http_env.url}/{SCALE_APP}"
    try:
        wait_healthy(url)
        yield HttpEnv(url, data_dir, f"sqlite+aiosqlite:///{data_dir / 'cinevivid.db'}")
    finally:
        serve.delete(SCALE_APP)


@pytest.mark.fast  # issue 21: `make test` shows the scaling
def test_a_burst_takes_the_transformer_from_zero_to_two_and_idle_back_to_zero(scale_app, http_env, alice):
    _wait_replicas(0, 60)  # min_replicas 0: no job, no replica
    user = scale_app.user()
    admin = scale_app.user(admin=True)
    jobs = [{"prompt": f"burst {i}", "seed": 100 + i, "num_inference_steps": 8} for i in range(6)]

    first_events: list = []
    ids = _submit_all(scale_app.url, user.headers, jobs[:1])

    def watch():
        with httpx.Client(base_url=scale_app.url, headers=user.headers, timeout=300) as http:
            first_events.extend(iter_events(http, ids[0]))

    watcher = threading.Thread(target=watch)
    watcher.start()
    ids += _submit_all(scale_app.url, user.headers, jobs[1:])

    # at zero replicas a job waits queued, and says why
    deadline = time.monotonic() + 60
    seen_starting = False
    peak = 0
    while time.monotonic() < deadline and not seen_starting:
        v = httpx.get(f"{scale_app.url}/v1/videos/{ids[-1]}", headers=user.headers, timeout=10).json()
        seen_starting = v["status"] == "queued" and v.get("stage") == STARTING_MODEL
        peak = max(peak, _transformer_replicas())
        time.sleep(0.05)
    assert seen_starting, v

    # the backlog (6 standard jobs, 1 per replica) takes it to its max of 2, read from Serve's status
    deadline = time.monotonic() + 240
    done = set()
    while len(done) < len(ids):
        assert time.monotonic() < deadline, f"jobs not done: {set(ids) - done}"
        peak = max(peak, _transformer_replicas())
        for vid in set(ids) - done:
            v = httpx.get(f"{scale_app.url}/v1/videos/{vid}", headers=user.headers, timeout=10).json()
            assert v["status"] != "failed", v
            if v["status"] == "completed":
                done.add(vid)
        time.sleep(0.2)
    assert peak == 2, f"the Transformer peaked at {peak} replicas"
    watcher.join(60)
    queued_phases = [e.get("stage") for k, e in first_events if k == "status" and e.get("status") == "queued"]
    assert STARTING_MODEL in queued_phases, first_events
    assert first_events[-1][1]["status"] == "completed", first_events[-1]

    # the cold start is a metric
    text = httpx.get(f"{scale_app.url}/metrics", headers=admin.headers, timeout=30).text
    cold = {s.name: s.value for f in text_string_to_metric_families(text) if f.name == "cinevivid_model_cold_start_seconds"
            for s in f.samples if s.labels.get("model") == "cinevivid-tiny"}
    assert cold["cinevivid_model_cold_start_seconds_count"] >= 1, cold
    print(f"\ncold start from zero replicas: {cold['cinevivid_model_cold_start_seconds_sum']:.2f} s "
          f"over {cold['cinevivid_model_cold_start_seconds_count']:.0f} start(s)")

    # every job's frames equal the same job on the session app's single fixed replica
    fixed = _submit_all(http_env.url, alice.headers, jobs)
    for vid in fixed:
        wait_for_status(http_env.url, alice.headers, vid, {"completed"}, timeout_s=300)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        scaled_frames = list(pool.map(lambda v: _frames(scale_app.url, user.headers, v), ids))
        fixed_frames = list(pool.map(lambda v: _frames(http_env.url, alice.headers, v), fixed))
    for job, a, b in zip(jobs, scaled_frames, fixed_frames):
        assert a.shape == b.shape and np.array_equal(a, b), job

    # idle, it gives its replicas back
    _wait_replicas(0, 120)


@pytest.mark.fast
def test_a_full_queue_is_a_typed_busy_and_its_wait_is_bounded():
    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import BackPressureError

    from serve.errors import StageBusy, StageUnavailable
    from serve.jobs.dispatcher import BusyWait

    full = BackPressureError(num_queued_requests=1, max_queued_requests=1)
    assert BusyWait.stage_of(full) == "generator"  # the Generator's own queue
    assert BusyWait.stage_of(RayTaskError("stream", "tb", StageBusy("full", stage="transformer"))) == "transformer"
    assert BusyWait.stage_of(StageUnavailable("gone", stage="vae")) is None
    assert BusyWait.stage_of(RuntimeError("boom")) is None
    wait = BusyWait(max_s=12)
    assert [wait.next_pause() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, None, None]  # 7.5 s, then 5 s more > 12
    assert (wait.waits, wait.waited_s) == (4, 7.5)


@pytest.fixture
def busy_app(http_env, tmp_path):
    """App "busy" at /busy: one Transformer replica that takes one job and queues one more
    (max_ongoing_requests 1, max_queued_requests 1), each step slowed down, and a dispatcher that
    hands over 4 jobs at once: Serve refuses the others (BackPressureError) until there is room."""
    from ray import serve

    from serve.app import build_app

    data_dir = tmp_path / "busy-data"
    transformer = {**SMALL, "num_replicas": 1, "max_ongoing_requests": 1, "max_queued_requests": 1}
    ingress = http_ingress_args(data_dir, dispatcher={"max_concurrent_jobs": 4})
    args = tiny_app_args(name="busy", with_ingress=True, ingress=ingress, chaos_delay_s={"transformer": 0.5},
                         deployments={"ingress": SMALL, "transformer": transformer})
    serve.run(build_app(args), name="busy", route_prefix="/busy")
    url = f"{http_env.url}/busy"
    try:
        wait_healthy(url)
        yield HttpEnv(url, data_dir, f"sqlite+aiosqlite:///{data_dir / 'cinevivid.db'}")
    finally:
        serve.delete("busy")


def test_jobs_a_full_stage_queue_refuses_wait_for_capacity_and_complete(busy_app):
    user, admin = busy_app.user(), busy_app.user(admin=True)
    events: dict[str, list] = {}
    denoising = threading.Event()  # the first job is on the Transformer
    started: dict[str, threading.Event] = {}  # a job's generation has started (its Transformer call follows)

    def watch(vid):
        with httpx.Client(base_url=busy_app.url, headers=user.headers, timeout=300) as http:
            for kind, e in iter_events(http, vid):
                events[vid].append((kind, e))
                if kind == "step":
                    denoising.set()
                elif kind == "stage" and e.get("stage") == "text_encoder":
                    started[vid].set()

    def submit(i: int) -> str:
        vid = _submit_all(busy_app.url, user.headers, [{"prompt": f"busy {i}", "seed": 200 + i,
                                                         "num_inference_steps": 8}])[0]
        events[vid], started[vid] = [], threading.Event()
        return vid

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        watchers = [pool.submit(watch, submit(0))]
        assert denoising.wait(60), events  # the one slot is taken (8 slowed steps: 4 s) ...
        second = submit(1)
        watchers.append(pool.submit(watch, second))
        assert started[second].wait(60), events  # ... and the one queue place, just after this job's start
        time.sleep(0.3)
        watchers += [pool.submit(watch, submit(i)) for i in (2, 3)]  # Serve refuses these at once
        for w in watchers:
            w.result(timeout=300)
    # every job completed; those the Transformer's full queue refused said so while they waited
    assert all(evs[-1][1]["status"] == "completed" for evs in events.values()), events
    waited = [vid for vid, evs in events.items()
              if any(k == "stage" and e.get("stage") == WAITING_FOR_CAPACITY for k, e in evs)]
    assert waited, events
    text = httpx.get(f"{busy_app.url}/metrics", headers=admin.headers, timeout=30).text
    samples = {(s.name, s.labels.get("stage")): s.value for f in text_string_to_metric_families(text)
               for s in f.samples if f.name in ("cinevivid_job_busy_waits", "cinevivid_job_retries")}
    assert samples.get(("cinevivid_job_busy_waits_total", "transformer"), 0) >= len(waited), samples
    # a wait for room is not a retry: no stage_retries were spent
    assert not any(v for (name, _), v in samples.items() if name == "cinevivid_job_retries_total"), samples
