"""The suite's own Ray cluster is started the way `cinevivid up` starts one, so nothing of a test
run is reachable from, or reaches, outside this machine: every socket of the cluster (GCS, raylet,
agents, HAProxy, workers) listens on loopback, usage statistics are off, and a driver without the
cluster's token is refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from listeners import beyond_loopback, listening_sockets
from session_procs import SESSION_ENV


@pytest.mark.fast
def test_every_socket_of_the_session_cluster_is_on_loopback(http_env, ray_cluster):
    found = listening_sockets(SESSION_ENV, os.environ[SESSION_ENV])
    kinds = {name for *_, name in found}
    assert {"gcs_server", "raylet", "haproxy"} <= kinds and len(found) >= 15, found
    assert ray_cluster["http_port"] in {port for _, port, *_ in found}  # the HTTP front is one of them
    assert not beyond_loopback(found), f"listening beyond loopback: {beyond_loopback(found)}"


@pytest.mark.fast
def test_the_session_cluster_reports_no_usage_statistics(ray_cluster):
    import psutil

    ray_procs = []
    for proc in psutil.process_iter(["name"]):
        try:
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if env.get(SESSION_ENV) == os.environ[SESSION_ENV] and proc.info["name"] in ("gcs_server", "raylet"):
            ray_procs.append((proc.info["name"], env.get("RAY_USAGE_STATS_ENABLED"), " ".join(proc.cmdline())))
    assert {name for name, *_ in ray_procs} == {"gcs_server", "raylet"}, ray_procs
    assert all(flag == "0" for _, flag, _ in ray_procs), ray_procs


def test_a_driver_without_the_cluster_token_is_refused(ray_cluster):
    """A driver with the cluster's address but not its token is turned away (Ray's token auth)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
    script = f"import ray; ray.init(address={ray_cluster['address']!r}, log_to_driver=False); print('JOINED')"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "JOINED" not in out.stdout, out.stdout + out.stderr[-2000:]


@pytest.mark.fast
def test_processes_left_by_a_dead_session_are_stopped_and_ours_are_not():
    """What an interrupted run left (its pytest gone) is stopped by the next session's sweep; a
    process of a live session (this one) is left alone until its own end."""
    import session_procs

    dead_owner = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_owner.wait()  # a pytest that is gone: its pid no longer names that process
    stale_tag = f"{dead_owner.pid}@0.000"
    stale = subprocess.Popen(["sleep", "300"], env={**os.environ, SESSION_ENV: stale_tag})
    ours = subprocess.Popen(["sleep", "300"])  # inherits this session's tag
    try:
        assert session_procs.sweep_stale() >= 1
        assert stale.wait(timeout=10) is not None  # stopped
        assert ours.poll() is None  # still running: its session is alive
        assert ours.pid in {p.pid for p in session_procs.own_processes()}
    finally:
        for proc in (stale, ours):
            proc.kill()
            proc.wait()
