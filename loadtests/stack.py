"""Start a local CineVivid stack for the benchmarks and load tests the way `cinevivid up` runs it:
serve_config.yaml (or `config_path`), deployed by `serve.ops.deploy.deploy_serve_config` (what `up`
calls), the same Serve environment (HAProxy front), the same logical CPUs for Ray, and each stage's
torch threads from the config. What a benchmark must change is a deviation, printed when the stack
starts and kept in `Stack.deviations` (the benchmarks record it in their results):

- always: a free HTTP port (the config's may be taken by `make run`), a fresh temporary data dir (its
  own SQLite database), and Ray started in this process (`ray.init`) rather than by `ray start`;
- for load generators that use one API key: higher per-user limits (rate limit, concurrent jobs), the
  openai poll hint at 50 ms, and 4 dispatcher slots per ingress replica (2 shipped);
- only when asked: `levers`, `ingress` settings, other args (`extra_args`, e.g. chaos_delay_s),
  `threads` (torch threads of every model stage and of this process), `num_cpus` for Ray.

    with local_stack() as stack:
        print(stack.url, stack.api_key, stack.deviations)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx

from client.http import iter_events
from serve.contracts import TERMINAL_STATUSES
from serve.ops.serve_env import apply_own_serve_env, free_port, remove_haproxy_dir

CONFIG = Path(__file__).resolve().parent.parent / "serve_config.yaml"
APP_IMPORT_PATH = "serve.app:build_app"
MODEL_STAGES = ("text_encoder", "transformer", "vae")
# what load generators with one API key need: the shipped per-user limits would throttle them (a
# capacity run follows every job it submits with its own SSE stream). The dispatcher hands over what
# the deployment plan says, as under `cinevivid up`.
BENCH_INGRESS = {
    "poll_after_ms": 50,
    "limits": {"rate_limit_per_minute": 10_000_000, "rate_limit_burst": 1_000_000,
               "max_concurrent_jobs_per_user": 1000, "max_streams_per_user": 1000, "max_streams_total": 1000},
}


def set_threads(threads: int | None = None) -> int:
    """torch's intra-op threads in this process (an in-process baseline such as diffusers' pipeline):
    by default what a model stage gets by default (`serve.runtime.threads`: the node's cores on a
    CPU). The replicas take theirs from the config, not from this process."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    import torch

    from serve.runtime.threads import default_torch_threads

    threads = threads or default_torch_threads("cpu")
    torch.set_num_threads(threads)
    return threads


def run_sync(coro):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _changes(old: dict, new: dict) -> dict:
    """The leaves of `new` that differ from `old` (what a deviation line shows)."""
    out = {}
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(old.get(k), dict):
            if sub := _changes(old[k], v):
                out[k] = sub
        elif old.get(k) != v:
            out[k] = v
    return out


def _app(config: dict) -> dict:
    for app in config.get("applications") or []:
        if app.get("import_path") == APP_IMPORT_PATH:
            return app
    raise ValueError("the config deploys no CineVivid app")


def stack_config(data_dir: Path, port: int, *, config_path: str | Path = CONFIG, levers: dict | None = None,
                 ingress: dict | None = None, threads: int | None = None,
                 extra_args: dict | None = None) -> tuple[dict, list[str]]:
    """The Serve config `cinevivid up` would deploy from `config_path`, with the benchmark's
    deviations laid over it; returns (config, the deviations as sentences)."""
    from serve.ops.deploy import load_serve_config

    config = copy.deepcopy(load_serve_config(config_path))
    deviations: list[str] = []
    http = {"host": "127.0.0.1", **(config.get("http_options") or {})}
    deviations.append(f"http_options.port: {port} (config: {http.get('port', 8000)})")
    config["http_options"] = {**http, "port": port}
    args = _app(config).setdefault("args", {})
    ing = _merge(_merge(args.get("ingress") or {}, BENCH_INGRESS), ingress or {})
    ing["data_dir"] = str(data_dir)
    deviations.append(f"args.ingress: {_changes(args.get('ingress') or {}, ing)}")
    args["ingress"] = ing
    if levers:
        args["levers"] = {**(args.get("levers") or {}), **levers}
        deviations.append(f"args.levers: {levers}")
    for key, value in (extra_args or {}).items():  # any other AppArgs field (e.g. chaos_delay_s)
        args[key] = value
        deviations.append(f"args.{key}: {value}")
    if threads:
        deployments = args.setdefault("deployments", {})
        for stage in MODEL_STAGES:
            deployments[stage] = {**(deployments.get(stage) or {}), "torch_threads": threads}
        deviations.append(f"args.deployments.{{{','.join(MODEL_STAGES)}}}.torch_threads: {threads} "
                          "(config: default)")
    return config, deviations


def app_args(stack: "Stack", name: str, ingress: dict | None = None) -> dict:
    """The stack's app args for a second app next to it (its name and `ingress` changes printed)."""
    args = copy.deepcopy(stack.args)
    args["name"] = name
    if ingress:
        args["ingress"] = _merge(args.get("ingress") or {}, ingress)
    print(f"[stack] second app {name!r}: the stack's args with ingress {ingress or {}}", flush=True)
    return args


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
    deviations: list[str] = field(default_factory=list)

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"}


@contextlib.contextmanager
def local_stack(threads: int | None = None, levers: dict | None = None, ingress: dict | None = None,
                num_cpus: int | None = None, data_dir: Path | None = None,
                config_path: str | Path = CONFIG, extra_args: dict | None = None) -> Iterator[Stack]:
    """`threads`: torch threads of every model stage (None: the config's, i.e. the default)."""
    set_threads(threads)
    import ray

    from serve.config import AppArgs
    from serve.ops.deploy import deploy_serve_config
    from serve.pipeline.loading import tiny_model_path
    from serve.pipeline.tiny_model import make_tiny_model

    make_tiny_model(tiny_model_path())  # once, before the replicas race for it
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="cinevivid-bench-")
        data_dir = Path(tmp.name)
    port = free_port()
    config, deviations = stack_config(data_dir, port, config_path=config_path, levers=levers, ingress=ingress,
                                      threads=threads, extra_args=extra_args)
    app = _app(config)
    args = app["args"]
    # before Ray starts, as `up` does
    made_haproxy = apply_own_serve_env(front=AppArgs.model_validate(args).http_front)
    # `cinevivid up` starts Ray with this many logical CPUs (serve.ops.launcher)
    up_cpus = max(os.cpu_count() or 1, 8)
    deviations.append("Ray started in this process (ray.init), not by `ray start`"
                      + (f"; num_cpus={num_cpus} (cinevivid up: {up_cpus})" if num_cpus and num_cpus != up_cpus
                         else f"; num_cpus={up_cpus} as cinevivid up"))
    print(f"[stack] {config_path} as `cinevivid up` deploys it, except:", flush=True)
    for line in deviations:
        print(f"[stack]   {line}", flush=True)
    ray.init(address="local", num_cpus=num_cpus or up_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=500_000_000)
    try:
        from ray import serve

        deploy_serve_config(config, wait_timeout_s=600)
        url = f"http://127.0.0.1:{port}"
        route = app.get("route_prefix") or "/"
        wait_healthy(url + route.rstrip("/"))
        database_url = f"sqlite+aiosqlite:///{data_dir / 'cinevivid.db'}"
        yield Stack(url=url, app=app["name"], data_dir=data_dir, database_url=database_url,
                    api_key=make_user(database_url), args=args, ray_address=ray.get_runtime_context().gcs_address,
                    deviations=deviations)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        if made_haproxy:
            remove_haproxy_dir(made_haproxy)
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
