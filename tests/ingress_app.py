"""The HTTP app alone, in this process, with no Ray and no model stage: for tests of what the
ingress itself answers (auth, throttles, limits, storage, headers). Its Generator is absent (the
`/health` page says so) and its dispatcher is not started: a job that is created stays queued."""

from __future__ import annotations

import contextlib
from pathlib import Path

import httpx

from conftest import tiny_app_args
from http_fixtures import http_ingress_args, make_local_user  # noqa: F401 - re-exported for the tests


class NoGenerator:
    """Stands where the Generator's handle would be; nothing here calls it."""


@contextlib.asynccontextmanager
async def ingress_only(tmp_path: Path, *, deployments: dict | None = None, models: list | None = None,
                       **ingress_overrides):
    """(service, httpx.AsyncClient) for the HTTP app over its own database in `tmp_path` (or `data_dir=`)."""
    from serve.api.routes import create_app
    from serve.config import AppArgs
    from serve.jobs.service import JobService

    data_dir = ingress_overrides.pop("data_dir", tmp_path)
    args = AppArgs.model_validate(tiny_app_args(name="ingress-only", with_ingress=True,
                                                ingress=http_ingress_args(data_dir, **ingress_overrides),
                                                **({"deployments": deployments} if deployments else {}),
                                                **({"models": models} if models else {})))
    service = JobService(args, NoGenerator())

    async def no_dispatching() -> None:  # nothing could run a job here: they stay queued
        return None
    service.dispatcher.start = no_dispatching
    app = create_app(service)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://local",
                                     timeout=60) as client:
            yield service, client
