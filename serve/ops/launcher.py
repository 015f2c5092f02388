"""`cinevivid up` / `cinevivid down`: run the stack on this machine.

`up` starts a Ray head node on a free port (or reuses the one it started before, or the cluster
given by --address), deploys serve_config.yaml (or --config), waits until `/health` says healthy and prints
the URL, and the Ray dashboard's with how to sign in to it with the cluster's token (the dashboard
is on and bound to 127.0.0.1 unless --dashboard-host / --no-dashboard say otherwise). Without
--detach it stays in the foreground and stops everything it started on Ctrl-C; with --detach it
returns and leaves it running until `cinevivid down`. What it started is recorded in
CINEVIVID_CACHE_DIR (serve.runtime.cluster_record), for `down`, `cinevivid env` and
GeneratorClient.connect().
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from serve.config import DEFAULT_CONFIG, DEFAULT_DASHBOARD_PORT, DEFAULT_HOST, DEFAULT_HTTP_PORT, DashboardOptions
from serve.config import HTTPFrontConfig
from serve.runtime.cluster_record import TOKEN_NAME, reachable as _reachable, read_state as _read_state
from serve.runtime.cluster_record import state_file as _state_file, use_loopback_cluster, use_token
from serve.runtime.cluster_record import write_state as _write_state
from serve.errors import LaunchError, PortInUse
from serve.ops.serve_env import apply_own_serve_env, free_port, remove_haproxy_dir

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
    return _bind_error(host, port) is None


def _bind_error(host: str, port: int) -> OSError | None:
    """Why (host, port) cannot be bound now, or None. With SO_REUSEADDR, as the servers that take
    the port set it: a port whose last connections linger in TIME_WAIT (a stack just killed and
    started again) is free to them, and only a listener holds it."""
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return None
        except OSError as exc:
            return exc


def _dashboard_flags(dashboard: DashboardOptions, port: int | None = None) -> list[str]:
    """`ray start` flags for the dashboard: on, at the given host and port (`port`: the one picked
    by `_pick_dashboard_port`, picked here when not given)."""
    if not dashboard.enabled:
        return ["--include-dashboard=false"]
    return ["--include-dashboard=true", f"--dashboard-host={dashboard.host}",
            f"--dashboard-port={port or _pick_dashboard_port(dashboard)}"]


def _dashboard_bind_host(dashboard: DashboardOptions) -> str:
    return DEFAULT_HOST if dashboard.host in ("localhost", "0.0.0.0", "::") else dashboard.host


def _pick_dashboard_port(dashboard: DashboardOptions, taken: set[int] = frozenset()) -> int | None:
    """The dashboard's port: --dashboard-port as given, else Ray's 8265 when it is free, else a free
    one (several clusters can run on one machine). `taken`: ports lost to a race before."""
    if not dashboard.enabled:
        return None
    if dashboard.port is not None:
        return dashboard.port
    if DEFAULT_DASHBOARD_PORT not in taken and _port_free(_dashboard_bind_host(dashboard), DEFAULT_DASHBOARD_PORT):
        return DEFAULT_DASHBOARD_PORT
    return free_port()


# Ray's worker processes take their ports from this range (`ray start --min-worker-port/--max-worker-port`
# defaults); a port we ask Ray to bind there can be taken by any worker.
RAY_WORKER_PORTS = range(10002, 19999 + 1)


def check_port_choice(port: int | None, flag: str) -> None:
    """One line, before anything starts, for a port Ray's workers may take."""
    if port is not None and port in RAY_WORKER_PORTS:
        raise LaunchError(f"{flag} {port} is inside Ray's worker port range ({RAY_WORKER_PORTS.start}-"
                          f"{RAY_WORKER_PORTS.stop - 1}), where any Ray worker may take it; pick a port outside it")


def port_holder(port: int) -> str:
    """Who listens on TCP `port`, as far as this user may know: "pid 123 (python3 -m http.server)",
    else "" (another user's process, or nothing)."""
    import psutil

    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return ""
    for conn in conns:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            try:
                proc = psutil.Process(conn.pid)
                cmd = " ".join(proc.cmdline()) or proc.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                return f"pid {conn.pid}"
            return f"pid {conn.pid} ({cmd if len(cmd) <= 80 else cmd[:77] + '...'})"
    return ""


def ray_temp_dir(cache_dir: str | Path | None = None) -> str:
    """Ray's temp dir for the cluster of this CINEVIVID_CACHE_DIR: `ray start` records "the current
    cluster" there, so two stacks with different cache dirs must not share one. Short, because
    Ray's unix sockets live under it (session_<date>_<pid>/sockets/plasma_store, and a socket
    path has at most 107 bytes)."""
    key = str(Path(cache_dir or _state_file().parent).expanduser().resolve())
    return f"/tmp/cvray-{os.getuid()}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _network_flags(node_ip_address: str | None, ports: dict[str, int]) -> list[str]:
    """`ray start` flags for where the cluster listens. By default on 127.0.0.1 only: with Ray's
    single-machine mode (LOOPBACK_ENV in the environment: the mode Ray uses on macOS and Windows)
    every Ray process (GCS, raylet, agents, workers' gRPC servers, the Ray
    Client server) bind to the loopback address, and no other node can join. With an address, the
    cluster is reachable there so other nodes can join; Ray's processes then listen on every
    interface, and only the cluster's token guards them. `ports`: flag -> the port picked for it."""
    return [f"--node-ip-address={node_ip_address or DEFAULT_HOST}", *(f"{flag}={port}" for flag, port in ports.items())]


START_ATTEMPTS = 3  # `ray start` again with other ports when one it was given is taken meanwhile
WATCH_INTERVAL_S = 1.0


def _ray_start(dashboard: DashboardOptions, node_ip_address: str | None, num_cpus: int | None) -> int:
    """Start the head node with `ray start`; returns its GCS port. Ports are picked free and only
    bound later by Ray's processes, so another process (another stack, a test) may take one in
    between: `ray start` is watched, and when one of its ports is taken by a process not of this
    cluster it is stopped within a second or two and started again with fresh ports (a port given
    by --dashboard-port is not swapped: that is a one-line error)."""
    lost: set[int] = set()
    if dashboard.enabled and dashboard.port is not None:
        error = _bind_error(_dashboard_bind_host(dashboard), dashboard.port)
        if error is not None and error.errno == errno.EADDRINUSE:  # (another error: Ray's to report)
            raise _port_in_use(dashboard.port, dashboard.host, "--dashboard-port")
    # Ray gives its dashboard 60 s to come up; its ten subprocess modules take longer than that on
    # a small, busy machine, and `ray start` then fails. A value already in the environment wins.
    env = {"RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300", **os.environ, CLUSTER_MARK_ENV: ray_temp_dir()}
    for attempt in range(1, START_ATTEMPTS + 1):
        gcs_port = free_port()
        dashboard_port = _pick_dashboard_port(dashboard, lost)
        ports = {"--port": gcs_port, "--ray-client-server-port": free_port(),
                 "--dashboard-agent-listen-port": free_port()}
        # Our own temp dir, one per cache dir: `ray start` records "the current cluster" there, and
        # a plain `ray.init()` elsewhere on this machine, or a second stack, would otherwise connect
        # to (or trip over) ours.
        cmd = [_ray_bin(), "start", "--head", f"--temp-dir={ray_temp_dir()}", "--disable-usage-stats",
               *_dashboard_flags(dashboard, dashboard_port), *_network_flags(node_ip_address, ports),
               # the stack's replicas ask for fractional CPUs; give small machines enough logical ones
               f"--num-cpus={num_cpus or max(os.cpu_count() or 1, 8)}"]
        print(f"starting a local Ray cluster: {' '.join(cmd[1:])}", file=sys.stderr)
        watched = {**ports, **({"--dashboard-port": dashboard_port} if dashboard_port else {})}
        code, lost_flag, output = _run_watched(cmd, env, watched)
        if code == 0:
            return gcs_port
        stopped = _stop_failed_start(gcs_port)
        if lost_flag is None:
            raise LaunchError(f"`ray start` failed: {_last_error(output)} (stopped the {stopped} processes it had "
                              f"started; its whole output: {output})")
        port = watched[lost_flag]
        if lost_flag == "--dashboard-port" and dashboard.port is not None:
            raise _port_in_use(port, dashboard.host, "--dashboard-port")
        lost.add(port)
        holder = port_holder(port)
        print(f"port {port} ({lost_flag}) was taken while Ray started{f' by {holder}' if holder else ''}; "
              f"starting again with other ports ({attempt}/{START_ATTEMPTS})", file=sys.stderr)
    raise LaunchError(f"`ray start` lost a port to another process {START_ATTEMPTS} times in a row; try again")


def _port_in_use(port: int, host: str, flag: str) -> PortInUse:
    holder = port_holder(port)
    return PortInUse(f"port {port} on {host} is in use{f' by {holder}' if holder else ''}; pick another with "
                     f"{flag} PORT")


def _run_watched(cmd: list[str], env: dict, ports: dict[str, int]) -> tuple[int, str | None, str]:
    """Run `ray start`, its output to a file; stop it as soon as a process outside this cluster
    listens on one of `ports`. Returns (exit status, the flag of the port lost or None, the output
    file)."""
    import tempfile

    fd, output = tempfile.mkstemp(prefix="cv-ray-start-", suffix=".log")
    with os.fdopen(fd, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        lost, unknown = None, {}
        while True:
            try:
                code = proc.wait(timeout=WATCH_INTERVAL_S)
                break
            except subprocess.TimeoutExpired:
                lost = _foreign_listener(ports, unknown)
                if lost is not None:
                    proc.terminate()
                    code = proc.wait()
                    break
    if code != 0 and lost is None:
        lost = _foreign_listener(ports, {flag: UNKNOWN_OWNER_POLLS for flag in ports})
    if code == 0 or lost is not None:
        os.unlink(output)
    return code, lost, output


UNKNOWN_OWNER_POLLS = 3  # a listener with no visible process, seen this many times in a row, is foreign


def _foreign_listener(ports: dict[str, int], unknown: dict[str, int]) -> str | None:
    """The flag of the first of `ports` a process not of this cluster listens on, else None. A
    listener whose process cannot be seen (another user's; or one of ours caught between creating
    the socket and psutil's scan of /proc) counts once seen UNKNOWN_OWNER_POLLS times in a row
    (`unknown`: flag -> times so far, kept by the caller)."""
    import psutil

    wanted = {port: flag for flag, port in ports.items()}
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    for conn in conns:
        if conn.status != psutil.CONN_LISTEN or not conn.laddr or conn.laddr.port not in wanted:
            continue
        flag = wanted[conn.laddr.port]
        if conn.pid is None:
            unknown[flag] = unknown.get(flag, 0) + 1
            if unknown[flag] >= UNKNOWN_OWNER_POLLS:
                return flag
            continue
        unknown.pop(flag, None)
        try:
            proc = psutil.Process(conn.pid)
            cmdline = proc.cmdline()
            environ = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        # ours: started with our mark, or its command line names our temp dir (the session dir in it)
        if environ.get(CLUSTER_MARK_ENV) != ray_temp_dir() and not any(ray_temp_dir() in part for part in cmdline):
            return flag
    return None


def _last_error(output: str) -> str:
    """The last line of `ray start`'s output that says what went wrong."""
    try:
        lines = [line.strip() for line in Path(output).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no output"
    errors = [line for line in lines if "Error" in line or "error" in line or "failed" in line.lower()]
    return (errors or lines or ["no output"])[-1]


def _join_or_start_cluster(address: str | None, *, start_if_missing: bool, num_cpus: int | None,
                           dashboard: DashboardOptions | None = None, node_ip_address: str | None = None) -> dict:
    """Connect to the cluster `up` started (its address is kept in the state file) or to an
    explicit `address`; never to some other cluster that happens to run on this machine. Starts
    a new head node on a free port when there is none and `start_if_missing`. Returns the launcher
    state."""
    import ray

    state = _read_state()
    if ray.is_initialized():
        return state
    target = address or state.get("address")
    if not address and state.get("loopback"):
        use_loopback_cluster()
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
    host = node_ip_address or DEFAULT_HOST
    state = {"started_ray": True, "token_path": os.environ["RAY_AUTH_TOKEN_PATH"],
             "loopback": not node_ip_address, "ray_temp_dir": ray_temp_dir(),
             "haproxy_dir": os.path.dirname(os.environ.get("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "")) or None}
    if state["loopback"]:
        use_loopback_cluster()  # `ray start` below and this driver
    state["address"] = f"{host}:{_ray_start(dashboard or DashboardOptions(), node_ip_address, num_cpus)}"
    state["dashboard_url"] = _init(state["address"])
    import ray._private.worker as worker

    state["session_dir"] = worker._global_node.get_session_dir_path()
    _write_state(state)
    return {**state, "started_now": True}


# In the environment of every process of a cluster `up` starts (Ray passes it on to all of them):
# its Ray temp dir, so `down` finds them all, whatever they renamed themselves to
CLUSTER_MARK_ENV = "CINEVIVID_RAY_CLUSTER"


def _stop_failed_start(gcs_port: int) -> int:
    """Stop what a failed `ray start` left running (it does not clean up after itself: a GCS, a
    monitor, a dashboard, the Ray Client server...)."""
    session_dir = None
    for proc in _iter_procs():
        cmdline = proc.info["cmdline"] or ()
        if f"--gcs_server_port={gcs_port}" in cmdline:
            session_dir = next((part.partition("=")[2] for part in cmdline if part.startswith("--session-dir=")),
                               None)
    return _stop_cluster(session_dir, gcs_port, mark=ray_temp_dir())


def _iter_procs():
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid != os.getpid():
            yield proc


def _names_our_gcs(part: str, gcs_port: int | None) -> bool:
    flag, _, value = part.partition("=")
    return gcs_port is not None and flag in ("--address", "--gcs-address", "--gcs_address") \
        and value.endswith(f":{gcs_port}")


def _ours(proc, session_dir: str | None, gcs_port: int | None, mark: str | None) -> bool:
    import psutil

    try:
        if any((session_dir and session_dir in part) or _names_our_gcs(part, gcs_port)
               for part in proc.info["cmdline"] or ()):
            return True
        return bool(mark) and proc.environ().get(CLUSTER_MARK_ENV) == mark
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _stop_cluster(session_dir: str | None, gcs_port: int | None = None, mark: str | None = None) -> int:
    """Stop only the processes of our own cluster: their command lines name its session dir or its
    GCS address (like the Ray Client server's), or their environment carries its mark; and their
    children (the raylet's agents rename themselves, and outlive a terminated raylet). `ray stop`
    would stop every Ray cluster on the machine. Looks again after each round: a process being
    started as the scan ran (a failed `ray start` is still starting some) is caught by the next."""
    import psutil

    stopped: set[int] = set()
    for _ in range(3):
        found = {proc.pid: proc for proc in _iter_procs() if proc.pid not in stopped
                 and _ours(proc, session_dir, gcs_port, mark)}
        for proc in list(found.values()):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                found.update((c.pid, c) for c in proc.children(recursive=True) if c.pid != os.getpid())
        if not found:
            break
        stop_processes(list(found.values()))
        stopped.update(found)
    return len(stopped)


def stop_processes(procs: list, timeout_s: float = 10) -> None:
    """SIGTERM each of `procs` (psutil.Process), then SIGKILL those still alive after `timeout_s`."""
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=timeout_s)


def service_url(config: dict) -> str:
    http = config.get("http_options") or {}
    host = http.get("host", DEFAULT_HOST)
    host = DEFAULT_HOST if host in ("0.0.0.0", "::") else host
    prefix = "/"
    for app in config.get("applications") or []:
        if app.get("import_path") == APP_IMPORT_PATH:
            prefix = app.get("route_prefix") or "/"
            break
    return f"http://{host}:{http.get('port', DEFAULT_HTTP_PORT)}{prefix.rstrip('/')}"


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


def _http_options(config: dict, port: int | None, host: str | None) -> dict:
    """The config with --port / --host laid over its http_options; with no host anywhere,
    127.0.0.1 (Serve's own default with HAProxy is every interface)."""
    http = {"host": DEFAULT_HOST, **(config.get("http_options") or {})}
    if port is not None:
        http["port"] = port
    if host is not None:
        http["host"] = host
    return {**config, "http_options": http}


def _check_http_port(config: dict, config_path: str) -> None:
    http = config.get("http_options") or {}
    host, port = http.get("host", DEFAULT_HOST), int(http.get("port", DEFAULT_HTTP_PORT))
    check_port_choice(port, "--port")
    if not _port_free("" if host in ("0.0.0.0", "::") else host, port):
        holder = port_holder(port)
        raise PortInUse(f"port {port} on {host} is in use{f' by {holder}' if holder else ''}; pick another "
                        f"with --port PORT (`make run PORT=...`, `cinevivid up --port ...`)")


def _front_config(config: dict) -> HTTPFrontConfig:
    """The HAProxy settings (`args.http_front`) of the config's CineVivid app, else the defaults."""
    from serve.config import AppArgs

    for app in config.get("applications") or []:
        if app.get("import_path") == APP_IMPORT_PATH:
            return AppArgs.model_validate(app.get("args") or {}).http_front
    return HTTPFrontConfig()


def _will_start_ray(address: str | None) -> bool:
    state = _read_state()
    return not address and not (state.get("address") and _reachable(state["address"]))


def up(config_path: str = DEFAULT_CONFIG, *, address: str | None = None, num_cpus: int | None = None,
       timeout_s: float = 600.0, replace: bool = False, dashboard: DashboardOptions | None = None,
       port: int | None = None, host: str | None = None, node_ip_address: str | None = None,
       show_dashboard: bool = True) -> str:
    """Start (or reuse) the cluster, deploy, wait for /health; returns the service's URL. The Ray
    dashboard and network options apply to a cluster this call starts. If something fails after
    this call started a cluster, it stops that cluster and removes its HAProxy folder before
    raising. `show_dashboard`: print where the dashboard is (`make run` prints it at its end)."""
    from serve.ops.deploy import deploy_serve_config, load_serve_config

    config = _http_options(load_serve_config(config_path), port, host)
    if _will_start_ray(address):  # before anything starts
        check_port_choice((dashboard or DashboardOptions()).port, "--dashboard-port")
        _check_http_port(config, config_path)
    # before Ray starts: `ray start` below passes the environment on to the cluster
    made_haproxy = apply_own_serve_env(front=_front_config(config))
    _prepare_auth(address)
    from ray import serve

    try:
        state = _join_or_start_cluster(address, start_if_missing=True, num_cpus=num_cpus, dashboard=dashboard,
                                       node_ip_address=node_ip_address)
    except BaseException:
        if made_haproxy:  # this call made it for the cluster it could not start
            remove_haproxy_dir(made_haproxy)
        raise
    started_now = state.pop("started_now", False)
    if made_haproxy and not started_now:  # a running cluster was reused: its HAProxy has its own folder
        remove_haproxy_dir(made_haproxy)
    try:
        state = {**state, "config": str(Path(config_path).resolve()), "app_name": app_name(config),
                 "http_port": int(config["http_options"].get("port", DEFAULT_HTTP_PORT))}
        _write_state(state)
        # Deploying a config file replaces every Serve app in the cluster; refuse to drop apps this
        # config does not name unless asked to.
        ours = {a["name"] for a in config.get("applications") or []}
        try:
            others = set(serve.status().applications) - ours
        except Exception:  # noqa: BLE001 - Serve not started yet
            others = set()
        if others and not replace:
            raise LaunchError(f"this cluster runs other Serve apps {sorted(others)} that deploying {config_path} "
                               "would remove; pass --replace to do it anyway")
        from serve.ops.plan import check_cluster_fits

        check_cluster_fits(config)  # a config that cannot be placed is refused now, not left pending
        print(f"deploying {config_path} ...", file=sys.stderr)
        # this driver's Serve INFO lines ("Started Serve ...", "Deployed app ...") say what `up` says
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        deploy_serve_config(config, wait_timeout_s=timeout_s)
        url = service_url(config)
        wait_healthy(url, timeout_s)
    except BaseException:
        if started_now:
            n = _stop_started(state)
            print(f"`up` failed: stopped the Ray cluster it had started ({n} processes)", file=sys.stderr)
        raise
    if show_dashboard:
        for line in dashboard_lines(state):
            print(line, file=sys.stderr)
    return url


def start_local_cluster(num_cpus: int | None = None, dashboard: DashboardOptions | None = None) -> dict:
    """Start a Ray head node the way `up` does (loopback only, its own token and temp dir, no usage
    statistics, every process marked for `stop_local_cluster`) and connect this driver to it;
    deploys nothing. Set CINEVIVID_CACHE_DIR (where the record goes) and apply_serve_env() first.
    The test suite's session cluster is started with it. Returns the launcher state."""
    _prepare_auth(None)
    state = _join_or_start_cluster(None, start_if_missing=True, num_cpus=num_cpus,
                     dashboard=dashboard or DashboardOptions(enabled=False))
    state.pop("started_now", None)
    return state


def stop_local_cluster() -> int:
    """Stop the cluster `start_local_cluster` (or `up`) recorded in CINEVIVID_CACHE_DIR: every one of
    its processes, HAProxy included. Returns the number stopped."""
    state = _read_state()
    return _stop_started(state) if state.get("started_ray") and state.get("address") else 0


def _stop_started(state: dict) -> int:
    """Stop the Ray cluster (and Serve in it) that `up` started, forget it and remove its HAProxy
    folder. Returns the number of processes stopped."""
    import ray

    ray.shutdown()
    n = _stop_cluster(state.get("session_dir"), int(state["address"].rpartition(":")[2]),
                      mark=state.get("ray_temp_dir"))
    remove_haproxy_dir(state.get("haproxy_dir"))
    _state_file().unlink(missing_ok=True)
    return n


def down(address: str | None = None) -> None:
    _prepare_auth(address)
    import ray
    from ray import serve

    try:
        state = _join_or_start_cluster(address, start_if_missing=False, num_cpus=None)
    except ConnectionError as exc:
        print(f"nothing to stop: {exc}", file=sys.stderr)
        _state_file().unlink(missing_ok=True)
        return
    serve.shutdown()
    ray.shutdown()
    if state.get("started_ray") and state.get("session_dir"):
        n = _stop_started(state)
        print(f"stopped Serve and the Ray cluster cinevivid started ({n} processes)", file=sys.stderr)
    else:
        print("stopped Serve (the Ray cluster was not started by cinevivid; left running)", file=sys.stderr)
    _state_file().unlink(missing_ok=True)


# ---- command handlers (their parsers are in serve.ops.cli) ----
def cmd_up(args) -> int:
    url = up(args.config, address=args.address, num_cpus=args.num_cpus, timeout_s=args.timeout,
             replace=args.replace, dashboard=dashboard_options(args), port=args.port, host=args.host,
             node_ip_address=args.node_ip_address)  # an error: one line, by serve.ops.cli.main
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
