"""Fixtures for the HTTP job service: the full app from `serve.app:build_app` (tiny model, with
the Ingress) deployed once as app "http" at route prefix "/", users and API keys made with the
admin CLI's functions against the same database, and an in-process variant of the HTTP app
(`local_service`) wired to the deployed Generator, for tests that need their own limits."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from conftest import HTTP_APP, TINY_MODELS, tiny_app_args

SMALL = {"ray_actor_options": {"num_cpus": 0.1}}
# the apps' http_front.body_idle_timeout_s: short, for the stalled-upload test (tests/test_stalled_upload.py)
BODY_IDLE_TIMEOUT_S = 4
# Test stacks deliver webhooks only to receivers on this machine (tests/webhook_receiver.py)
LOOPBACK_NETWORKS = ["127.0.0.0/8", "::1/128"]


def run_sync(coro):
    """Run a coroutine to completion from sync code, even inside a running event loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@dataclass
class HttpEnv:
    url: str
    data_dir: Path
    database_url: str

    def user(self, admin: bool = False) -> "UserCreds":
        from serve.ops.admin import add_user, create_key

        name = f"u{uuid.uuid4().hex[:10]}"
        password = uuid.uuid4().hex
        _while_locked(lambda: add_user(name, password, admin=admin, database_url=self.database_url))
        key = _while_locked(lambda: create_key(name, "test", database_url=self.database_url))
        return UserCreds(name, password, key["key"], key["id"])


def _while_locked(make_coro, timeout_s: float = 120.0):
    """Run an admin write against the test app's SQLite file, trying again while the running app
    holds the write lock past the busy timeout (a loaded CI box; there is no event to await)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return run_sync(make_coro())
        except Exception as exc:  # noqa: BLE001 - only "database is locked" is retried
            if "database is locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@dataclass
class UserCreds:
    username: str
    password: str
    api_key: str
    key_id: str

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"}


def http_ingress_args(data_dir: Path, **overrides) -> dict:
    ingress = {"data_dir": str(data_dir), "poll_after_ms": 50, "webhooks": {"allowed_networks": LOOPBACK_NETWORKS},
               "dispatcher": {"max_concurrent_jobs": 2, "lease_seconds": 3.0, "poll_interval_s": 0.2,
                              "progress_write_interval_s": 0.25},
               "limits": {"rate_limit_per_minute": 100000, "rate_limit_burst": 100000,
                          "max_concurrent_jobs_per_user": 100,
                          # every test client is 127.0.0.1: one address for the whole session
                          "failed_auth": {"login_failures_per_username": 1000, "login_failures_per_pair": 1000,
                                          "login_failures_per_address": 100000,
                                          "credential_failures_per_address": 100000}}}
    for k, v in overrides.items():
        ingress[k] = {**ingress.get(k, {}), **v} if isinstance(v, dict) else v
    return ingress


def deploy_http_app(name: str, data_dir: Path, http_url: str, ingress_deployment: dict | None = None,
                    levers: dict | None = None, **ingress_overrides) -> None:
    """Deploy the HTTP app as `name` (route prefix /name). `ingress_deployment` is laid over the
    Ingress's Serve options (e.g. {"num_replicas": 2}); `levers` over the default levers."""
    from ray import serve

    from serve.app import build_app

    args = tiny_app_args(name=name, with_ingress=True, ingress=http_ingress_args(data_dir, **ingress_overrides),
                         deployments={"ingress": {**SMALL, **(ingress_deployment or {})}, "image_encoder": SMALL},
                         **({"models": TINY_MODELS} if name == HTTP_APP else {}), **({"levers": levers} if levers else {}),
                         http_front={"body_idle_timeout_s": BODY_IDLE_TIMEOUT_S})
    serve.run(build_app(args), name=name, route_prefix=f"/{name}" if name != HTTP_APP else "/")


def wait_healthy(url: str, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.get(f"{url}/health", timeout=10)
            last = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
            if r.status_code == 200 and last.get("status") == "healthy":
                return last
        time.sleep(0.2)
    raise AssertionError(f"{url} never became healthy: {last}")


def deploy_session_http_app(ray_cluster: dict, session_dir: Path) -> HttpEnv:
    """Deploy the session's HTTP app once (conftest's `http_env` fixture) and wait until healthy."""
    data_dir = session_dir / "http-data"
    deploy_http_app(HTTP_APP, data_dir, ray_cluster["http_url"])
    wait_healthy(ray_cluster["http_url"])
    return HttpEnv(ray_cluster["http_url"], data_dir, f"sqlite+aiosqlite:///{data_dir / 'cinevivid.db'}")


@contextlib.contextmanager
def session_app_levers(http_env: HttpEnv, **levers):
    """The session app with its live levers (serve.config.LIVE_LEVERS) changed for the duration: a
    redeploy that only reconfigures the running replicas (their versions leave live levers out), then
    the defaults again. For tests that need other live levers, instead of an app of their own."""
    deploy_http_app(HTTP_APP, http_env.data_dir, http_env.url, levers=levers)
    try:
        yield
    finally:
        deploy_http_app(HTTP_APP, http_env.data_dir, http_env.url)


@pytest.fixture
def alice(http_env) -> UserCreds:
    return http_env.user()


@pytest.fixture
def bob(http_env) -> UserCreds:
    return http_env.user()


@pytest.fixture
def admin_user(http_env) -> UserCreds:
    return http_env.user(admin=True)


def wait_for_status(url: str, headers: dict, video_id: str, statuses: set[str], timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = httpx.get(f"{url}/v1/videos/{video_id}", headers=headers, timeout=10).json()
        if v.get("status") in statuses:
            return v
        time.sleep(0.05)
    raise AssertionError(f"video {video_id} never reached {statuses}: {v}")


@contextlib.asynccontextmanager
async def local_service(tmp_path: Path, generator_app: str = HTTP_APP, **ingress_overrides):
    """The same HTTP app in this process (its own database and limits; its data in `tmp_path`, or in
    a `data_dir=` override), driving the deployed Generator of app `generator_app` through a real
    Serve handle. Yields (service, httpx.AsyncClient)."""
    from serve.config import AppArgs
    from serve.jobs.generation_backend import GeneratorHandleBackend
    from serve.api.routes import create_app
    from serve.jobs.service import JobService

    data_dir = ingress_overrides.pop("data_dir", tmp_path)
    args = AppArgs.model_validate(tiny_app_args(name=HTTP_APP, with_ingress=True,
                                                ingress=http_ingress_args(data_dir, **ingress_overrides)))
    service = JobService(args, GeneratorHandleBackend.for_app(generator_app))
    app = create_app(service)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://local",
                                     timeout=60) as client:
            yield service, client


async def make_local_user(service, admin: bool = False) -> dict:
    from serve.api.auth import Authenticator

    auth = Authenticator(service.db, secret="-")  # users and keys need no JWT secret
    name = f"u{uuid.uuid4().hex[:10]}"
    user = await auth.create_user(name, "pw-" + name, "admin" if admin else "user")
    key = await auth.create_api_key(user["id"], "t")
    return {"Authorization": f"Bearer {key['key']}"}


async def wait_local(c, h, vid, statuses, timeout_s=120.0) -> dict:
    """Poll GET /v1/videos/{vid} on an in-process client until its status is one of `statuses`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = (await c.get(f"/v1/videos/{vid}", headers=h)).json()
        if v["status"] in statuses:
            return v
        await asyncio.sleep(0.05)
    raise AssertionError(f"{vid} never reached {statuses}: {v}")
