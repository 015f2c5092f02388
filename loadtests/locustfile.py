"""Locust user classes for CineVivid's HTTP API — the real traffic mixes.

  CreatorUser   submits a video (POST /v1/videos, the tiny default workload), polls
                GET /v1/videos/{id} at the server's `openai-poll-after-ms` pace until it is done,
                then downloads the MP4 and the thumbnail.
  PollerUser    heavy status polling: a dashboard refreshing the status of known videos.
  BrowserUser   listing: pages through GET /v1/videos (limit/after), opens one, checks /health.

Auth: `Authorization: Bearer <API key>` from $CINEVIVID_API_KEY (loadtests/run_locust.py starts
a stack and makes a key when not given one). Other knobs from the environment:
CINEVIVID_LOCUST_STEPS (denoising steps per submitted video, default 4),
CINEVIVID_LOCUST_POLL_S (poll interval when the server gives none, default 0.5).

  locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 20 -r 5 -t 1m
  (add `,loadtests/locust_shape.py` to -f for the ramp/hold/spike load shape)
"""

from __future__ import annotations

import os
import random
import time

from locust import HttpUser, between, constant, task

API_KEY = os.environ.get("CINEVIVID_API_KEY", "")
STEPS = int(os.environ.get("CINEVIVID_LOCUST_STEPS", "4"))
POLL_S = float(os.environ.get("CINEVIVID_LOCUST_POLL_S", "0.5"))
MAX_WAIT_S = float(os.environ.get("CINEVIVID_LOCUST_MAX_WAIT_S", "300"))
PROMPTS = ["a red fox running through fresh snow", "a paper boat drifting down a rain gutter",
           "timelapse of clouds over a mountain lake", "a neon city street at night in the rain",
           "a hummingbird hovering near a flower, slow motion"]

# Route names, so Locust groups every id under one row.
R_CREATE, R_GET, R_CONTENT, R_THUMB, R_LIST, R_HEALTH = (
    "POST /v1/videos", "GET /v1/videos/{id}", "GET /v1/videos/{id}/content",
    "GET /v1/videos/{id}/content?variant=thumbnail", "GET /v1/videos", "GET /health")


class _ApiUser(HttpUser):
    abstract = True

    def on_start(self) -> None:
        self.client.headers["Authorization"] = f"Bearer {API_KEY}"

    def known_video_ids(self, limit: int = 20) -> list[str]:
        with self.client.get("/v1/videos", params={"limit": limit}, name=R_LIST, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"list: {r.status_code}")
                return []
            return [v["id"] for v in r.json().get("data", [])]


class CreatorUser(_ApiUser):
    """Submit -> poll -> download, then think for a while."""

    weight = 1
    wait_time = between(1, 3)

    @task
    def create_poll_download(self) -> None:
        body = {"prompt": random.choice(PROMPTS), "seed": random.randrange(2**31), "num_inference_steps": STEPS}
        with self.client.post("/v1/videos", json=body, name=R_CREATE, catch_response=True) as r:
            if r.status_code == 429 or r.status_code == 503:
                r.success()  # overload is a clear answer, counted in the status breakdown, not a failure
                return
            if r.status_code != 200:
                r.failure(f"create: {r.status_code} {r.text[:200]}")
                return
            video = r.json()
            poll_s = int(r.headers.get("openai-poll-after-ms", int(POLL_S * 1000))) / 1000
        deadline = time.monotonic() + MAX_WAIT_S
        while video["status"] in ("queued", "in_progress"):
            if time.monotonic() > deadline:
                return
            time.sleep(poll_s)
            with self.client.get(f"/v1/videos/{video['id']}", name=R_GET, catch_response=True) as r:
                if r.status_code != 200:
                    r.failure(f"status: {r.status_code}")
                    return
                video = r.json()
        if video["status"] != "completed":
            return
        with self.client.get(f"/v1/videos/{video['id']}/content", name=R_CONTENT, catch_response=True) as r:
            if r.status_code != 200 or not r.content:
                r.failure(f"content: {r.status_code}")
        self.client.get(f"/v1/videos/{video['id']}/content", params={"variant": "thumbnail"}, name=R_THUMB)


class PollerUser(_ApiUser):
    """Heavy status polling of known videos (a dashboard, a client polling too often)."""

    weight = 3
    wait_time = constant(0.05)

    def on_start(self) -> None:
        super().on_start()
        self.ids = self.known_video_ids()
        if not self.ids:  # nothing yet: make one so there is something to poll
            r = self.client.post("/v1/videos", json={"prompt": "a lighthouse at dusk", "num_inference_steps": STEPS},
                                 name=R_CREATE)
            if r.status_code == 200:
                self.ids = [r.json()["id"]]
        self.last_refresh = time.monotonic()

    @task
    def poll(self) -> None:
        if not self.ids or time.monotonic() - self.last_refresh > 10:
            self.ids = self.known_video_ids() or self.ids
            self.last_refresh = time.monotonic()
        if self.ids:
            self.client.get(f"/v1/videos/{random.choice(self.ids)}", name=R_GET)


class BrowserUser(_ApiUser):
    """Listing: page through the user's videos, open one, look at health."""

    weight = 1
    wait_time = between(0.5, 1.5)

    @task(4)
    def list_pages(self) -> None:
        after = None
        for _ in range(3):
            params = {"limit": 5, "order": "desc"}
            if after:
                params["after"] = after
            with self.client.get("/v1/videos", params=params, name=R_LIST, catch_response=True) as r:
                if r.status_code != 200:
                    r.failure(f"list: {r.status_code}")
                    return
                page = r.json()
            if not page.get("has_more") or not page.get("data"):
                break
            after = page["data"][-1]["id"]

    @task(2)
    def open_one(self) -> None:
        ids = self.known_video_ids(limit=5)
        if ids:
            self.client.get(f"/v1/videos/{random.choice(ids)}", name=R_GET)

    @task(1)
    def health(self) -> None:
        with self.client.get("/health", name=R_HEALTH, catch_response=True) as r:
            if r.status_code not in (200, 503):  # 503 = degraded/unhealthy, still an answer
                r.failure(f"health: {r.status_code}")
