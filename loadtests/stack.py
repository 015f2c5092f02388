"""Start a local CineVivid stack for the benchmarks and load tests: a Ray cluster in this process,
Serve's HTTP proxy on a free port, the app from `serve.app:build_app` (tiny model on the CPU unless
the args say otherwise), a user with an API key. Everything lives under one temporary data dir.

    with local_stack(threads=2) as stack:
        print(stack.url, stack.api_key)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from client.http import iter_events
from serve.contracts import TERMINAL_STATUSES
from serve.ops.serve_env import apply_serve_env, free_port

APP = "cinevivid-bench"
SMALL = {"ray_actor_options": {"num_cpus": 0.1}}


def set_threads(threads: int) -> None:
    """Same intra-op thread count for torch here and in every replica (Ray would set 1 otherwise)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    apply_serve_env()  # before Ray starts: the same HTTP front (HAProxy) as `cinevivid up`
    import torch

    torch.set_num_threads(threads)


def run_sync(coro):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def app_args(data_dir: Path, name: str = APP, levers: dict | None = None, ingress: dict | None = None,
             with_ingress: bool = True, extra: dict | None = None) -> dict:
    ingress_cfg = {
        "data_dir": str(data_dir), "poll_after_ms": 50,
        # the shipped dispatcher defaults (poll 0.5 s, progress writes at most every 0.5 s), with
        # room for the Locust mixes' concurrent jobs
        "dispatcher": {"max_concurrent_jobs": 4},
        "limits": {"rate_limit_per_minute": 10_000_000, "rate_limit_burst": 1_000_000,
                   "max_concurrent_jobs_per_user": 1000},
    }
    for k, v in (ingress or {}).items():
        ingress_cfg[k] = {**ingress_cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return {
        "name": name, "with_ingress": with_ingress,
        # small CPU shares; the ingress and generator keep their production concurrency (a dict here
        # replaces DeploymentsConfig's defaults, which would drop the ingress to 4 ongoing requests)
        "deployments": {**{k: dict(SMALL) for k in ("text_encoder", "transformer", "vae", "tts")},
                        "generator": {**SMALL, "max_ongoing_requests": 16},
                        "ingress": {**SMALL, "max_ongoing_requests": 256, "max_queued_requests": 512}},
        "tts": {"providers": ["none"]},
        "levers": levers or {},
        "ingress": ingress_cfg,
        **(extra or {}),  # any other AppArgs field (e.g. chaos_delay_s for loadtests/chaos.py)
    }


def wait_healthy(url: str, timeout_s: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            r = httpx.get(f"{url}/health", timeout=10)
            last = r.json()
            if r.status_code == 200 and last.get("status") == "healthy":
                return last
        time.sleep(0.3)
    raise RuntimeError(f"{url} never became healthy: {last}")


def make_user(database_url: str, admin: bool = False) -> str:
    """A new user and API key in the stack's database; returns the key."""
    from serve.ops.admin import add_user, create_key

    name = f"bench{uuid.uuid4().hex[:8]}"
    run_sync(add_user(name, uuid.uuid4().hex, admin=admin, database_url=database_url))
    return run_sync(create_key(name, "bench", database_url=database_url))["key"]


@dataclass
class Stack:
    url: str
    app: str
    data_dir: Path
    database_url: str
    api_key: str
    args: dict
    ray_address: str

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"}


@contextlib.contextmanager
def local_stack(threads: int = 2, levers: dict | None = None, ingress: dict | None = None,
                num_cpus: int = 16, data_dir: Path | None = None, extra_args: dict | None = None) -> Iterator[Stack]:
    set_threads(threads)
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.pipeline.loading import tiny_model_path
    from serve.pipeline.tiny_model import make_tiny_model

    make_tiny_model(tiny_model_path())  # once, before the replicas race for it
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="cinevivid-bench-")
        data_dir = Path(tmp.name)
    args = app_args(data_dir, levers=levers, ingress=ingress, extra=extra_args)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=500_000_000)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name=APP, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        database_url = f"sqlite+aiosqlite:///{data_dir / 'cinevivid.db'}"
        yield Stack(url=url, app=APP, data_dir=data_dir, database_url=database_url,
                    api_key=make_user(database_url), args=args, ray_address=ray.get_runtime_context().gcs_address)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()


def wait_video(client: httpx.Client, video_id: str, poll_s: float = 0.01, timeout_s: float = 600.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = client.get(f"/v1/videos/{video_id}").json()
        if v.get("status") in TERMINAL_STATUSES:
            return v
        time.sleep(poll_s)
    raise TimeoutError(f"video {video_id} not done after {timeout_s}s")


def wait_video_sse(client: httpx.Client, video_id: str, timeout_s: float = 600.0) -> dict:
    """Follow GET /v1/videos/{id}/events until a terminal status event (no polling load)."""
    last: dict = {}
    for kind, data in iter_events(client, video_id, timeout=timeout_s):
        if kind == "status":
            last = data
    if last.get("status") in TERMINAL_STATUSES:
        return last
    return client.get(f"/v1/videos/{video_id}").json()


def http_generate(client: httpx.Client, body: dict, wait: str = "sse", poll_s: float = 0.05) -> tuple[dict, bytes]:
    """Submit -> wait until completed (SSE events, or polling GET /v1/videos/{id}) -> download the MP4."""
    r = client.post("/v1/videos", json=body)
    r.raise_for_status()
    vid = r.json()["id"]
    v = wait_video_sse(client, vid) if wait == "sse" else wait_video(client, vid, poll_s=poll_s)
    if v.get("status") != "completed":
        raise RuntimeError(f"video {vid} failed: {v.get('error')}")
    content = client.get(f"/v1/videos/{vid}/content")
    content.raise_for_status()
    return v, content.content
