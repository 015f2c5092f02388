"""Deploying a Serve config file (serve_config.yaml or a preset in configs/) from Python, the way
`serve run CONFIG` does, plus the checks that a config is valid before anything starts."""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
from pathlib import Path
from typing import Any

import yaml

from serve.config import AppArgs

APP_IMPORT_PATH = "serve.app:build_app"


def load_serve_config(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f) or {}


def validate_serve_config(config: dict[str, Any]) -> dict[str, AppArgs]:
    """Validate the whole file with Serve's schema and each CineVivid app's `args` with AppArgs.
    Returns {app name: AppArgs}; raises pydantic.ValidationError naming the bad field."""
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    out = {}
    for app in schema.applications:
        if app.import_path == APP_IMPORT_PATH:
            out[app.name] = AppArgs.model_validate(app.args or {})
    return out


def build_application(app) -> Any:
    """The bound application of one `applications:` entry: its builder called with its `args`, and
    Serve's own per-deployment overrides of the entry (`deployments:`) laid over the builder's."""
    module, _, attr = app.import_path.partition(":")
    target = getattr(importlib.import_module(module), attr)
    overrides = {d.name: d.model_dump(exclude_unset=True, exclude={"name"}) for d in app.deployments or []}
    if app.import_path == APP_IMPORT_PATH:
        return target(app.args or {}, serve_overrides=overrides)
    if overrides:
        raise ValueError(f"application {app.name!r}: deployment overrides are only supported for {APP_IMPORT_PATH}")
    return target(app.args or {}) if callable(target) else target


def deploy_serve_config(config: dict[str, Any], wait_timeout_s: float | None = 300.0) -> list[str]:
    """Start Serve with the file's http/proxy options and deploy its applications (needs a
    connected Ray driver), through Serve's public API. Waits until every app is RUNNING unless
    `wait_timeout_s` is None."""
    from ray import serve
    from ray.serve import RunTarget
    from ray.serve.schema import ServeDeploySchema

    validate_serve_config(config)
    schema = ServeDeploySchema.model_validate(config)
    serve.start(proxy_location=schema.proxy_location, http_options=schema.http_options.model_dump(),
                grpc_options=schema.grpc_options.model_dump())
    # run_many connects to the Serve just started with these options, and Serve then says "New
    # http_options ... will not be applied" although they were: not said for our own start.
    with _without_reconnect_notice():
        serve.run_many([RunTarget(target=build_application(app), name=app.name, route_prefix=app.route_prefix)
                        for app in schema.applications], wait_for_applications_running=False)
    names = [app.name for app in schema.applications]
    if wait_timeout_s is not None:
        wait_for_apps(names, wait_timeout_s)
    return names


RECONNECT_NOTICE = "will not be applied"


@contextlib.contextmanager
def _without_reconnect_notice():
    """Drop Serve's "Connecting to existing Serve app ... will not be applied" log line meanwhile."""
    from ray.serve._private.constants import SERVE_LOGGER_NAME

    serve_logger = logging.getLogger(SERVE_LOGGER_NAME)
    def drop(record: logging.LogRecord) -> bool:
        return RECONNECT_NOTICE not in record.getMessage()

    serve_logger.addFilter(drop)
    try:
        yield
    finally:
        serve_logger.removeFilter(drop)


def wait_for_apps(names: list[str], timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {n: str(apps[n].status) if n in apps else "NOT_STARTED" for n in names}
        if all(s.endswith("RUNNING") for s in states.values()):
            return
        failed = {n: apps[n].message for n, s in states.items() if "FAILED" in s}
        if failed:
            raise RuntimeError(f"deploy failed: {failed}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"applications not running after {timeout_s}s: {states}")
        time.sleep(0.25)
