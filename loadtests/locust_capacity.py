"""Open-loop job arrivals for the capacity report (`loadtests/capacity.py` drives it).

One `JobArrivalUser` submits jobs (POST /v1/videos, the configured default workload) at a target
rate in jobs per minute, evenly spaced or Poisson, independent of completions: each submitted job
is followed to its end in its own greenlet over SSE (`GET /v1/videos/{id}/events`, no polling
load), then its MP4 is downloaded. The rate comes from a control file the driver rewrites at each
step (`{"step": 2, "jpm": 30}`; `{"stop": true}` ends the arrivals, the user then waits for the
jobs in flight, at most CINEVIVID_CAPACITY_DRAIN_S, and quits Locust). Every job is written as one
JSON line to CINEVIVID_CAPACITY_JOBS when it is accepted (`"event": "submit"`) and one when it ends
(`"event": "end"`): step, submit and end times (this process's wall clock), status, latency measured
here (submit -> terminal status event); a refused POST (429, 503, ...) is one "end" line.

Environment: CINEVIVID_API_KEY, CINEVIVID_CAPACITY_CONTROL, CINEVIVID_CAPACITY_JOBS,
CINEVIVID_CAPACITY_ARRIVALS (even | poisson), CINEVIVID_CAPACITY_DRAIN_S, CINEVIVID_CAPACITY_BODY
(JSON merged into each request body, default {} = the model's defaults), CINEVIVID_CAPACITY_SEED.
"""

from __future__ import annotations

import json
import os
import random
import time

import gevent
from gevent.lock import Semaphore
from locust import HttpUser, constant, events, task

API_KEY = os.environ.get("CINEVIVID_API_KEY", "")
CONTROL = os.environ.get("CINEVIVID_CAPACITY_CONTROL", "capacity_control.json")
JOBS = os.environ.get("CINEVIVID_CAPACITY_JOBS", "capacity_jobs.jsonl")
ARRIVALS = os.environ.get("CINEVIVID_CAPACITY_ARRIVALS", "even")
DRAIN_S = float(os.environ.get("CINEVIVID_CAPACITY_DRAIN_S", "120"))
BODY = json.loads(os.environ.get("CINEVIVID_CAPACITY_BODY", "{}"))
MAX_JOB_S = float(os.environ.get("CINEVIVID_CAPACITY_MAX_JOB_S", "600"))
PROMPTS = ["a red fox running through fresh snow", "a paper boat drifting down a rain gutter",
           "timelapse of clouds over a mountain lake", "a neon city street at night in the rain",
           "a hummingbird hovering near a flower, slow motion"]
R_CREATE, R_EVENTS, R_CONTENT = "POST /v1/videos", "GET /v1/videos/{id}/events", "GET /v1/videos/{id}/content"
R_JOB = "job: submit -> completed"
END = ("completed", "failed", "deleted")


def read_control(path: str = CONTROL) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def next_gap_s(jpm: float, arrivals: str, rng: random.Random) -> float:
    """Seconds to the next arrival at `jpm` jobs per minute."""
    mean = 60.0 / jpm
    return rng.expovariate(1.0 / mean) if arrivals == "poisson" else mean


class JobArrivalUser(HttpUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        self.client.headers["Authorization"] = f"Bearer {API_KEY}"
        self.rng = random.Random(int(os.environ.get("CINEVIVID_CAPACITY_SEED", "0")))
        self.followers: list[gevent.Greenlet] = []
        self.write_lock = Semaphore()
        self.seq = 0

    @task
    def arrivals(self) -> None:
        next_at = time.time()
        while True:
            ctl = read_control()
            if ctl.get("stop"):
                break
            jpm = float(ctl.get("jpm") or 0)
            if jpm <= 0:
                gevent.sleep(0.2)
                next_at = time.time()
                continue
            now = time.time()
            if now < next_at:
                gevent.sleep(min(next_at - now, 0.5))  # re-read the rate at least twice a second
                continue
            self.submit(int(ctl.get("step", 0)), jpm)
            next_at += next_gap_s(jpm, ARRIVALS, self.rng)
            # after a pause (a slow POST, the rate raised) do not fire a burst to catch up
            next_at = max(next_at, time.time() - 60.0 / jpm)
        gevent.joinall(self.followers, timeout=DRAIN_S)
        self.environment.runner.quit()
        gevent.sleep(60)  # quit() stops this greenlet

    def submit(self, step: int, jpm: float) -> None:
        self.seq += 1
        body = {"prompt": self.rng.choice(PROMPTS), "seed": self.rng.randrange(2**31), **BODY}
        t0 = time.time()
        rec = {"step": step, "jpm": jpm, "seq": self.seq, "submit_t": t0}
        with self.client.post("/v1/videos", json=body, name=R_CREATE, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"create: {r.status_code} {r.text[:200]}")
                self.record({**rec, "event": "end", "status": f"http_{r.status_code}", "end_t": time.time(), "latency_s": None})
                return
            vid = r.json()["id"]
        rec["id"] = vid
        self.record({**rec, "event": "submit"})
        self.followers = [g for g in self.followers if not g.dead]
        self.followers.append(gevent.spawn(self.follow, vid, rec))

    def follow(self, vid: str, rec: dict) -> None:
        status, error = "lost", None
        try:
            with self.client.get(f"/v1/videos/{vid}/events", name=R_EVENTS, stream=True, timeout=MAX_JOB_S,
                                 catch_response=True) as r:
                if r.status_code != 200:
                    r.failure(f"events: {r.status_code}")
                    status = f"events_http_{r.status_code}"
                else:
                    kind = None
                    for line in r.iter_lines(decode_unicode=True):
                        if line.startswith("event:"):
                            kind = line[6:].strip()
                        elif line.startswith("data:") and kind == "status":
                            data = json.loads(line[5:])
                            if data.get("status") in END:
                                status, error = data["status"], data.get("error")
                                break
        except Exception as e:  # noqa: BLE001 - a broken stream is a lost job, recorded as such
            error = repr(e)[:200]
        end = time.time()
        latency = end - rec["submit_t"]
        events.request.fire(request_type="JOB", name=R_JOB, response_time=latency * 1000, response_length=0,
                            exception=None if status == "completed" else RuntimeError(f"{status}: {error}"),
                            context={})
        self.record({**rec, "event": "end", "status": status, "error": error, "end_t": end, "latency_s": latency})
        if status == "completed":
            with self.client.get(f"/v1/videos/{vid}/content", name=R_CONTENT, catch_response=True) as r:
                if r.status_code != 200 or not r.content:
                    r.failure(f"content: {r.status_code}")

    def record(self, rec: dict) -> None:
        with self.write_lock:
            with open(JOBS, "a") as f:
                f.write(json.dumps(rec) + "\n")
