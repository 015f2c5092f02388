"""Which sockets a stack listens on: the socket scan behind the loopback-only tests (the session
cluster in tests/test_session_cluster.py, a `cinevivid up` stack in tests/test_ops_dashboard.py)."""

from __future__ import annotations

import socket

import psutil

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def listening_sockets(env_key: str, env_value: str) -> list[tuple[str, int, str, str]]:
    """(address, port, kind, process) of every socket listened on by the processes whose
    environment has `env_key` = `env_value`: TCP in LISTEN, and UDP sockets not connected to a peer
    (they take datagrams from anyone)."""
    names = {}
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if proc.environ().get(env_key) == env_value:
                names[proc.pid] = proc.info["name"]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    found = []
    for conn in psutil.net_connections("inet"):
        if conn.pid not in names:
            continue
        udp = conn.type == socket.SOCK_DGRAM
        if (udp and not conn.raddr) or conn.status == psutil.CONN_LISTEN:
            found.append((conn.laddr.ip, conn.laddr.port, "udp" if udp else "tcp", names[conn.pid]))
    return found


def beyond_loopback(found: list[tuple[str, int, str, str]]) -> list[tuple[str, int, str, str]]:
    """The sockets not on loopback. No exception: each Serve replica's inter-deployment gRPC server,
    which Ray 2.60 binds to [::]:0, is moved to 127.0.0.1 by the worker-process setup hook
    (serve/runtime/loopback_grpc.py)."""
    return [s for s in found if s[0] not in LOOPBACK]
