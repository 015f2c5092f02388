"""`cinevivid up` / `cinevivid down`: run the stack on this machine.

`up` starts a Ray head node on a free port (or reuses the one it started before, or the cluster
given by --address), deploys serve_config.yaml (or --config), waits until `/health` says healthy and prints
the URL. Without --detach it stays in the foreground and stops everything it started on Ctrl-C;
with --detach it returns and leaves it running until `cinevivid down`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from serve.config import default_cache_dir
from serve.ops.serve_env import apply_serve_env, free_port

DEFAULT_CONFIG = "serve_config.yaml"


def _state_file() -> Path:
    return default_cache_dir() / "launcher.json"


def _ray_bin() -> str:
    cand = Path(sys.executable).parent / "ray"
    return str(cand) if cand.exists() else "ray"


def _reachable(address: str) -> bool:
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def _use_token(state: dict) -> None:
    """Ray 2.60 clusters require a token; a cluster `up` starts gets its own, kept with the state."""
    if state.get("token_path"):
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = state["token_path"]
        os.environ.pop("RAY_AUTH_TOKEN", None)


def _new_token() -> str:
    import secrets

    path = _state_file().with_name("ray_auth_token")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return str(path)


def _prepare_auth(address: str | None) -> None:
    """Before Ray is imported (it reads the auth settings then): point it at the token of the
    cluster `up` started, or at a fresh token for the cluster it is about to start. With an
    explicit --address, Ray's own defaults apply."""
    if address:
        return
    state = _read_state()
    if state.get("token_path") and state.get("address") and _reachable(state["address"]):
        _use_token(state)
    else:
        _use_token({"token_path": _new_token()})


def _init(address: str) -> None:
    import ray

    ray.init(address=address, logging_level="WARNING", log_to_driver=False)


def _connect(address: str | None, *, start_if_missing: bool, num_cpus: int | None) -> dict:
    """Connect to the cluster `up` started (its address is kept in the state file) or to an
    explicit `address`; never to some other cluster that happens to run on this machine. Starts
    a new head node on a free port when there is none. Returns the launcher state."""
    import ray

    state = _read_state()
    if ray.is_initialized():
        return state
    target = address or state.get("address")
    if target and not _reachable(target):
        if address or not start_if_missing:
            raise ConnectionError(f"no Ray cluster at {target}")
        target = None
    if target:
        try:
            _init(target)
            return state if not address else {**state, "address": address, "started_ray": False}
        except (ConnectionError, RuntimeError):
            if address or not start_if_missing:
                raise ConnectionError(f"no Ray cluster at {target}") from None
    elif not start_if_missing:
        raise ConnectionError("no cluster started by `cinevivid up` (pass --address to use another)")
    port = free_port()
    state = {"address": f"127.0.0.1:{port}", "started_ray": True, "token_path": os.environ["RAY_AUTH_TOKEN_PATH"]}
    # Our own temp dir: `ray start` records "the current cluster" there, and a plain `ray.init()`
    # elsewhere on this machine would otherwise connect to (or trip over) ours.
    temp_dir = f"/tmp/cinevivid-ray-{os.getuid()}"
    cmd = [_ray_bin(), "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}",
           "--disable-usage-stats", "--include-dashboard=false",
           # the stack's replicas ask for fractional CPUs; give small machines enough logical ones
           f"--num-cpus={num_cpus or max(os.cpu_count() or 1, 8)}"]
    print(f"starting a local Ray cluster: {' '.join(cmd[1:])}", file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    _init(state["address"])
    import ray._private.worker as worker

    state["session_dir"] = worker._global_node.get_session_dir_path()
    _write_state(state)
    return state


def _stop_cluster(session_dir: str) -> int:
    """Stop only the processes of our own cluster (their command lines name its session dir);
    `ray stop` would stop every Ray cluster on the machine."""
    import psutil

    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(session_dir in part for part in proc.info["cmdline"] or ()) and proc.pid != os.getpid():
                found[proc.pid] = proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    # and their children: the raylet's agents rename themselves (ray::DashboardAgent, ...) so their
    # command lines no longer name the session dir, and they outlive a terminated raylet
    for proc in list(found.values()):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            found.update((c.pid, c) for c in proc.children(recursive=True) if c.pid != os.getpid())
    procs = list(found.values())
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    return len(procs)


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


def up(config_path: str = DEFAULT_CONFIG, *, address: str | None = None, num_cpus: int | None = None,
       timeout_s: float = 600.0, replace: bool = False) -> str:
    apply_serve_env()  # before Ray starts: `ray start` below passes the environment on to the cluster
    _prepare_auth(address)
    from ray import serve

    from serve.ops.deploy import deploy_serve_config, load_serve_config

    config = load_serve_config(config_path)
    state = _connect(address, start_if_missing=True, num_cpus=num_cpus)
    _write_state({**state, "config": str(Path(config_path).resolve())})
    # Deploying a config file replaces every Serve app in the cluster; refuse to drop apps this
    # config does not name unless asked to.
    ours = {a["name"] for a in config.get("applications") or []}
    try:
        others = set(serve.status().applications) - ours
    except Exception:  # noqa: BLE001 - Serve not started yet
        others = set()
    if others and not replace:
        raise RuntimeError(f"this cluster runs other Serve apps {sorted(others)} that deploying {config_path} "
                           "would remove; pass --replace to do it anyway")
    print(f"deploying {config_path} ...", file=sys.stderr)
    deploy_serve_config(config, wait_timeout_s=timeout_s)
    url = service_url(config)
    wait_healthy(url, timeout_s)
    return url


def down(address: str | None = None) -> None:
    _prepare_auth(address)
    import ray
    from ray import serve

    try:
        state = _connect(address, start_if_missing=False, num_cpus=None)
    except ConnectionError as exc:
        print(f"nothing to stop: {exc}", file=sys.stderr)
        _state_file().unlink(missing_ok=True)
        return
    serve.shutdown()
    ray.shutdown()
    if state.get("started_ray") and state.get("session_dir"):
        n = _stop_cluster(state["session_dir"])
        print(f"stopped Serve and the Ray cluster cinevivid started ({n} processes)", file=sys.stderr)
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


# ---- command handlers (their parsers are in serve.ops.cli) ----
def cmd_up(args) -> int:
    try:
        url = up(args.config, address=args.address, num_cpus=args.num_cpus, timeout_s=args.timeout,
                 replace=args.replace)
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
    down(args.address)
    return 0


def cmd_down(args) -> int:
    down(args.address)
    return 0
