"""`cinevivid up` / `cinevivid down`: run the stack on this machine.

`up` connects to the local Ray cluster (starting one with `ray start --head` if none is
running), deploys serve_config.yaml (or --config), waits until `/health` says healthy and prints
the URL. Without --detach it stays in the foreground and stops everything it started on Ctrl-C;
with --detach it returns and leaves it running until `cinevivid down`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from serve.config import default_cache_dir

DEFAULT_CONFIG = "serve_config.yaml"


def _state_file() -> Path:
    return default_cache_dir() / "launcher.json"


def _ray_bin() -> str:
    cand = Path(sys.executable).parent / "ray"
    return str(cand) if cand.exists() else "ray"


def _connect(start_if_missing: bool, num_cpus: int | None) -> bool:
    """Connect this process to the local cluster. Returns True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    try:
        ray.init(address="auto", logging_level="WARNING", log_to_driver=False)
        return False
    except ConnectionError:
        if not start_if_missing:
            raise
    cmd = [_ray_bin(), "start", "--head", "--disable-usage-stats", "--include-dashboard=false"]
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
    print(f"starting a local Ray cluster: {' '.join(cmd[1:])}", file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    ray.init(address="auto", logging_level="WARNING", log_to_driver=False)
    return True


def service_url(config: dict) -> str:
    http = config.get("http_options") or {}
    host = http.get("host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    prefix = "/"
    for app in config.get("applications") or []:
        if app.get("import_path") == "serve.app:build_app":
            prefix = app.get("route_prefix") or "/"
            break
    return f"http://{host}:{http.get('port', 8000)}{prefix.rstrip('/')}"


def wait_healthy(url: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    last: dict | str = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/health", timeout=10)
            last = r.json()
            if r.status_code == 200 and last.get("status") == "healthy":
                return last
        except (httpx.HTTPError, ValueError) as exc:
            last = f"{type(exc).__name__}"
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not report healthy within {timeout_s:.0f}s; last: {last}")


def up(config_path: str = DEFAULT_CONFIG, *, detach: bool = True, num_cpus: int | None = None,
       timeout_s: float = 600.0) -> str:
    from serve.deploy import deploy_serve_config, load_serve_config

    config = load_serve_config(config_path)
    started = _connect(start_if_missing=True, num_cpus=num_cpus)
    state = {"started_ray": started, "config": str(Path(config_path).resolve())}
    prev = _read_state()
    state["started_ray"] = started or prev.get("started_ray", False)
    _write_state(state)
    print(f"deploying {config_path} ...", file=sys.stderr)
    deploy_serve_config(config, wait_timeout_s=timeout_s)
    url = service_url(config)
    wait_healthy(url, timeout_s)
    return url


def down() -> None:
    import ray
    from ray import serve

    state = _read_state()
    try:
        _connect(start_if_missing=False, num_cpus=None)
    except ConnectionError:
        print("no Ray cluster is running", file=sys.stderr)
        _state_file().unlink(missing_ok=True)
        return
    serve.shutdown()
    ray.shutdown()
    if state.get("started_ray", True):
        subprocess.run([_ray_bin(), "stop"], check=False, stdout=subprocess.DEVNULL)
        print("stopped Serve and the Ray cluster", file=sys.stderr)
    else:
        print("stopped Serve (the Ray cluster was not started by cinevivid; left running)", file=sys.stderr)
    _state_file().unlink(missing_ok=True)


def _read_state() -> dict:
    try:
        return json.loads(_state_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_state(state: dict) -> None:
    path = _state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state))


# ---- argparse ----
def _cmd_up(args) -> int:
    try:
        url = up(args.config, detach=args.detach, num_cpus=args.num_cpus, timeout_s=args.timeout)
    except Exception as exc:  # noqa: BLE001
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(url)
    sys.stdout.flush()
    if args.detach:
        print("running; `cinevivid down` stops it", file=sys.stderr)
        return 0
    print("serving; Ctrl-C stops it", file=sys.stderr)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        while not stop["now"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    down()
    return 0


def _cmd_down(args) -> int:
    down()
    return 0


def register(subparsers) -> None:
    u = subparsers.add_parser("up", help="start Ray if needed, deploy the Serve config, wait for /health")
    u.add_argument("--config", default=os.environ.get("CINEVIVID_SERVE_CONFIG", DEFAULT_CONFIG))
    u.add_argument("--detach", action="store_true", help="return once healthy, leaving it running")
    u.add_argument("--num-cpus", type=int, default=None, help="CPUs for a Ray cluster started here")
    u.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for healthy")
    u.set_defaults(func=_cmd_up)
    d = subparsers.add_parser("down", help="stop Serve (and the Ray cluster `up` started)")
    d.set_defaults(func=_cmd_down)
