"""Chaos under load: jobs submitted over HTTP without pause while a random stage replica
(TextEncoder, Transformer, VAEDecoder, Generator) is SIGKILLed N times, on a local stack (tiny
model, `loadtests.stack`). Every job must end completed (with the video of an undisturbed run of
the same seed) or failed with a clear error; none may be lost.

Prints and writes (--out, JSON): jobs submitted, completed, retried (re-runs of a job after a
replica stopped, from `cinevivid_job_retries_total`), failed (by error code), lost (never reached
a final status before the deadline, or whose record disappeared) and mismatched (completed, but the
video differs from the undisturbed run of its seed).

The hang case (`--hang`): SIGSTOP instead of SIGKILL. The frozen replica's process stays, its calls
never answer: each stage call's deadline (`liveness.stage_deadline_*`, set short here) fails the
call as if the replica had died (the job is retried), and Serve's health check (tightened here)
kills and replaces the replica. Reports, per hang, the seconds until the replica was gone.

The stream flood (`--stream-flood N`, after the kills): N `GET /v1/videos/{id}/events` streams
opened at once on a running job, while `/health` is timed (before, and with the streams open): how
many streams the API took, how many it refused (429), and the /health latency.

  python -m loadtests.chaos --kills 6 --concurrency 3 --out loadtests/results/chaos.json
  python -m loadtests.chaos --kills 4 --hang --stream-flood 300 --out loadtests/results/chaos_hang.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import signal
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from serve.stages import GENERATOR, TEXT_ENCODER, TRANSFORMER, VAE

VICTIMS = [TEXT_ENCODER.deployment, TRANSFORMER.deployment, VAE.deployment, GENERATOR.deployment]
TERMINAL = ("completed", "failed")


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def job_body(seed: int, steps: int) -> dict:
    return {"prompt": f"chaos {seed}", "size": "64x48", "num_frames": 9, "num_inference_steps": steps, "seed": seed}


def decoded_frames(mp4: bytes):
    import av
    import numpy as np

    with av.open(io.BytesIO(mp4)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def replica_pid(app: str, deployment: str) -> int | None:
    """The process id of a live replica of `deployment` (None while it has none)."""
    import ray

    named = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{app}#{deployment}#" in a["name"]]
    if not named:
        return None
    actor = ray.get_actor(named[0]["name"], namespace=named[0]["namespace"])
    try:
        return ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=60)
    except Exception:  # noqa: BLE001 - dead or still starting
        return None


def pid_gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def watch_hang(pid: int, frozen_at: float, out: dict, timeout_s: float = 600.0) -> None:
    """Record in `out["replaced_after_s"]` when the frozen process is gone (Serve killed it)."""
    while time.monotonic() - frozen_at < timeout_s:
        if pid_gone(pid):
            out["replaced_after_s"] = round(time.monotonic() - frozen_at, 1)
            return
        time.sleep(0.2)
    out["replaced_after_s"] = None


def health_latencies(url: str, n: int, timeout_s: float = 15.0) -> list[float | None]:
    """`n` GET /health timings in seconds (None: no answer within `timeout_s`), one every 0.2 s."""
    import httpx

    out: list[float | None] = []
    with httpx.Client(timeout=timeout_s) as c:
        for _ in range(n):
            t = time.perf_counter()
            try:
                c.get(f"{url}/health")
                out.append(round(time.perf_counter() - t, 4))
            except httpx.HTTPError:
                out.append(None)
            time.sleep(0.2)
    return out


def summary(latencies: list[float | None]) -> dict:
    done = sorted(x for x in latencies if x is not None)
    return {"samples": len(latencies), "timeouts": len(latencies) - len(done),
            "p50_s": done[len(done) // 2] if done else None, "max_s": done[-1] if done else None}


def stream_flood(stack, n: int, samples: int) -> dict:
    """Open `n` SSE streams on a running (long) job, then time /health; close them."""
    import httpx

    client = httpx.Client(base_url=stack.url, headers=stack.headers, timeout=60)
    before = health_latencies(stack.url, samples)
    job = {"prompt": "flood", "size": "128x128", "num_frames": 33, "num_inference_steps": 100, "seed": 1}
    r = client.post("/v1/videos", json=job)
    assert r.status_code == 200, r.text
    vid = r.json()["id"]
    statuses: Counter = Counter()
    opened = asyncio.Event()
    release = asyncio.Event()

    async def one(http: httpx.AsyncClient) -> None:
        try:
            async with http.stream("GET", f"/v1/videos/{vid}/events") as r:
                statuses[r.status_code] += 1
                if sum(statuses.values()) >= n:
                    opened.set()
                if r.status_code == 200:
                    await release.wait()
        except httpx.HTTPError as exc:
            statuses[type(exc).__name__] += 1
            if sum(statuses.values()) >= n:
                opened.set()

    async def flood() -> list[float | None]:
        limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=stack.url, headers=stack.headers, timeout=30, limits=limits) as http:
            tasks = [asyncio.create_task(one(http)) for _ in range(n)]
            try:
                await asyncio.wait_for(opened.wait(), 60)
            except asyncio.TimeoutError:
                pass
            during = await asyncio.to_thread(health_latencies, stack.url, samples)
            release.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return during

    t0 = time.monotonic()
    during = asyncio.run(flood())
    after_close = health_latencies(stack.url, 3)
    client.delete(f"/v1/videos/{vid}")
    return {"streams": n, "answers": {str(k): v for k, v in statuses.items()},
            "health_before": summary(before), "health_with_streams_open": summary(during),
            "health_after_close": summary(after_close), "wall_s": round(time.monotonic() - t0, 1)}


def retries_total(client) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(client.get("/metrics").text):
        if fam.name == "cinevivid_job_retries":
            total += sum(s.value for s in fam.samples if s.name.endswith("_total"))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=6, help="replica kills (N)")
    ap.add_argument("--concurrency", type=int, default=3, help="jobs kept in flight")
    ap.add_argument("--kill-interval-s", type=float, nargs=2, default=(15.0, 25.0),
                    help="random pause between kills (longer than Serve takes to replace a replica on the machine)")
    ap.add_argument("--steps", type=int, default=8, help="denoising steps per job")
    ap.add_argument("--seeds", type=int, default=3, help="distinct seeds (each checked against an undisturbed run)")
    ap.add_argument("--stage-retries", type=int, default=2)
    ap.add_argument("--lease-s", type=float, default=30.0, help="the dispatcher's job lease (the shipped default)")
    ap.add_argument("--deadline-s", type=float, default=600.0, help="after the last kill, for every job to end")
    ap.add_argument("--random-seed", type=int, default=1)
    ap.add_argument("--hang", action="store_true", help="SIGSTOP the replicas instead of SIGKILL (a hung replica)")
    ap.add_argument("--stage-deadline-floor-s", type=float, default=20.0,
                    help="with --hang: liveness.stage_deadline_floor_s (shipped: 300)")
    ap.add_argument("--stage-deadline-per-step-s", type=float, default=2.0,
                    help="with --hang: liveness.stage_deadline_per_step_s (shipped: 60)")
    ap.add_argument("--stream-flood", type=int, default=0, metavar="N",
                    help="after the kills: open N SSE streams on a running job and time /health")
    ap.add_argument("--health-samples", type=int, default=20, help="/health timings before and during the flood")
    ap.add_argument("--out", default="loadtests/results/chaos.json")
    a = ap.parse_args()
    rnd = random.Random(a.random_seed)

    os.environ.setdefault("CINEVIVID_CACHE_DIR", tempfile.mkdtemp(prefix="cinevivid-chaos-cache-"))
    import httpx
    import numpy as np

    from loadtests.stack import local_stack

    ingress = {"dispatcher": {"max_concurrent_jobs": a.concurrency, "lease_seconds": a.lease_s,
                              "stage_retries": a.stage_retries, "stage_retry_backoff_s": 0.5}}
    # a short pause per denoising step and per decode, so that kills land inside the stages' calls
    extra = {"chaos_delay_s": {"transformer": 0.2, "vae": 0.5}}
    if a.hang:
        # a frozen replica: each stage call's deadline, and Serve's health checks, short enough to see
        from loadtests.stack import CONFIG, _app
        from serve.ops.deploy import load_serve_config

        extra["liveness"] = {"stage_deadline_floor_s": a.stage_deadline_floor_s,
                             "stage_deadline_per_step_s": a.stage_deadline_per_step_s}
        deployments = _app(load_serve_config(CONFIG))["args"].get("deployments") or {}
        extra["deployments"] = {**deployments, **{
            stage: {**(deployments.get(stage) or {}), "health_check_period_s": 2.0, "health_check_timeout_s": 5.0}
            for stage in ("text_encoder", "transformer", "vae", "generator")}}
    started = time.time()
    with local_stack(threads=1, ingress=ingress, extra_args=extra) as stack:
        client = httpx.Client(base_url=stack.url, headers=stack.headers, timeout=60)
        log(f"stack up at {stack.url} in {time.time() - started:.0f}s")

        # 1. an undisturbed run of each seed: the videos every later job must reproduce
        reference = {}
        for seed in range(a.seeds):
            vid = client.post("/v1/videos", json=job_body(seed, a.steps)).json()["id"]
            while (v := client.get(f"/v1/videos/{vid}").json())["status"] not in TERMINAL:
                time.sleep(0.1)
            assert v["status"] == "completed", v
            reference[seed] = decoded_frames(client.get(f"/v1/videos/{vid}/content").content)
        log(f"references of {a.seeds} seeds done")

        # 2. load: `concurrency` jobs in flight, a new one as soon as one ends, until the kills are over
        jobs: dict[str, int] = {}  # video id -> seed
        stop = threading.Event()
        lock = threading.Lock()

        def submitter() -> None:
            c = httpx.Client(base_url=stack.url, headers=stack.headers, timeout=60)
            while not stop.is_set():
                seed = rnd.randrange(a.seeds)
                try:
                    r = c.post("/v1/videos", json=job_body(seed, a.steps))
                except httpx.HTTPError:
                    time.sleep(0.2)
                    continue
                if r.status_code != 200:
                    time.sleep(0.2)
                    continue
                vid = r.json()["id"]
                with lock:
                    jobs[vid] = seed
                while not stop.is_set():
                    try:
                        if c.get(f"/v1/videos/{vid}").json().get("status") in TERMINAL:
                            break
                    except (httpx.HTTPError, ValueError):
                        pass
                    time.sleep(0.2)

        threads = [threading.Thread(target=submitter, daemon=True) for _ in range(a.concurrency)]
        for t in threads:
            t.start()
        kills: list[dict] = []
        hangs: list[threading.Thread] = []
        sig = signal.SIGSTOP if a.hang else signal.SIGKILL
        for i in range(a.kills):
            time.sleep(rnd.uniform(*a.kill_interval_s))
            victim = rnd.choice(VICTIMS)
            pid = None
            deadline = time.monotonic() + 120
            while pid is None and time.monotonic() < deadline:  # a replica killed before may still be starting
                pid = replica_pid(stack.app, victim)
                if pid is None:
                    time.sleep(0.5)
            if pid is None:
                log(f"kill {i + 1}: no live {victim} replica; skipped")
                continue
            os.kill(pid, sig)
            kills.append({"t": round(time.time() - started, 1), "victim": victim, "pid": pid, "signal": sig.name})
            if a.hang:  # when does Serve notice and kill the frozen process?
                hangs.append(threading.Thread(target=watch_hang, args=(pid, time.monotonic(), kills[-1]), daemon=True))
                hangs[-1].start()
            log(f"kill {i + 1}/{a.kills}: {sig.name} {victim} (pid {pid}); {len(jobs)} jobs submitted so far")
        stop.set()
        for t in threads:
            t.join()
        for t in hangs:
            t.join()
        for k in kills:  # a frozen process Serve did not kill: let it go on (and be stopped with the stack)
            if k["signal"] == "SIGSTOP" and not pid_gone(k["pid"]):
                os.kill(k["pid"], signal.SIGCONT)

        # 3. every job ends: completed (same video as its seed's undisturbed run) or failed
        log(f"kills done; waiting for {len(jobs)} jobs to end (deadline {a.deadline_s:.0f}s)")
        deadline = time.monotonic() + a.deadline_s
        final: dict[str, dict | None] = {}
        while time.monotonic() < deadline and len(final) < len(jobs):
            for vid in jobs:
                if vid in final:
                    continue
                try:
                    r = client.get(f"/v1/videos/{vid}")
                except httpx.HTTPError:
                    continue
                if r.status_code == 404:
                    final[vid] = None  # the record disappeared: lost
                elif r.json().get("status") in TERMINAL:
                    final[vid] = r.json()
            time.sleep(0.5)
        completed = [vid for vid, v in final.items() if v and v["status"] == "completed"]
        failed = Counter(v["error"]["code"] for v in final.values() if v and v["status"] == "failed")
        failure_messages = sorted({v["error"]["message"] for v in final.values() if v and v["status"] == "failed"})
        lost = [vid for vid in jobs if final.get(vid) is None]
        mismatched = [vid for vid in completed
                      if not np.array_equal(decoded_frames(client.get(f"/v1/videos/{vid}/content").content),
                                            reference[jobs[vid]])]
        result = {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
            "args": vars(a), "kills": kills,
            "submitted": len(jobs), "completed": len(completed), "retried": int(retries_total(client)),
            "failed": sum(failed.values()), "failed_by_code": dict(failed), "failure_messages": failure_messages,
            "lost": len(lost), "lost_ids": lost, "mismatched": len(mismatched),
            "wall_s": round(time.time() - started, 1),
        }
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2))
        if a.stream_flood:
            log(f"stream flood: {a.stream_flood} SSE streams on a running job")
            result["stream_flood"] = stream_flood(stack, a.stream_flood, a.health_samples)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    log(f"written {a.out}")
    print(f"kills: {len(kills)} ({dict(Counter(k['victim'] for k in kills))})")
    print(f"jobs submitted {result['submitted']}, completed {result['completed']}, retried {result['retried']}, "
          f"failed {result['failed']} {result['failed_by_code'] or ''}, lost {result['lost']}, "
          f"mismatched {result['mismatched']}")
    for m in failure_messages:
        print(f"  failure: {m}")
    if a.hang:
        print(f"frozen replicas gone after (s): {[k.get('replaced_after_s') for k in kills]}")
    if "stream_flood" in result:
        print(f"stream flood: {json.dumps(result['stream_flood'])}")


if __name__ == "__main__":
    main()
