"""Every process a test session starts (Ray's, HAProxy, PostgreSQL, Prometheus, Chromium, the
`cinevivid up` stacks, Locust) inherits SESSION_ENV from pytest's environment; at the end of the
session, interrupted or not, the ones still running are stopped, and a new session first stops
those of an earlier one whose pytest is gone (killed with SIGKILL, a closed terminal)."""

from __future__ import annotations

import contextlib
import os

import psutil

SESSION_ENV = "CINEVIVID_TEST_SESSION"


def _tag(pid: int) -> str:
    return f"{pid}@{psutil.Process(pid).create_time():.3f}"  # a reused pid is another session


def mark_this_session() -> str:
    """Tag this process's environment, so that every process it starts carries the tag."""
    os.environ[SESSION_ENV] = _tag(os.getpid())
    return os.environ[SESSION_ENV]


def _alive(tag: str) -> bool:
    pid, _, _ = tag.partition("@")
    try:
        return _tag(int(pid)) == tag
    except (ValueError, psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _tagged(predicate) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            tag = proc.environ().get(SESSION_ENV)
            if tag and predicate(tag):
                found.append(proc)
    return found


def _stop(procs: list[psutil.Process]) -> int:
    from serve.ops.launcher import stop_processes

    stop_processes(procs, timeout_s=5)
    return len(procs)


def sweep_stale() -> int:
    """Stop the processes of earlier sessions whose pytest is gone. Returns how many."""
    return _stop(_tagged(lambda tag: tag != os.environ.get(SESSION_ENV) and not _alive(tag)))


def own_processes() -> list[psutil.Process]:
    """The processes this session started that are still running."""
    mine = os.environ.get(SESSION_ENV)
    return _tagged(lambda tag: tag == mine) if mine else []


def sweep_own() -> int:
    """Stop every process this session started that is still running. Returns how many."""
    return _stop(own_processes())
