"""The same HTTP app and job service under bare uvicorn (no Serve proxy in front), driving the
Generator of a running CineVivid Serve app through its handle. For comparing Serve's HTTP path
with plain uvicorn, and for running the ingress outside Serve.

    python -m loadtests.bare --address 127.0.0.1:6379 --app cinevivid --port 8001 [--args args.yaml]

`--args` is a YAML/JSON file of AppArgs (the `args:` of serve_config.yaml); its `ingress:`
section configures this process (database, data dir, limits)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from serve.config import AppArgs


def build_bare_app(app_name: str, app_args: AppArgs | dict | None = None):
    from serve.jobs.generation_backend import GeneratorHandleBackend
    from serve.api.routes import create_app
    from serve.jobs.service import JobService

    args = app_args if isinstance(app_args, AppArgs) else AppArgs.model_validate(app_args or {"name": app_name})
    return create_app(JobService(args, GeneratorHandleBackend.for_app(app_name)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loadtests.bare")
    p.add_argument("--address", default="auto", help="the Ray cluster running the Serve app")
    p.add_argument("--app", default="cinevivid", help="the Serve app whose Generator to drive")
    p.add_argument("--args", default=None, help="AppArgs YAML/JSON (its `ingress:` configures this server)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    a = p.parse_args(argv)

    import ray
    import uvicorn

    args = {"name": a.app}
    if a.args:
        import yaml

        text = Path(a.args).read_text()
        args = (json.loads(text) if a.args.endswith(".json") else yaml.safe_load(text)) or args
    ray.init(address=a.address, log_to_driver=False, logging_level="WARNING")
    uvicorn.run(build_bare_app(a.app, args), host=a.host, port=a.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
