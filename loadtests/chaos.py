"""Chaos under load: jobs submitted over HTTP without pause while a random stage replica
(TextEncoder, Transformer, VAEDecoder, Generator) is SIGKILLed N times, on a local stack (tiny
model, `loadtests.stack`). Every job must end completed (with the video of an undisturbed run of
the same seed) or failed with a clear error; none may be lost.

Prints and writes (--out, JSON): jobs submitted, completed, retried (re-runs of a job after a
replica stopped, from `cinevivid_job_retries_total`), failed (by error code), lost (never reached
a final status before the deadline, or whose record disappeared) and mismatched (completed, but the
video differs from the undisturbed run of its seed).

  python -m loadtests.chaos --kills 6 --concurrency 3 --out loadtests/results/chaos.json
"""

from __future__ import annotations

import argparse
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
            os.kill(pid, signal.SIGKILL)
            kills.append({"t": round(time.time() - started, 1), "victim": victim, "pid": pid})
            log(f"kill {i + 1}/{a.kills}: SIGKILL {victim} (pid {pid}); {len(jobs)} jobs submitted so far")
        stop.set()
        for t in threads:
            t.join()

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
    log(f"written {a.out}")
    print(f"kills: {len(kills)} ({dict(Counter(k['victim'] for k in kills))})")
    print(f"jobs submitted {result['submitted']}, completed {result['completed']}, retried {result['retried']}, "
          f"failed {result['failed']} {result['failed_by_code'] or ''}, lost {result['lost']}, "
          f"mismatched {result['mismatched']}")
    for m in failure_messages:
        print(f"  failure: {m}")


if __name__ == "__main__":
    main()
