"""`make run`: bring the stack up (detached), create a demo user and API key (printed), and
generate a sample video over HTTP with the CLI client.

    python -m serve.ops.demo --out out [--config serve_config.yaml] [--dashboard-host HOST]
                             [--dashboard-port PORT] [--no-dashboard]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from pathlib import Path

from serve.ops.admin import add_user, create_key
from serve.ops.cli import build_parser, dashboard_args
from serve.errors import ConflictError
from serve.runtime.cluster_record import read_state
from serve.ops.launcher import DEFAULT_CONFIG, dashboard_lines, dashboard_options, up


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="serve.ops.demo")
    p.add_argument("--out", default="out")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--user", default="demo")
    p.add_argument("--prompt", default="a paper boat drifting down a rainy street, cinematic")
    dashboard_args(p)
    args = p.parse_args(argv)

    url = up(args.config, dashboard=dashboard_options(args))
    password = secrets.token_urlsafe(12)
    try:
        asyncio.run(add_user(args.user, password))
        print(f"demo user:     {args.user} / {password}")
    except ConflictError:
        print(f"demo user:     {args.user} (exists; password unchanged)")
    key = asyncio.run(create_key(args.user, "demo"))["key"]
    print(f"service URL:   {url}")
    print(f"demo API key:  {key}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "sample.mp4"
    gen = build_parser().parse_args(["generate", args.prompt, "-o", str(target), "--server", url,
                                     "--api-key", key, "--seed", "1"])
    code = gen.func(gen)
    if code == 0:
        print(f"sample video:  {target}")
        print(f"try:           CINEVIVID_URL={url} CINEVIVID_API_KEY={key} .venv/bin/cinevivid videos list")
        for line in dashboard_lines(read_state()):
            print(line)
        print("Ray jobs:      GeneratorClient.connect() (client/handle.py), or eval \"$(.venv/bin/cinevivid env)\"")
        print("stop with:     make stop   (or .venv/bin/cinevivid down)")
    return code


if __name__ == "__main__":
    sys.exit(main())
