"""`cinevivid up` / `cinevivid down`: run the stack on this machine.

`up` starts a Ray head node on a free port (or reuses the one it started before, or the cluster
given by --address), deploys serve_config.yaml (or --config), waits until `/health` says healthy and prints
the URL, and the Ray dashboard's with how to sign in to it with the cluster's token (the dashboard
is on and bound to 127.0.0.1 unless --dashboard-host / --no-dashboard say otherwise). Without
--detach it stays in the foreground and stops everything it started on Ctrl-C; with --detach it
returns and leaves it running until `cinevivid down`. What it started is recorded in
CINEVIVID_CACHE_DIR (serve.ops.cluster_record), for `down`, `cinevivid env` and
GeneratorClient.connect().
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from serve.config import DEFAULT_DASHBOARD_PORT, DashboardOptions
from serve.ops.cluster_record import TOKEN_NAME, reachable as _reachable, read_state as _read_state
from serve.ops.cluster_record import state_file as _state_file, use_token, write_state as _write_state
from serve.ops.serve_env import apply_serve_env, free_port

DEFAULT_CONFIG = "serve_config.yaml"
APP_IMPORT_PATH = "serve.app:build_app"


def _ray_bin() -> str:
    cand = Path(sys.executable).parent / "ray"
    return str(cand) if cand.exists() else "ray"


def _use_token(state: dict) -> None:
    """Ray 2.60 clusters require a token; a cluster `up` starts gets its own, kept with the state."""
    if state.get("token_path"):
        use_token(state["token_path"])


def _new_token() -> str:
    import secrets

    path = _state_file().with_name(TOKEN_NAME)
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


def _init(address: str) -> str:
    """Connect this driver; returns the cluster's dashboard URL ("" when it runs none)."""
    import ray

    ctx = ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    url = ctx.dashboard_url or ""
    return url if not url or "://" in url else f"http://{url}"


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def _dashboard_flags(dashboard: DashboardOptions) -> list[str]:
    """`ray start` flags for the dashboard: on, at the given host and port; without a port Ray's
    8265 when it is free, else a free one (`ray start` gives up on a taken port)."""
    if not dashboard.enabled:
        return ["--include-dashboard=false"]
    port = dashboard.port
    if port is None:
        bind = "127.0.0.1" if dashboard.host in ("localhost", "0.0.0.0", "::") else dashboard.host
        port = DEFAULT_DASHBOARD_PORT if _port_free(bind, DEFAULT_DASHBOARD_PORT) else free_port()
    return ["--include-dashboard=true", f"--dashboard-host={dashboard.host}", f"--dashboard-port={port}"]


def _connect(address: str | None, *, start_if_missing: bool, num_cpus: int | None,
             dashboard: DashboardOptions | None = None) -> dict:
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
            dashboard_url = _init(target)
            if address:
                return {**state, "address": address, "started_ray": False, "dashboard_url": dashboard_url}
            return {**state, "dashboard_url": dashboard_url}
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
           "--disable-usage-stats", *_dashboard_flags(dashboard or DashboardOptions()),
           # the stack's replicas ask for fractional CPUs; give small machines enough logical ones
           f"--num-cpus={num_cpus or max(os.cpu_count() or 1, 8)}"]
    print(f"starting a local Ray cluster: {' '.join(cmd[1:])}", file=sys.stderr)
    # Ray gives its dashboard 60 s to come up; its ten subprocess modules take longer than that on
    # a small, busy machine, and `ray start` then fails. A value already in the environment wins.
    env = {"RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300", **os.environ}
    if subprocess.run(cmd, stdout=subprocess.DEVNULL, env=env).returncode != 0:
        stopped = _stop_failed_start(port)
        raise RuntimeError(f"`ray start` failed (its error is above); stopped the {stopped} processes it had "
                           "started")
    state["dashboard_url"] = _init(state["address"])
    import ray._private.worker as worker

    state["session_dir"] = worker._global_node.get_session_dir_path()
    _write_state(state)
    return state


def _stop_failed_start(gcs_port: int) -> int:
    """Stop what a failed `ray start` left running (it does not clean up after itself: a GCS, a
    monitor, a dashboard...): the cluster whose GCS listens on our port."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or ()
            if f"--gcs_server_port={gcs_port}" in cmdline:
                for part in cmdline:
                    if part.startswith("--session-dir="):
                        return _stop_cluster(part.partition("=")[2], gcs_port)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return 0


def _names_our_gcs(part: str, gcs_port: int | None) -> bool:
    flag, _, value = part.partition("=")
    return gcs_port is not None and flag in ("--address", "--gcs-address", "--gcs_address") \
        and value.endswith(f":{gcs_port}")


def _stop_cluster(session_dir: str, gcs_port: int | None = None) -> int:
    """Stop only the processes of our own cluster (their command lines name its session dir, or
    its GCS address, like the Ray Client server's); `ray stop` would stop every Ray cluster on the
    machine."""
    import psutil

    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            ours = any(session_dir in part or _names_our_gcs(part, gcs_port) for part in proc.info["cmdline"] or ())
            if ours and proc.pid != os.getpid():
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
        if app.get("import_path") == APP_IMPORT_PATH:
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


def app_name(config: dict) -> str | None:
    """The name of the config's CineVivid application (the one GeneratorClient.connect() calls)."""
    for app in config.get("applications") or []:
        if app.get("import_path") == APP_IMPORT_PATH:
            return app.get("name") or "default"
    return None


def dashboard_lines(state: dict) -> list[str]:
    """Where the Ray dashboard is and how to sign in to it with the cluster's token."""
    url = state.get("dashboard_url")
    if not url:
        return ["Ray dashboard: off (`cinevivid up` starts it unless --no-dashboard)"]
    token = state.get("token_path")
    if not token:  # a cluster given by --address: its own token, wherever Ray keeps it
        return [f"Ray dashboard: {url}  (sign in with the cluster's token: `ray get-auth-token`)"]
    return [f"Ray dashboard: {url}",
            f"  sign in: paste the cluster's token (`cat {token}`) into the dashboard's sign-in box",
            f"  REST:    curl -H \"Authorization: Bearer $(cat {token})\" {url}/api/serve/applications/"]


def up(config_path: str = DEFAULT_CONFIG, *, address: str | None = None, num_cpus: int | None = None,
       timeout_s: float = 600.0, replace: bool = False, dashboard: DashboardOptions | None = None) -> str:
    """Start (or reuse) the cluster, deploy, wait for /health; returns the service's URL. The Ray
    dashboard options apply to a cluster this call starts."""
    apply_serve_env()  # before Ray starts: `ray start` below passes the environment on to the cluster
    _prepare_auth(address)
    from ray import serve

    from serve.ops.deploy import deploy_serve_config, load_serve_config

    config = load_serve_config(config_path)
    state = _connect(address, start_if_missing=True, num_cpus=num_cpus, dashboard=dashboard)
    state = {**state, "config": str(Path(config_path).resolve()), "app_name": app_name(config)}
    _write_state(state)
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
    for line in dashboard_lines(state):
        print(line, file=sys.stderr)
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
        n = _stop_cluster(state["session_dir"], int(state["address"].rpartition(":")[2]))
        print(f"stopped Serve and the Ray cluster cinevivid started ({n} processes)", file=sys.stderr)
    else:
        print("stopped Serve (the Ray cluster was not started by cinevivid; left running)", file=sys.stderr)
    _state_file().unlink(missing_ok=True)


# ---- command handlers (their parsers are in serve.ops.cli) ----
def cmd_up(args) -> int:
    try:
        url = up(args.config, address=args.address, num_cpus=args.num_cpus, timeout_s=args.timeout,
                 replace=args.replace, dashboard=dashboard_options(args))
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


def dashboard_options(args) -> DashboardOptions:
    """From the --dashboard-host / --dashboard-port / --no-dashboard flags (serve.ops.cli)."""
    return DashboardOptions(enabled=not args.no_dashboard, host=args.dashboard_host, port=args.dashboard_port)


def cmd_env(args) -> int:
    """`cinevivid env`: shell lines that point Ray (ray.init(), the ray CLI) at the stack's cluster."""
    from serve.errors import StackNotRunning
    from serve.ops.cluster_record import ray_env, recorded_stack

    try:
        state = recorded_stack()
    except StackNotRunning as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for key, value in ray_env(state).items():
        print(f"export {key}={shlex.quote(value)}")
    return 0
