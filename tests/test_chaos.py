"""Chaos: SIGKILL a stage replica (Transformer, VAE, TTS, Generator) or the Ingress in the middle of
a job, on a real app over HTTP. The job is re-run from the start on a healthy replica and its video
equals an undisturbed run with the same seed; with its retries used up it fails with
`stage_unavailable` and a short message naming the stage, with nothing of Ray's in it. A full disk
(a real one: a small tmpfs filled to the last page) fails the job with `insufficient_storage` and
leaves no file.

A hung replica (SIGSTOP: the process is there, its calls never answer) is treated like a dead one:
the Generator's call misses its deadline (`liveness.stage_deadline_*`), the job is retried, Serve's
health check replaces the frozen replica, and the video is the same. A long (diffusion-forcing)
video whose Transformer dies mid-job keeps its preview and counters: a watcher never sees them go
back.

The app here is its own ("chaos", with its own data dir): the kills never touch the shared
fixtures' replicas. `chaos_delay_s` slows each stage down (without changing its output) so that a
kill lands mid-call; the test waits for the job's own SSE events to know which stage it is in.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import threading
import time

import av
import httpx
import numpy as np
import pytest

from client.http import iter_events
from conftest import tiny_app_args
from fake_elevenlabs import TEST_API_KEY, FakeElevenLabs
from full_disk import small_disk
from tests.http_fixtures import *  # noqa: F401,F403
from serve.jobs.db import Database
from serve.jobs.store import JobStore
from tests.http_fixtures import (SMALL, HttpEnv, http_ingress_args, local_service, make_local_user, run_sync,
                                 wait_for_status, wait_local)
from serve.stages import GENERATOR, INGRESS, TRANSFORMER, TTS, VAE, stage_of_deployment

APP = "chaos"
# each stage call's deadline here: max(floor, steps x per step) = 45 s for JOB (6 steps). It also
# bounds the wait for a killed replica's replacement (a re-run's call waits for it), which takes
# tens of seconds on a loaded 2-core box: shorter deadlines turn one retry into two.
LIVENESS = {"stage_deadline_per_step_s": 5.0, "stage_deadline_floor_s": 45.0}
DEADLINE_S = 45.0
# the VAE's health checks, tight enough that a frozen replica is replaced within one deadline
# (Serve: 3 failed checks in a row; RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS kills it at once)
VAE_OPTIONS = {"ray_actor_options": {"num_cpus": 0.1}, "health_check_period_s": 1.0, "health_check_timeout_s": 4.0}
KEY = TEST_API_KEY  # the session cluster's processes have it (conftest: session_cluster_key)
JOB = {"prompt": "a storm over the sea", "size": "64x48", "num_frames": 9, "num_inference_steps": 6, "seed": 11,
       "voiceover": {"text": "Waves.", "provider": "elevenlabs"}}
RAY_INTERNALS = re.compile(r"pid|ip[:=]|actor|ray|0x[0-9a-f]|[0-9a-f]{16}|\d+\.\d+\.\d+\.\d+", re.I)


@pytest.fixture(scope="module")
def fake():
    with FakeElevenLabs(api_key=KEY) as server:
        yield server


@pytest.fixture(scope="module")
def env(ray_cluster, session_dir, fake) -> HttpEnv:
    from ray import serve

    from serve.app import build_app

    data_dir = session_dir / "chaos-data"
    ingress = http_ingress_args(data_dir, dispatcher={"stage_retries": 2, "stage_retry_backoff_s": 0.2})
    args = tiny_app_args(name=APP, with_ingress=True, ingress=ingress, deployments={"ingress": SMALL, "vae": VAE_OPTIONS},
                         liveness=LIVENESS,
                         tts={"providers": ["elevenlabs", "none"], "elevenlabs_base_url": fake.url},
                         chaos_delay_s={"transformer": 0.3, "vae": 1.0, "tts": 2.5})
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    env = HttpEnv(f"{ray_cluster['http_url']}/{APP}", data_dir, f"sqlite+aiosqlite:///{data_dir / 'cinevivid.db'}")
    _wait_running()
    yield env
    serve.delete(APP)


@pytest.fixture(scope="module")
def h(env) -> dict:
    return env.user().headers


@pytest.fixture(scope="module")
def reference(env, h) -> bytes:
    """The video of an undisturbed run of JOB."""
    vid = httpx.post(f"{env.url}/v1/videos", json=JOB, headers=h, timeout=30).json()["id"]
    with httpx.Client(base_url=env.url, headers=h, timeout=120) as http:
        events = list(iter_events(http, vid))
    assert events[-1][1]["status"] == "completed", events[-1]
    return httpx.get(f"{env.url}/v1/videos/{vid}/content", headers=h, timeout=30).content


# ---- helpers ----------------------------------------------------------------------------------
def _wait_running(timeout_s: float = 180.0) -> None:
    """Until every deployment of the app is healthy again (a killed replica has been replaced)."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP)
        if app is not None and str(app.status).endswith("RUNNING") and all(
                str(d.status).endswith("HEALTHY") and not str(d.status).endswith("UNHEALTHY")
                for d in app.deployments.values()):
            return
        time.sleep(0.2)
    raise AssertionError(f"app {APP} never became healthy again: {serve.status().applications.get(APP)}")


def _replica_pid(deployment: str) -> int:
    """The process id of the app's (only) replica of `deployment`."""
    import ray

    named = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{APP}#{deployment}#" in a["name"]]
    assert len(named) == 1, named
    actor = ray.get_actor(named[0]["name"], namespace=named[0]["namespace"])
    return ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=60)


def _kill(deployment: str) -> None:
    os.kill(_replica_pid(deployment), signal.SIGKILL)


# when to kill each deployment: an SSE event that says the job is inside that stage's call
STEP = lambda kind, e: kind == "step"  # noqa: E731 - denoising (the TTS call is in its 2.5 s pause too)
KILL_WHEN = {
    TRANSFORMER.deployment: STEP,
    VAE.deployment: lambda kind, e: kind == "stage" and e.get("stage") == "vae" and e.get("stage_status") == "started",
    TTS.deployment: STEP,
    GENERATOR.deployment: STEP,
}


def _decoded_video(mp4: bytes) -> np.ndarray:
    with av.open(io.BytesIO(mp4)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _decoded(mp4: bytes) -> tuple[np.ndarray, np.ndarray]:
    with av.open(io.BytesIO(mp4)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    with av.open(io.BytesIO(mp4)) as c:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    return frames, audio


def _assert_same_video(mp4: bytes, reference: bytes) -> None:
    got, want = _decoded(mp4), _decoded(reference)
    assert got[0].shape == want[0].shape and np.array_equal(got[0], want[0]), "the frames differ"
    assert np.array_equal(got[1], want[1]), "the audio differs"


async def _job_events(service, vid: str):
    """(type, event dict) of a job running in this process's dispatcher, as its SSE would send
    them, up to the final status (read from the service's broker: an in-process client gets the
    SSE body only once it ends)."""
    queue, history = service.broker.subscribe(vid)
    try:
        pending = list(history)
        while True:
            ev = pending.pop(0) if pending else await asyncio.wait_for(queue.get(), 240)
            yield ev.type, ev.model_dump(mode="json", exclude_none=True)
            if ev.type == "status" and ev.status in ("completed", "failed", "deleted"):
                return
    finally:
        service.broker.unsubscribe(vid, queue)


def _assert_clean_message(message: str, stage: str) -> None:
    assert f"the {stage} replica stopped while running this job" in message, message
    assert len(message) < 120 and not RAY_INTERNALS.search(message), message


# ---- a killed replica: the job is retried and its video is the same --------------------------
@pytest.mark.parametrize("deployment", list(KILL_WHEN))
def test_a_killed_stage_replica_is_retried_and_the_video_is_the_same(env, h, reference, deployment):
    _wait_running()
    vid = httpx.post(f"{env.url}/v1/videos", json=JOB, headers=h, timeout=30).json()["id"]
    events = []
    with httpx.Client(base_url=env.url, headers=h, timeout=120) as http:
        for kind, e in iter_events(http, vid):
            if not any(k == "kill" for k, _ in events) and KILL_WHEN[deployment](kind, e):
                _kill(deployment)
                events.append(("kill", {}))
            events.append((kind, e))
    final = events[-1][1]
    assert final["status"] == "completed", events
    retries = [e for k, e in events if k == "status" and e.get("retry")]
    stage = stage_of_deployment(deployment).name
    assert [r["retry"] for r in retries] == [1], events
    assert retries[0]["status"] == "in_progress" and retries[0]["error"]["code"] == "stage_unavailable"
    assert f"the {stage} replica stopped" in retries[0]["error"]["message"]
    progress = [e["progress"] for k, e in events if k != "kill"]
    assert progress == sorted(progress), progress  # never goes back for a watcher
    video = httpx.get(f"{env.url}/v1/videos/{vid}", headers=h, timeout=30).json()
    assert video["status"] == "completed" and video.get("error") is None
    _assert_same_video(httpx.get(f"{env.url}/v1/videos/{vid}/content", headers=h, timeout=30).content, reference)


def test_a_killed_ingress_replica_the_job_is_rerun_and_the_video_is_the_same(env, h, reference):
    """Kill the Ingress replica process mid-job (no shutdown hook runs). It held the job's lease:
    Serve starts a new replica, whose dispatcher re-runs the job once the lease expires."""
    _wait_running()
    vid = httpx.post(f"{env.url}/v1/videos", json=JOB, headers=h, timeout=30).json()["id"]
    with httpx.Client(base_url=env.url, headers=h, timeout=120) as http:
        for kind, _ in iter_events(http, vid):
            if kind == "step":
                break
    _kill(INGRESS.deployment)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            v = httpx.get(f"{env.url}/v1/videos/{vid}", headers=h, timeout=10).json()
            if v.get("status") in ("completed", "failed"):
                break
        except (httpx.HTTPError, ValueError):
            pass  # the HTTP route comes back with the new replica
        time.sleep(0.2)
    assert v["status"] == "completed", v
    _assert_same_video(httpx.get(f"{env.url}/v1/videos/{vid}/content", headers=h, timeout=30).content, reference)
    row = run_sync(JobStore(Database(env.database_url)).get(vid))
    assert row["attempts"] == 2 and row["lease_owner"] is None  # the crash spent one attempt


# ---- a hung replica: the job is retried after one deadline, the replica replaced ----------------
def test_a_hung_vae_replica_costs_the_job_one_deadline_and_the_video_is_the_same(env, h, reference):
    """SIGSTOP the VAE replica's process as it starts decoding the job: its call never answers.
    The Generator's call misses its deadline (45 s here), or fails sooner when Serve's health check
    has found the frozen replica and killed it, and the job is retried (the same path as a dead
    replica); the retry runs on the replica Serve started instead. The video equals an undisturbed
    run's."""
    _wait_running()
    vid = httpx.post(f"{env.url}/v1/videos", json=JOB, headers=h, timeout=30).json()["id"]
    events, frozen, frozen_at = [], None, None
    try:
        with httpx.Client(base_url=env.url, headers=h, timeout=240) as http:
            for kind, e in iter_events(http, vid):
                if frozen is None and KILL_WHEN[VAE.deployment](kind, e):
                    frozen, frozen_at = _replica_pid(VAE.deployment), time.monotonic()
                    os.kill(frozen, signal.SIGSTOP)
                events.append((kind, e, time.monotonic()))
    finally:
        if frozen is not None:
            try:
                os.kill(frozen, signal.SIGCONT)  # (Serve has killed it by now; if not, let it go on)
            except ProcessLookupError:
                pass
    assert frozen is not None, events
    finished = events[-1][2] - frozen_at
    assert events[-1][1]["status"] == "completed", events
    retries = [(e, t) for k, e, t in events if k == "status" and e.get("retry")]
    assert [e["retry"] for e, _ in retries] == [1], events
    (retry, retried_at), = retries
    assert retry["error"]["code"] == "stage_unavailable" and "the vae replica" in retry["error"]["message"], retry
    # retried at the deadline, or sooner when Serve's health check has already killed the frozen
    # replica (then the call fails as a dead one's); done well within a second deadline
    assert retried_at - frozen_at <= DEADLINE_S + 10, (retried_at - frozen_at, events)
    assert finished < 3 * DEADLINE_S, (finished, events)
    progress = [e["progress"] for _, e, _ in events]
    assert progress == sorted(progress), progress
    _assert_same_video(httpx.get(f"{env.url}/v1/videos/{vid}/content", headers=h, timeout=30).content, reference)
    _wait_running()
    import psutil

    assert not psutil.pid_exists(frozen) or psutil.Process(frozen).status() == psutil.STATUS_ZOMBIE, \
        "the frozen replica was not replaced"


# ---- a long video whose Transformer dies: what a watcher sees never goes back ------------------
# 3 windows of 4 latent frames, each adding 2 (8 frames): 29 frames at 8 fps
DF_JOB = {"prompt": "a long walk along the shore", "size": "64x64", "num_frames": 29, "fps": 8, "seed": 11,
          "num_inference_steps": 8, "base_num_frames": 13, "overlap_history": 5}


def _watch(env, h, vid: str, seen: list, stop: threading.Event) -> None:
    """Poll GET /v1/videos/{id} and the preview's length until `stop`: (windows_done,
    playable_seconds, progress, preview bytes) of each look while the job runs."""
    with httpx.Client(base_url=env.url, headers=h, timeout=30) as http:
        while not stop.is_set():
            v = http.get(f"/v1/videos/{vid}").json()
            if v.get("status") != "in_progress":
                if v.get("status") in ("completed", "failed"):
                    return
                continue
            p = http.get(f"/v1/videos/{vid}/content", params={"variant": "preview"})
            if p.status_code == 200 and p.headers.get("x-video-status") != "in_progress":
                continue  # it completed meanwhile: the "preview" is the final video
            size = len(p.content) if p.status_code == 200 else 0  # no window yet: no preview
            seen.append((v.get("windows_done") or 0, v.get("playable_seconds") or 0.0, v["progress"], size))
            stop.wait(0.1)


def test_a_long_videos_progress_never_goes_back_when_its_transformer_dies(env, h):
    """Kill the Transformer once the first window is delivered. The job is re-run from the start,
    and while the re-run makes windows the preview already has, the preview, `windows_done`,
    `playable_seconds` and the progress stay as they were (polled and in the SSE stream); then they
    grow again. The final video equals an undisturbed run's."""
    _wait_running()
    ref_id = httpx.post(f"{env.url}/v1/videos", json=DF_JOB, headers=h, timeout=30).json()["id"]
    assert wait_for_status(env.url, h, ref_id, {"completed", "failed"}, 240)["status"] == "completed"
    reference = httpx.get(f"{env.url}/v1/videos/{ref_id}/content", headers=h, timeout=30).content

    vid = httpx.post(f"{env.url}/v1/videos", json=DF_JOB, headers=h, timeout=30).json()["id"]
    seen, stop = [], threading.Event()
    watcher = threading.Thread(target=_watch, args=(env, h, vid, seen, stop), daemon=True)
    watcher.start()
    events, killed = [], False
    try:
        with httpx.Client(base_url=env.url, headers=h, timeout=240) as http:
            for kind, e in iter_events(http, vid):
                events.append((kind, e))
                if not killed and kind == "window" and e["window"] == 0:
                    _kill(TRANSFORMER.deployment)
                    killed = True
    finally:
        stop.set()
        watcher.join(60)
    assert killed and events[-1][1]["status"] == "completed", events
    assert [e["retry"] for k, e in events if k == "status" and e.get("retry")] == [1], events
    windows = [(e["window"], e["playable_s"]) for k, e in events if k == "window"]
    assert windows == [(0, 13 / 8), (1, 21 / 8), (2, 29 / 8)], windows  # each window once, in order
    progress = [e["progress"] for _, e in events]
    assert progress == sorted(progress), progress
    assert len(seen) >= 3, seen
    for i, name in enumerate(("windows_done", "playable_seconds", "progress", "preview bytes")):
        values = [s[i] for s in seen]
        assert values == sorted(values), (name, values)
    final = httpx.get(f"{env.url}/v1/videos/{vid}/content", headers=h, timeout=30).content
    assert np.array_equal(_decoded_video(final), _decoded_video(reference)), "the frames differ"


# ---- retries used up: a short, clear failure ---------------------------------------------------
async def test_when_the_retries_run_out_the_job_fails_with_stage_unavailable(env, tmp_path):
    """An ingress of its own (stage_retries 1) drives the chaos app's Generator: the Transformer
    dies in the first run (retried), the Generator itself in the retry (no retry left)."""
    _wait_running()
    async with local_service(tmp_path, generator_app=APP,
                             dispatcher={"stage_retries": 1, "stage_retry_backoff_s": 0.1}) as (service, c):
        hh = await make_local_user(service)
        vid = (await c.post("/v1/videos", json={**JOB, "voiceover": None}, headers=hh)).json()["id"]
        victims, events = [TRANSFORMER.deployment, GENERATOR.deployment], []
        async for kind, e in _job_events(service, vid):
            events.append((kind, e))
            if kind == "step" and e["step"] == 1 and victims:
                await asyncio.to_thread(_kill, victims.pop(0))
        assert not victims, events
        retry = [e for k, e in events if k == "status" and e.get("retry")]
        assert len(retry) == 1 and "the transformer replica stopped" in retry[0]["error"]["message"], events
        v = (await c.get(f"/v1/videos/{vid}", headers=hh)).json()
        assert v["status"] == "failed", v
        assert v["error"]["code"] == "stage_unavailable", v
        assert v["error"]["message"] == "the generator replica stopped while running this job; retried 1 time"
        _assert_clean_message(v["error"]["message"], "generator")
        assert events[-1][1]["status"] == "failed"
        assert {k: events[-1][1]["error"][k] for k in ("code", "message")} == {
            k: v["error"][k] for k in ("code", "message")}
    _wait_running()  # leave the app whole


# ---- a re-run meets its earlier run ------------------------------------------------------------
def test_jobs_with_the_same_spec_at_once_all_finish(graph_app):
    """A re-run job often finds its earlier run (the orphan of a dead Generator) still queued in
    the Transformer: same spec, same seed. Queued tickets with equal specs used to crash the
    Transformer's batching worker (its tickets were compared field by field, numpy arrays included),
    leaving every queued job waiting for ever."""
    from concurrent.futures import ThreadPoolExecutor

    spec = {"prompt": "twins", "width": 32, "height": 32, "num_frames": 5, "num_inference_steps": 3, "seed": 5}
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: graph_app.generate(spec), range(3)))
    frames = [_decoded_video(r.mp4) for r in results]
    assert all(np.array_equal(f, frames[0]) for f in frames[1:])


# ---- a full disk -------------------------------------------------------------------------------
async def test_a_full_disk_fails_the_job_with_a_reason_and_leaves_no_file(http_env, tmp_path):
    """The data dir is a small disk of its own (the job database is elsewhere, so the failure can
    be recorded), filled to the last page. /health says `degraded`, naming the storage; a job fails
    with insufficient_storage, saying so, and leaves no file: not when the MP4 finds the disk full,
    nor when the MP4 fits and its thumbnail does not. The earlier video is still served, and with
    room again the same service stores videos again."""
    job = {"prompt": "full", "num_inference_steps": 1, "seed": 5}
    with small_disk(tmp_path / "disk") as disk:
        async with local_service(disk.path, database_url=f"sqlite+aiosqlite:///{tmp_path / 'cinevivid.db'}") as (service, c):
            hh = await make_local_user(service)

            async def run() -> dict:
                r = await c.post("/v1/videos", json=job, headers=hh)
                assert r.status_code == 200, r.text  # the job database has room: it is queued
                return await wait_local(c, hh, r.json()["id"], {"completed", "failed"})

            async def health() -> dict:
                r = await c.get("/health")
                assert r.status_code == 200, r.text
                return r.json()

            def assert_failed_for_the_disk(v: dict) -> None:
                assert v["status"] == "failed", v
                assert v["error"]["code"] == "insufficient_storage", v["error"]
                assert v["error"]["message"] == ("the server's disk is full: the video was generated but could "
                                                 "not be stored. Try again later.")

            first = await run()
            assert first["status"] == "completed", first
            mp4 = (await c.get(f"/v1/videos/{first['id']}/content", headers=hh)).content
            stored = disk.files("videos")
            assert stored == sorted([f"{first['id']}.jpg", f"{first['id']}.mp4"])
            assert (await health())["services"]["storage"]["status"] == "healthy"

            disk.fill()
            h = await health()
            assert h["status"] == "degraded", h
            assert h["services"]["storage"]["status"] == "unhealthy"
            assert "No space left on device" in h["services"]["storage"]["detail"]
            full = await run()
            assert_failed_for_the_disk(full)
            assert disk.files("videos") == stored  # no MP4, no thumbnail, no temp file
            assert (await c.get(f"/v1/videos/{full['id']}/content", headers=hh)).status_code == 409
            again = await c.get(f"/v1/videos/{first['id']}/content", headers=hh)  # reads need no room
            assert again.status_code == 200 and again.content == mp4

            # room for the MP4 (the same job, the same bytes) and not a page more: its thumbnail
            # meets the full disk, and the MP4 already written goes too
            disk.empty()
            disk.fill(leave_bytes=len(mp4))
            assert_failed_for_the_disk(await run())
            assert disk.files("videos") == stored

            disk.empty()
            assert (await health())["status"] == "healthy"
            assert not [n for n in disk.files() if n.startswith(".probe")]  # the health probes left nothing
            assert (await run())["status"] == "completed"
