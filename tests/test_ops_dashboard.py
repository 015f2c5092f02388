"""Operators and other Ray jobs against a stack started the way a user starts it: `cinevivid up
--detach` in its own process (own CINEVIVID_CACHE_DIR, free ports, the embedded tiny model), with
the Ray dashboard on. One stack for the module:

- the dashboard's Serve REST API lists the app's nine deployments with RUNNING replicas, with the
  cluster's token (header, or the sign-in cookie), and refuses requests without it;
- docs/operations.md's "Using it from a Ray job" snippet runs as printed in a separate driver
  process, and as a Ray job sent with the page's `cinevivid submit` line after `eval "$(cinevivid env)"`;
- `eval "$(cinevivid env)"` then a plain `ray.init()` joins the same cluster;
- every socket the stack listens on is on the loopback address (the default config);
- a client that trickles its request head or body is answered 408 and cut after the configured
  `http_front.request_timeout_s`; HAProxy's own answers to malformed requests;
- a taken HTTP port is one clear line naming it and `--port`, with nothing left running;
- last, a crash of the whole stack (every process of its cluster SIGKILLed, HAProxy included) with a
  job running: `cinevivid up` again (same cache dir, config and data dir; `--port` over the config's)
  is healthy, serves the earlier video, and the interrupted job completes;
- `cinevivid down` leaves no process of that cluster.
"""

from __future__ import annotations

import io
import json
import os
import re
import select
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import urlparse

import av
import httpx
import psutil
import pytest
import yaml

from serve.config import DashboardOptions
from serve.errors import StackNotRunning
from serve.ops.serve_env import free_port

from listeners import beyond_loopback, listening_sockets
from serve.stages import GENERATOR, IMAGE_ENCODER, INGRESS, TEXT_ENCODER, TRANSFORMER, TTS, VAE

ROOT = Path(__file__).resolve().parents[1]
# serve_config.yaml's: the stages, one Transformer per model of its set, the I2V model's image encoder
DEPLOYMENTS = {TEXT_ENCODER.deployment, TRANSFORMER.deployment, TRANSFORMER.deployment_for("cinevivid-tiny-i2v"),
               TRANSFORMER.deployment_for("cinevivid-tiny-df"), IMAGE_ENCODER.deployment, VAE.deployment,
               TTS.deployment, GENERATOR.deployment, INGRESS.deployment}

# The page that documents Ray jobs; its blocks there are marked "Run by tests/test_ops_dashboard.py"
# (tests/test_docs.py checks that this module reads the page).
RAY_JOB_PAGE = ROOT / "docs/operations.md"


# docs/operations.md's "Using it from a Ray job" snippet, exactly as printed there (and in client/handle.py).
def readme_snippet() -> str:
    """The first Python block of docs/operations.md's "Using it from a Ray job", exactly as printed."""
    readme = RAY_JOB_PAGE.read_text()
    section = readme[readme.index("## Using it from a Ray job"):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


README_SNIPPET = readme_snippet()


def clean_env(cache_dir: Path) -> dict[str, str]:
    """A user's shell: this checkout on PYTHONPATH, the stack's cache dir, and none of the Ray
    settings of the test session (its HAProxy files/ports, any cluster address or token)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_SERVE_HAPROXY_", "RAY_SERVE_FALLBACK_PROXY_", "RAY_ADDRESS", "RAY_AUTH_",
                                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "CINEVIVID_HTTP_", "CINEVIVID_HAPROXY_"))}
    env.update(PYTHONPATH=str(ROOT), CINEVIVID_CACHE_DIR=str(cache_dir))
    return env


def cinevivid(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve.ops.cli", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


REQUEST_TIMEOUT_S = 2  # the stack's http_front.request_timeout_s: short, for the slow-client tests


def small_config(path: Path, data_dir: Path, http_port: int, one_model: bool = False) -> Path:
    """serve_config.yaml (all its deployments; `one_model`: only the default model's, no voice) with
    a free HTTP port, its own data dir and a short request timeout; its network settings are the
    defaults."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    if one_model:
        args = config["applications"][0]["args"]
        args["models"], args["tts"] = args["models"][:1], {"providers": ["none"]}
    config["http_options"]["port"] = http_port
    config["applications"][0]["args"]["ingress"] = {"data_dir": str(data_dir)}
    config["applications"][0]["args"]["http_front"] = {"request_timeout_s": REQUEST_TIMEOUT_S}
    path.write_text(yaml.safe_dump(config))
    return path


def started_processes(cache_dir: Path) -> list[str]:
    """The processes started from a `cinevivid` command run with this cache dir (Ray's processes
    and replicas inherit its environment), whatever they renamed themselves to."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.environ().get("CINEVIVID_CACHE_DIR") == str(cache_dir):
                found.append(f"{proc.pid}: {' '.join(proc.info['cmdline'] or ())[:200]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def assert_none_left(cache_dir: Path, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while started_processes(cache_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not started_processes(cache_dir), "left running"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    base = tmp_path_factory.mktemp("dash")
    cache_dir = base / "cache"
    env = clean_env(cache_dir)
    http_port = free_port()
    config = small_config(base / "serve_config.yaml", base / "data", http_port)
    dashboard_port = free_port()
    up_args = ("up", "--detach", "--config", str(config), "--num-cpus", "8", "--dashboard-port", str(dashboard_port),
               "--timeout", "400")
    up = cinevivid(env, *up_args, timeout=600)
    state_path = cache_dir / "launcher.json"
    try:
        # (the last test crashes this stack and starts it again: `down` below stops whichever runs)
        assert up.returncode == 0, up.stderr[-3000:]
        yield {"env": env, "cache_dir": cache_dir, "base": base, "stdout": up.stdout, "stderr": up.stderr,
               "http_port": http_port, "config": config, "data_dir": base / "data", "up_args": up_args,
               "dashboard_port": dashboard_port, "token": (cache_dir / "ray_auth_token").read_text().strip(),
               "token_path": cache_dir / "ray_auth_token"}
    finally:
        down = cinevivid(env, "down", timeout=300)
        assert down.returncode == 0, down.stderr[-3000:]
        assert_none_left(cache_dir)
        with pytest.raises(httpx.ConnectError):  # the dashboard went with it
            httpx.get(f"http://127.0.0.1:{dashboard_port}/api/version", timeout=5)
        assert not state_path.exists()


def dashboard_url(stack) -> str:
    m = re.search(r"Ray dashboard: (http://\S+)", stack["stderr"])
    assert m, f"`up` printed no dashboard URL:\n{stack['stderr'][-2000:]}"
    return m.group(1)


def test_up_prints_the_dashboard_and_how_to_sign_in(stack):
    url = dashboard_url(stack)
    assert urlparse(url).hostname == "127.0.0.1" and urlparse(url).port == stack["dashboard_port"]
    assert f"cat {stack['token_path']}" in stack["stderr"]  # where the token is, never the token itself
    assert stack["token"] not in stack["stderr"] + stack["stdout"]
    assert "Authorization: Bearer" in stack["stderr"]


def test_dashboard_shows_the_app_its_deployments_and_replicas_to_the_token_holder(stack):
    url = f"{dashboard_url(stack)}/api/serve/applications/"
    r = httpx.get(url, headers={"Authorization": f"Bearer {stack['token']}"}, timeout=30)
    assert r.status_code == 200, r.text
    app = r.json()["applications"]["cinevivid"]
    assert app["status"] == "RUNNING"
    deployments = app["deployments"]
    assert set(deployments) == DEPLOYMENTS
    for name, d in deployments.items():
        assert d["status"] == "HEALTHY", (name, d["status"], d.get("message"))
        assert d["replicas"] and all(rep["state"] == "RUNNING" for rep in d["replicas"]), name

    # without the token, or with a wrong one: refused
    assert httpx.get(url, timeout=30).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer not-the-token"}, timeout=30).status_code == 403
    # the browser's sign-in box posts the token and gets a session cookie
    with httpx.Client(base_url=dashboard_url(stack), timeout=30) as browser:
        assert browser.get("/api/serve/applications/").status_code == 401
        signin = browser.post("/api/authenticate", headers={"Authorization": f"Bearer {stack['token']}"})
        assert signin.status_code == 200, signin.text
        assert set(browser.get("/api/serve/applications/").json()["applications"]["cinevivid"]["deployments"]) \
            == DEPLOYMENTS


def test_readme_snippet_runs_as_printed_in_another_driver(stack):
    handle_doc = (ROOT / "client" / "handle.py").read_text()
    assert textwrap.indent(README_SNIPPET, "    ").replace("    \n", "\n") in handle_doc
    work = stack["base"] / "driver"
    work.mkdir()
    (work / "snippet.py").write_text(README_SNIPPET)
    r = subprocess.run([sys.executable, "snippet.py"], cwd=work, env=stack["env"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with av.open(str(work / "fox.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 9
    lines = r.stdout.strip().splitlines()
    assert any(line.startswith("step ") for line in lines) and lines[-1].startswith("result ")


def test_cinevivid_env_points_plain_ray_init_at_the_stack(stack):
    env = cinevivid(stack["env"], "env")
    assert env.returncode == 0, env.stderr
    exports = dict(re.findall(r"^export (\w+)=(\S+)$", env.stdout, re.M))
    assert exports["RAY_AUTH_MODE"] == "token" and exports["RAY_AUTH_TOKEN_PATH"] == str(stack["token_path"])
    driver = ("import ray; from ray import serve; from client.handle import GeneratorClient; "
              "ray.init(logging_level='WARNING'); "
              "print(sorted(serve.status().applications['cinevivid'].deployments)); "
              "print(GeneratorClient('cinevivid').check({'prompt': 'a fox', 'seed': 3})['seed'])")
    r = subprocess.run(["bash", "-c", f'eval "$({sys.executable} -m serve.ops.cli env)" && '
                                      f'{sys.executable} -c "{driver}"'],
                       cwd=stack["base"], env=stack["env"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-2:] == [str(sorted(DEPLOYMENTS)), "3"]


def readme_job_lines() -> tuple[str, str]:
    """The page's shell lines (after the snippet) that send a script as a Ray job: the `eval`
    line, and the `cinevivid submit` command after "# or: " on the next one."""
    readme = RAY_JOB_PAGE.read_text()
    section = readme[readme.index("## Using it from a Ray job"):]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    eval_line, ray_line = block.splitlines()[:2]
    return eval_line.split("#", 1)[0].strip(), ray_line.split("# or: ", 1)[1].strip()


def test_the_readme_snippet_runs_as_a_ray_job(stack):
    """The page's two lines, as printed, in a user's shell with the virtualenv active, with the
    snippet as my_job.py: the job runs in the cluster and succeeds, `cinevivid submit` (Ray's
    `ray job submit`) prints its output, and its fox.mp4 is where the page says."""
    eval_line, submit = readme_job_lines()
    assert eval_line == 'eval "$(cinevivid env)"' and submit.startswith("cinevivid submit -- "), (eval_line, submit)
    work = stack["base"] / "job"
    work.mkdir()
    (work / "my_job.py").write_text(README_SNIPPET)
    venv = str(Path(sys.executable).parent)  # an active virtualenv: its cinevivid, ray and python first
    env = {**stack["env"], "PATH": os.pathsep.join([venv, stack["env"].get("PATH", "")])}
    r = subprocess.run(["bash", "-c", f"{eval_line} && {submit}"], cwd=work, env=env, capture_output=True,
                       text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", out), out[-3000:]
    assert re.search(r"^step ", r.stdout, re.M) and re.search(r"^result ", r.stdout, re.M), r.stdout[-3000:]
    session_dir = Path(json.loads((stack["cache_dir"] / "launcher.json").read_text())["session_dir"])
    (copy,) = [p.parent for p in session_dir.glob("runtime_resources/working_dir_files/_ray_pkg_*/my_job.py")]
    with av.open(str(copy / "fox.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 9


def test_every_socket_of_the_default_stack_is_on_loopback(stack):
    found = listening_sockets("CINEVIVID_CACHE_DIR", str(stack["cache_dir"]))
    kinds = {name for *_, name in found}
    # the sockets are those of a whole stack: GCS, raylet, HAProxy, the replicas' gRPC servers...
    assert {"gcs_server", "raylet", "haproxy"} <= kinds and len(found) >= 15, found
    assert stack["http_port"] in {port for _, port, *_ in found}
    assert not beyond_loopback(found), f"listening beyond loopback: {beyond_loopback(found)}"


def http_exchange(port: int, head: bytes, trickle: bytes = b"", deadline_s: float = 120) -> tuple[bytes, float]:
    """Send `head`, then `trickle` one byte at a time (one every 0.5 s, while the server says
    nothing), like a slow client; returns what the server answered before closing, and the
    seconds from the end of `head` to the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        start = time.monotonic()
        answer, pending = b"", trickle
        while time.monotonic() - start < deadline_s:
            readable, _, _ = select.select([sock], [], [], 0.5)
            if readable:
                chunk = sock.recv(65536)
                if not chunk:
                    return answer, time.monotonic() - start
                answer += chunk
            elif pending:
                sock.sendall(pending[:1])
                pending = pending[1:]
        raise AssertionError(f"connection still open after {deadline_s} s; got {answer[:300]!r}")


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def envelope(answer: bytes) -> dict:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    return json.loads(body)["error"]


def test_a_client_trickling_its_headers_is_cut(stack):
    # one header byte every 0.5 s, for longer than the request timeout: HAProxy answers 408, closes
    head = b"GET /health HTTP/1.1\r\nHost: cinevivid\r\n"
    answer, took = http_exchange(stack["http_port"], head, trickle=b"X-Slow: " + b"a" * 200)
    assert status_of(answer) == 408, answer[:300]
    assert took >= REQUEST_TIMEOUT_S - 0.5  # cut by the timeout, not refused at once


def test_a_client_trickling_its_body_is_cut_with_the_error_envelope(stack):
    head = (b"POST /v1/videos HTTP/1.1\r\nHost: cinevivid\r\nContent-Type: application/json\r\n"
            b"Content-Length: 400\r\n\r\n{\"prompt\": \"a")
    answer, took = http_exchange(stack["http_port"], head, trickle=b"b" * 300)
    assert status_of(answer) == 408, answer[:300]
    assert envelope(answer)["code"] == "request_timeout"
    assert took >= REQUEST_TIMEOUT_S - 0.5


@pytest.mark.parametrize("request_bytes", [
    b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: cinevivid\r\n\r\n",                     # huge URL
    b"GET /health HTTP/1.1\r\nHost: cinevivid\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",     # huge header
    b"POST /v1/videos HTTP/1.1\r\nHost: cinevivid\r\nContent-Length: abc\r\n\r\n",          # bad length
    b"POST /v1/videos HTTP/1.1\r\nHost: cinevivid\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nab",
], ids=["huge-url", "huge-header", "bad-content-length", "two-content-lengths"])
def test_haproxy_refuses_malformed_requests_with_400_and_closes(stack, request_bytes):
    # HAProxy 2.8 answers these itself, before a request exists, with its built-in page (its H1
    # layer ignores errorfiles there; see serve/ops/haproxy_front.py): a 400, and the connection closed
    answer, _ = http_exchange(stack["http_port"], request_bytes, deadline_s=30)
    assert status_of(answer) == 400, answer[:300]
    assert b"connection: close" in answer.lower()
    # the service is unaffected
    assert httpx.get(f"http://127.0.0.1:{stack['http_port']}/health", timeout=30).json()["status"] == "healthy"


def test_a_taken_port_is_one_clear_line_and_nothing_is_left(stack, tmp_path):
    r = cinevivid(clean_env(tmp_path / "cache"), "up", "--detach", "--config", str(stack["config"]), timeout=120)
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr[-3000:]
    # the port, who holds it (the stack's HAProxy), and the flag that picks another
    assert lines[0].startswith(f"error: port {stack['http_port']} on 127.0.0.1 is in use by pid "), lines
    assert "haproxy" in lines[0] and "pick another with --port PORT" in lines[0]
    assert not started_processes(tmp_path / "cache")
    assert not (tmp_path / "cache" / "launcher.json").exists()
    # a stack of another cache dir would have had its own Ray temp dir (where `ray start` records
    # "the current cluster"), so the two would not trip over each other
    from serve.ops.launcher import ray_temp_dir

    assert ray_temp_dir(tmp_path / "cache") != ray_temp_dir(stack["cache_dir"])


def test_a_failed_ray_start_leaves_nothing_running(tmp_path):
    # `ray start` starts the GCS, then fails on the dashboard's address (not one of this machine):
    # `up` stops what it left, in one line
    r = cinevivid(clean_env(tmp_path), "up", "--detach", "--config", str(ROOT / "serve_config.yaml"),
                  "--dashboard-host", "192.0.2.1", "--dashboard-port", str(free_port()), timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(lines) == 1 and "`ray start` failed" in lines[0], r.stderr[-3000:]
    assert_none_left(tmp_path)
    assert not (tmp_path / "launcher.json").exists()


def test_no_stack_is_a_clear_error(tmp_path):
    from client.handle import GeneratorClient

    with pytest.raises(StackNotRunning, match="cinevivid up"):
        GeneratorClient.connect(cache_dir=tmp_path)
    r = cinevivid(clean_env(tmp_path), "env")
    assert r.returncode == 1 and "cinevivid up" in r.stderr and not r.stdout


def test_dashboard_flags():
    from serve.ops.cli import build_parser
    from serve.ops.launcher import _dashboard_flags, dashboard_options

    args = build_parser().parse_args(["up"])
    assert dashboard_options(args) == DashboardOptions()  # on, 127.0.0.1
    off = dashboard_options(build_parser().parse_args(["up", "--no-dashboard"]))
    assert _dashboard_flags(off) == ["--include-dashboard=false"]
    there = dashboard_options(build_parser().parse_args(["up", "--dashboard-host", "0.0.0.0",
                                                         "--dashboard-port", "9265"]))
    assert _dashboard_flags(there) == ["--include-dashboard=true", "--dashboard-host=0.0.0.0",
                                       "--dashboard-port=9265"]
    default = _dashboard_flags(DashboardOptions())
    assert default[:2] == ["--include-dashboard=true", "--dashboard-host=127.0.0.1"]
    assert int(default[2].split("=")[1]) > 0


# ---- LAST in the module: it crashes the stack and starts it again ------------------------------
def kill_the_stack(cache_dir: Path, timeout_s: float = 60) -> set[str]:
    """SIGKILL every process of the stack (its environment names the cache dir: Ray's processes,
    the replicas, HAProxy), again until none is left; returns their names."""
    names: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        procs = []
        for proc in psutil.process_iter(["pid", "name"]):
            try:
                if proc.environ().get("CINEVIVID_CACHE_DIR") == str(cache_dir):
                    proc.kill()
                    procs.append(proc)
                    names.add(proc.info["name"])
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        if not procs:
            return names
        psutil.wait_procs(procs, timeout=10)
    raise AssertionError(f"still running: {started_processes(cache_dir)}")


def test_a_whole_stack_crash_then_up_again_serves_the_old_video_and_finishes_the_job(stack):
    import shutil

    from serve.runtime.cluster_record import read_state
    from tests.http_fixtures import HttpEnv, wait_for_status

    data_dir = stack["data_dir"]
    url = f"http://127.0.0.1:{stack['http_port']}"
    user = HttpEnv(url, data_dir, f"sqlite+aiosqlite:///{data_dir / 'cinevivid.db'}").user()

    def submit(body: dict) -> str:
        r = httpx.post(f"{url}/v1/videos", json=body, headers=user.headers, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["id"]

    done = submit({"prompt": "before the crash", "num_inference_steps": 2, "seed": 1})
    assert wait_for_status(url, user.headers, done, {"completed", "failed"}, 300)["status"] == "completed"
    video = httpx.get(f"{url}/v1/videos/{done}/content", headers=user.headers, timeout=30).content
    running = submit({"prompt": "the crash", "num_inference_steps": 60, "seed": 2})
    assert wait_for_status(url, user.headers, running, {"in_progress", "completed", "failed"}, 300)["status"] \
        == "in_progress"

    old = read_state(stack["cache_dir"])
    killed = kill_the_stack(stack["cache_dir"])
    assert {"gcs_server", "raylet", "haproxy"} <= killed, killed
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=5)

    port = free_port()  # the same config, cache dir and data dir; the HTTP port from --port
    up = cinevivid(stack["env"], *stack["up_args"], "--port", str(port), timeout=600)
    stale = old.get("haproxy_dir")  # the killed stack's HAProxy folder: nobody stopped it to remove it
    if stale and Path(stale).name.startswith("cvhap-") and stale != read_state(stack["cache_dir"]).get("haproxy_dir"):
        shutil.rmtree(stale, ignore_errors=True)
    assert up.returncode == 0, up.stderr[-3000:]
    assert up.stdout.strip() == f"http://127.0.0.1:{port}"  # --port over the config's
    stack["http_port"], url = port, f"http://127.0.0.1:{port}"
    assert httpx.get(f"{url}/health", timeout=30).json()["status"] == "healthy"
    again = httpx.get(f"{url}/v1/videos/{done}/content", headers=user.headers, timeout=30)
    assert again.status_code == 200 and again.content == video
    # the crashed run's lease names the dead cluster: it is re-queued once the lease expires
    finished = wait_for_status(url, user.headers, running, {"completed", "failed"}, 600)
    assert finished["status"] == "completed", finished
    content = httpx.get(f"{url}/v1/videos/{running}/content", headers=user.headers, timeout=30)
    assert content.status_code == 200
    with av.open(io.BytesIO(content.content)) as c:
        assert sum(1 for _ in c.decode(video=0)) > 0
