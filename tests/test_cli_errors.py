"""What a user of the `cinevivid` command line sees when something is wrong: one line on stderr and
a non-zero exit (the service down, its error envelope, no key, no stack, a busy or badly chosen
port), the traceback only with --debug; a quiet, fast --help; and the launcher's port handling
(a port taken while `ray start` runs is noticed and given up within seconds). No Ray, no server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serve.errors import LaunchError, PortInUse

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]


def cinevivid(*args: str, cache_dir: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "CINEVIVID_CACHE_DIR": str(cache_dir),
            "CINEVIVID_DATA_DIR": str(cache_dir / "data"), **env}
    for key in ("CINEVIVID_URL", "CINEVIVID_API_KEY", "CINEVIVID_DATABASE_URL"):
        if key not in env:
            full.pop(key, None)
    return subprocess.run([sys.executable, "-m", "serve.ops.cli", *args], capture_output=True, text=True,
                          env=full, cwd=ROOT, timeout=120)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in r.stderr
    return lines[0]


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: connections are refused


@pytest.mark.parametrize("command", [["videos", "list"], ["videos", "get", "video_1"], ["videos", "rm", "video_1"],
                                     ["generate", "a fox", "-q"]], ids=" ".join)
def test_service_down_is_one_line(command, closed_port, tmp_path):
    r = cinevivid(*command, "--server", f"http://127.0.0.1:{closed_port}", "--api-key", "cv-x", cache_dir=tmp_path)
    line = one_error_line(r)
    assert f"127.0.0.1:{closed_port}" in line and "connection refused" in line and "cinevivid up" in line


def test_debug_shows_the_traceback(closed_port, tmp_path):
    r = cinevivid("videos", "list", "--server", f"http://127.0.0.1:{closed_port}", "--api-key", "cv-x", "--debug",
                  cache_dir=tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr and "ConnectError" in r.stderr
    r = cinevivid("--debug", "videos", "list", "--server", f"http://127.0.0.1:{closed_port}", "--api-key", "cv-x",
                  cache_dir=tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_missing_key_is_one_line(closed_port, tmp_path):
    line = one_error_line(cinevivid("videos", "list", "--server", f"http://127.0.0.1:{closed_port}",
                                    cache_dir=tmp_path))
    assert "CINEVIVID_API_KEY" in line and "--api-key" in line


@pytest.mark.parametrize("command", [["env"], ["logs"], ["prometheus-config"], ["submit", "--", "python", "x.py"]],
                         ids=" ".join)
def test_missing_stack_is_one_line(command, tmp_path):
    line = one_error_line(cinevivid(*command, cache_dir=tmp_path))
    assert "no CineVivid stack recorded" in line and "cinevivid up" in line


def test_http_error_envelope_is_one_line(monkeypatch, capsys):
    """The envelope's code, param, message and the HTTP status, on one line."""
    import httpx

    from client import cli as client_cli
    from client.http import CineVividClient
    from serve.ops.cli import main

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "no video video_9", "param": "id"}})

    monkeypatch.setattr(client_cli, "_client", lambda args: CineVividClient(
        args.server, args.api_key, transport=httpx.MockTransport(answer)))
    assert main(["videos", "get", "video_9", "--api-key", "k"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: not_found [id]: no video video_9 (HTTP 404)"]


def test_admin_commands_print_no_alembic_info(tmp_path):
    r = cinevivid("users", "list", cache_dir=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and "alembic" not in r.stdout
    line = one_error_line(cinevivid("keys", "create", "nobody", cache_dir=tmp_path))
    assert line == "error: no user named 'nobody'"


def test_help_imports_neither_ray_torch_nor_the_database(tmp_path):
    """`cinevivid --help` (and a command's --help) loads only the argparse tree: what makes it
    fast (about 0.4 s here, against 1.8 s before)."""
    code = ("import sys\nfrom serve.ops.cli import main\n"
            "for argv in (['--help'], ['videos', 'list', '--help'], ['up', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "heavy = sorted(m for m in ('ray', 'torch', 'sqlalchemy', 'httpx', 'diffusers', 'rich') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "HEAVY []"


# ---- the launcher's ports ----------------------------------------------------------------------
@pytest.fixture
def held_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_busy_http_port_names_port_holder_and_flag(held_port, tmp_path):
    from serve.ops.launcher import _check_http_port

    with pytest.raises(PortInUse) as info:
        _check_http_port({"http_options": {"host": "127.0.0.1", "port": held_port}}, "serve_config.yaml")
    message = str(info.value)
    assert "\n" not in message and f"port {held_port}" in message and f"pid {os.getpid()}" in message
    assert "--port" in message
    # the same through the command line, before anything starts (no Ray, no HAProxy folder)
    before = set(Path("/tmp").glob("cvhap-*"))
    line = one_error_line(cinevivid("up", "--port", str(held_port), "--no-dashboard", cache_dir=tmp_path))
    assert f"port {held_port}" in line and f"pid {os.getpid()}" in line and "--port" in line
    assert set(Path("/tmp").glob("cvhap-*")) <= before


@pytest.mark.parametrize("flag", ["--dashboard-port", "--port"])
def test_port_in_rays_worker_range_is_one_line(flag, tmp_path):
    from serve.ops.launcher import RAY_WORKER_PORTS, check_port_choice

    with pytest.raises(LaunchError):
        check_port_choice(RAY_WORKER_PORTS.start + 5, flag)
    check_port_choice(RAY_WORKER_PORTS.stop, flag)  # just outside: fine
    other = [] if flag == "--port" else ["--port", str(_free())]
    line = one_error_line(cinevivid("up", flag, "12000", *other, cache_dir=tmp_path))
    assert f"{flag} 12000" in line and "worker port range" in line


def _listener_script(port: int, ready: Path) -> list[str]:
    return [sys.executable, "-c",
            f"import socket, time, pathlib\ns = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen()\n"
            f"pathlib.Path({str(ready)!r}).write_text('up')\ntime.sleep(60)\n"]


def test_a_port_taken_while_ray_starts_is_noticed_within_seconds(tmp_path, monkeypatch):
    """`ray start` is watched: a process outside the cluster listening on one of its ports stops
    it within a few seconds, and the flag of the port is reported (the launcher then starts again
    with other ports)."""
    from serve.ops import launcher
    from serve.ops.serve_env import free_port

    monkeypatch.setenv("CINEVIVID_CACHE_DIR", str(tmp_path))
    port = free_port()
    thief = subprocess.Popen(_listener_script(port, tmp_path / "thief"))  # not of the cluster: no mark
    try:
        env = {**os.environ, launcher.CLUSTER_MARK_ENV: launcher.ray_temp_dir()}
        # a stand-in for `ray start` that would run for a minute
        started = time.monotonic()
        code, lost, _ = launcher._run_watched([sys.executable, "-c", "import time; time.sleep(60)"], env,
                                              {"--dashboard-port": port})
        assert lost == "--dashboard-port" and code != 0
        assert time.monotonic() - started < 30
    finally:
        thief.kill()
        thief.wait()


def test_the_clusters_own_listener_is_not_foreign(tmp_path, monkeypatch):
    from serve.ops import launcher
    from serve.ops.serve_env import free_port

    monkeypatch.setenv("CINEVIVID_CACHE_DIR", str(tmp_path))
    port = free_port()
    ready = tmp_path / "ready"
    env = {**os.environ, launcher.CLUSTER_MARK_ENV: launcher.ray_temp_dir()}
    script = _listener_script(port, ready)
    script[-1] = script[-1].replace("time.sleep(60)", "time.sleep(3)")
    code, lost, _ = launcher._run_watched(script, env, {"--port": port})
    assert (code, lost) == (0, None)


def test_a_failed_up_removes_its_haproxy_folder(tmp_path, monkeypatch):
    from serve.ops import launcher

    monkeypatch.setenv("CINEVIVID_CACHE_DIR", str(tmp_path))
    for key in list(os.environ):
        if key.startswith("RAY_SERVE_HAPROXY_"):
            monkeypatch.delenv(key)
    made = {}

    def failing_connect(*args, **kwargs):
        made["dir"] = Path(os.environ["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent
        assert made["dir"].is_dir()
        raise LaunchError("`ray start` failed: for the test")

    monkeypatch.setattr(launcher, "_join_or_start_cluster", failing_connect)
    monkeypatch.setattr(launcher, "_prepare_auth", lambda address: None)
    with pytest.raises(LaunchError):
        launcher.up(str(ROOT / "serve_config.yaml"), port=_free())
    assert made["dir"].name.startswith("cvhap-") and not made["dir"].exists()
    assert "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC" not in os.environ


def _free() -> int:
    from serve.ops.serve_env import free_port

    return free_port()


# ---- make setup TORCH=... --------------------------------------------------------------------
@pytest.mark.parametrize("argv, have, ok", [
    (["torch==2.13.0"], ("2.13.0+cpu", None), True),
    (["torch==2.13.0+cpu"], ("2.13.0+cpu", None), True),
    (["torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cu128"], ("2.13.0+cpu", None), False),
    (["torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cu128"], ("2.13.0+cu128", "12.8"), True),
    (["torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cu126"], ("2.13.0+cu128", "12.8"), False),
    (["torch==2.12.0"], ("2.13.0+cpu", None), False),
    (["torch>=2.4"], ("2.13.0+cpu", None), True),
    (["torch==2.13.0"], None, False),
])
def test_torch_setup_decides_like_the_user_asked(argv, have, ok):
    from serve.ops.torch_setup import satisfied, wanted

    assert satisfied(*wanted(argv), have) is ok


def test_torch_setup_says_loudly_when_it_cannot(monkeypatch, capsys):
    """pip installing nothing that fits (here: pip is a no-op) ends in a banner and exit 1."""
    from serve.ops import torch_setup

    monkeypatch.setattr(torch_setup, "installed", lambda: ("2.13.0+cpu", None))
    monkeypatch.setattr(torch_setup.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0))
    assert torch_setup.main(["torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cu128"]) == 1
    err = capsys.readouterr().err
    assert "NOT DONE" in err and "no CUDA" in err
    monkeypatch.setattr(torch_setup, "installed", lambda: ("2.13.0+cpu", None))
    assert torch_setup.main(["torch==2.13.0"]) == 0


# ---- the stack's paths, Prometheus and Ray jobs ----------------------------------------------
STATE = {"address": "127.0.0.1:6379", "token_path": "/tmp/cv-test/ray_auth_token", "loopback": True,
         "ray_temp_dir": "/tmp/cvray-0-abc", "session_dir": "/tmp/cvray-0-abc/session_2026",
         "config": str(ROOT / "serve_config.yaml"), "http_port": 8123, "app_name": "cinevivid"}


def test_stack_paths_and_prometheus_config_point_at_this_stack():
    from serve.ops.stack_cmds import prometheus_config, stack_paths

    paths = stack_paths(STATE)
    assert paths["logs"] == "/tmp/cvray-0-abc/session_2026/logs"
    assert paths["prometheus_sd_file"] == "/tmp/cvray-0-abc/prom_metrics_service_discovery.json"
    cfg = prometheus_config(STATE)
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    assert jobs["cinevivid"]["static_configs"] == [{"targets": ["127.0.0.1:8123"]}]
    assert jobs["ray"]["file_sd_configs"] == [{"files": [paths["prometheus_sd_file"]]}]
    assert all(Path(rule).is_absolute() and Path(rule).exists() for rule in cfg["rule_files"])
    assert "/tmp/ray" not in json.dumps(cfg)
    assert "/tmp/ray/" not in (ROOT / "configs" / "prometheus" / "prometheus.yml").read_text()


def test_submit_wraps_ray_job_submit_for_the_stack():
    from serve.ops.stack_cmds import submit_command

    argv, env = submit_command(STATE, ["--", "python", "my_job.py", "--flag"], working_dir=".")
    assert argv[1:3] == ["job", "submit"] and Path(argv[0]).name == "ray"
    runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert runtime_env["working_dir"] == "." and runtime_env["env_vars"]["CINEVIVID_CACHE_DIR"]
    assert argv[argv.index("--") + 1:] == [sys.executable, "my_job.py", "--flag"]  # the venv's python
    assert env["RAY_ADDRESS"] == "127.0.0.1:6379" and env["RAY_AUTH_TOKEN_PATH"] == STATE["token_path"]
    with pytest.raises(ValueError):
        submit_command(STATE, ["--"], working_dir=".")


def test_lazy_handlers_resolve_and_copied_defaults_agree():
    """Every command's handler ("module:function", imported when it runs) exists, and the defaults
    the parser repeats so as not to import their modules equal the modules' own."""
    import argparse
    import importlib

    from serve.ops import cli, config_doc, kuberay

    def handlers(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    if sub.get_default("func") is not None:
                        yield sub.get_default("func").target
                    yield from handlers(sub)

    targets = set(handlers(cli.build_parser()))
    assert len(targets) >= 20
    for target in targets:
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), target
    assert cli.GPUS_PER_WORKER == kuberay.GPUS_PER_WORKER and cli.CONFIG_DOC_PATH == config_doc.DOC_PATH


def test_a_taken_dashboard_port_is_one_line(held_port, tmp_path):
    """--dashboard-port PORT held by someone: one line naming it, its holder and the flag; no
    `ray start` (nothing left running, no record)."""
    line = one_error_line(cinevivid("up", "--dashboard-port", str(held_port), "--port", str(_free()),
                                    cache_dir=tmp_path))
    assert f"port {held_port}" in line and f"pid {os.getpid()}" in line and "--dashboard-port" in line
    assert not (tmp_path / "launcher.json").exists()
