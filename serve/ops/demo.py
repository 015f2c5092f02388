"""`make run`: bring the stack up (detached), create a demo user and API key (printed), and
generate a sample video over HTTP with the CLI client.

    python -m serve.ops.demo --out out [--config serve_config.yaml] [--port PORT] [--dashboard-host HOST]
                             [--dashboard-port PORT] [--no-dashboard] [--debug]

The demo user's key is kept in CINEVIVID_CACHE_DIR (mode 600) and reused by the next `make run`
while the service still accepts it; only then is another minted. An error is one line on stderr
(`--debug`: the traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
from pathlib import Path

from serve.config import DEFAULT_CONFIG, default_cache_dir
from serve.ops.cli import build_parser, dashboard_args, debug_arg
from serve.ops.cli_errors import one_line

DEMO_KEY_FILE = "demo_api_key"


def _saved_key(user: str) -> str | None:
    path = default_cache_dir() / f"{DEMO_KEY_FILE}.{user}"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _save_key(user: str, key: str) -> None:
    path = default_cache_dir() / f"{DEMO_KEY_FILE}.{user}"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)


def _key_works(url: str, key: str) -> bool:
    import httpx

    return httpx.get(f"{url}/v1/videos", params={"limit": 1}, headers={"Authorization": f"Bearer {key}"},
                     timeout=30).status_code == 200


def demo_key(url: str, user: str) -> tuple[str, bool]:
    """The demo user's API key: the one saved by an earlier run while the service accepts it, else
    a new one (saved). Returns (key, reused)."""
    from serve.ops.admin import create_key

    key = _saved_key(user)
    if key and _key_works(url, key):
        return key, True
    key = asyncio.run(create_key(user, "demo"))["key"]
    _save_key(user, key)
    return key, False


def run(args: argparse.Namespace) -> int:
    from serve.errors import ConflictError
    from serve.ops.admin import add_user
    from serve.ops.launcher import dashboard_lines, dashboard_options, up
    from serve.runtime.cluster_record import read_state

    url = up(args.config, dashboard=dashboard_options(args), port=args.port, show_dashboard=False)
    password = secrets.token_urlsafe(12)
    try:
        asyncio.run(add_user(args.user, password))
        print(f"demo user:     {args.user} / {password}")
    except ConflictError:
        print(f"demo user:     {args.user} (exists; password unchanged)")
    key, reused = demo_key(url, args.user)
    print(f"service URL:   {url}")
    print(f"demo API key:  {key}{'  (kept from the last run)' if reused else ''}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "sample.mp4"
    gen = build_parser().parse_args(["generate", args.prompt, "-o", str(target), "--server", url,
                                     "--api-key", key, "--seed", "1"])
    code = gen.func(gen)
    if code == 0:
        print(f"sample video:  {target}")
        print(f"try:           export CINEVIVID_URL={url} CINEVIVID_API_KEY={key}; .venv/bin/cinevivid videos list")
        for line in dashboard_lines(read_state()):
            print(line)
        print("Ray jobs:      GeneratorClient.connect() (client/handle.py), or .venv/bin/cinevivid submit -- python "
              "my_job.py")
        print("logs, paths:   .venv/bin/cinevivid env   (and cinevivid logs)")
        print("stop with:     make stop   (or .venv/bin/cinevivid down)")
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="serve.ops.demo")
    p.add_argument("--out", default="out")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--port", type=int, default=None, metavar="PORT",
                   help="the HTTP port (default: the config's, 8000); `make run PORT=8001`")
    p.add_argument("--user", default="demo")
    p.add_argument("--prompt", default="a paper boat drifting down a rainy street, cinematic")
    dashboard_args(p)
    debug_arg(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line; --debug for the traceback
        if args.debug:
            raise
        print(f"error: {one_line(exc, args)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
