"""Two Ray nodes on this machine: a head (`ray start --head` on 127.0.0.1) and a second raylet that
joins it over loopback (`ray start --address=...`) with a custom resource, `worker_node`. Both
run with a cluster token (Ray's token auth) and CineVivid's Serve environment (HAProxy).
`cinevivid up --address ... --config ...` deploys a Serve config whose Transformer asks for
`worker_node` (`args.deployments.transformer.ray_actor_options.resources`); a job then runs end to
end over HTTP, and Ray's state API shows the Transformer replica on the second node and every other
replica on the head. The cluster is this module's own and is stopped at the end (its processes
only: other Ray clusters on the machine are left alone)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from client.http import CineVividClient
from media_probe import probe_mp4
from serve.ops.admin import add_user, create_key
from serve.ops.launcher import _stop_cluster
from serve.runtime.cluster_record import LOOPBACK_ENV
from serve.ops.serve_env import HAPROXY_FILES, HAPROXY_PORTS, apply_serve_env, free_port
from serve.stages import GENERATOR, INGRESS, TEXT_ENCODER, TRANSFORMER, VAE

ROOT = Path(__file__).resolve().parents[1]
APP = "cinevivid"
STEPS = 3

# The Transformer needs `worker_node`, which only the second node has; every other stage asks for a
# sliver of `head_node`, which only the head has. (Leaving them free to go anywhere raced: a small
# replica could land on the worker first and take the CPU the Transformer needs.)
TRANSFORMER_OPTIONS = {"ray_actor_options": {"num_cpus": 1, "resources": {"worker_node": 1}},
                       "max_ongoing_requests": 4, "max_queued_requests": 16}
WORKER_NODE_CPUS = 1
HEAD_NODE_CPUS = 4


def serve_config(http_port: int) -> dict:
    small = {"ray_actor_options": {"num_cpus": 0.2, "resources": {"head_node": 0.01}}}
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": http_port, "request_timeout_s": 300},
        "applications": [{
            "name": APP, "route_prefix": "/", "import_path": "serve.app:build_app",
            "args": {
                "name": APP, "with_ingress": True,
                "model": {"name": "cinevivid-tiny", "source": "embedded:tiny", "width": 32, "height": 32,
                          "num_frames": 5, "fps": 8, "num_inference_steps": STEPS},
                "tts": {"providers": ["none"], "default_provider": "none"},
                "deployments": {"transformer": TRANSFORMER_OPTIONS, "text_encoder": small, "vae": small,
                                "generator": {"ray_actor_options": {"num_cpus": 0.1, "resources": {"head_node": 0.01}}},
                                "ingress": small},
            },
        }],
    }


def _ray() -> str:
    cand = Path(sys.executable).parent / "ray"
    return str(cand) if cand.exists() else "ray"


def _node_ports() -> list[str]:
    """Free ports for one raylet's own servers: two raylets on one machine must not share them."""
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


def _run(cmd: list[str], env: dict, timeout: float = 300, diagnose: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        state = _cluster_state(diagnose) if diagnose else ""
        pytest.fail(f"{' '.join(cmd[:5])} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}\n{state}")
    return r


DIAGNOSE = """
import sys
import ray
from ray import serve
from ray.util.state import list_actors

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
for n in ray.nodes():
    print("node", n["NodeID"][:8], "alive" if n["Alive"] else "dead", n["Resources"])
for a in list_actors(address=sys.argv[2], detail=True, limit=10000):
    print("actor", a.class_name, a.state, (a.node_id or "")[:8], (a.death_cause or "") and str(a.death_cause)[:300])
for name, app in serve.status().applications.items():
    print("app", name, app.status, app.message[:500])
    for dname, d in app.deployments.items():
        print("  deployment", dname, d.status, d.replica_states, d.message[:500])
"""


def _cluster_state(two_nodes: dict) -> str:
    """What the cluster looks like (nodes, actors, Serve deployments), for a failure message."""
    try:
        r = subprocess.run([sys.executable, "-c", DIAGNOSE, two_nodes["address"], two_nodes["dashboard"]],
                           env=two_nodes["env"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        return f"cluster state:\n{r.stdout[-6000:]}{r.stderr[-2000:] if r.returncode else ''}"
    except subprocess.TimeoutExpired:
        return "cluster state: no answer within 120 s"


def _start_node(cmd: list[str], env: dict, temp_dir: Path, attempts: int = 3) -> None:
    """`ray start`, again if it fails: Ray gives a new raylet a fixed 30 s to register with the GCS,
    which a CI host busy with other Ray clusters can miss. A failed attempt's processes (they name
    the node's own temp dir) are stopped first."""
    for attempt in range(1, attempts + 1):
        r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        if r.returncode == 0:
            return
        _stop_cluster(str(temp_dir))
        if attempt == attempts or "timed out during startup" not in r.stderr:
            pytest.fail(f"{' '.join(cmd[:4])} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")


@pytest.fixture(scope="module")
def two_nodes(tiny_model_dir):
    # a short folder: Ray's unix sockets and HAProxy's (under a 56-character node-id folder) must fit
    base = Path(tempfile.mkdtemp(prefix="cv2n-", dir="/tmp"))
    token = base / "auth_token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    # Both nodes' environment: token auth with our token, CineVivid's Serve settings with a HAProxy
    # of this cluster's own (not the one conftest set up for the session cluster), the data dir.
    # (and not the session cluster's loopback-only mode: a second node must be able to join this one)
    env = {k: v for k, v in os.environ.items()
           if k not in (*HAPROXY_FILES, *HAPROXY_PORTS, "RAY_AUTH_TOKEN", *LOOPBACK_ENV)}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), CINEVIVID_DATA_DIR=str(base / "data"),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    apply_serve_env(env, haproxy_dir=base / "hap")
    env.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "300")  # (the state API's server) a busy 2-core CI host
    gcs = free_port()
    address = f"127.0.0.1:{gcs}"
    dashboard = free_port()
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats", "--object-store-memory=100000000"]
    head = [_ray(), "start", "--head", f"--temp-dir={base / 'head'}", f"--port={gcs}", *common,
            f"--num-cpus={HEAD_NODE_CPUS}", '--resources={"head_node": 1}',
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={free_port()}", *_node_ports()]
    worker = [_ray(), "start", f"--address={address}", f"--temp-dir={base / 'worker'}", *common,
              f"--num-cpus={WORKER_NODE_CPUS}", '--resources={"worker_node": 1}', *_node_ports()]
    try:
        _start_node(head, env, base / "head")
        _start_node(worker, env, base / "worker")
        yield {"address": address, "env": env, "base": base, "dashboard": f"http://127.0.0.1:{dashboard}"}
    finally:
        _stop_cluster(str(base))  # every process of both nodes (and HAProxy) names this folder
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def deployed(two_nodes):
    """`cinevivid up --address ... --config ...` on the two-node cluster; returns the service URL."""
    port = free_port()
    config = two_nodes["base"] / "serve_config.yaml"
    config.write_text(yaml.safe_dump(serve_config(port), sort_keys=False))
    r = _run([sys.executable, "-m", "serve.ops.cli", "up", "--address", two_nodes["address"],
              "--config", str(config), "--detach", "--timeout", "600"], two_nodes["env"], timeout=900,
             diagnose=two_nodes)
    url = r.stdout.strip().splitlines()[-1]
    assert url == f"http://127.0.0.1:{port}"
    return url


@pytest.fixture(scope="module")
def api_key(two_nodes, deployed) -> str:
    data_dir = str(two_nodes["base"] / "data")
    asyncio.run(add_user("nodes", secrets.token_urlsafe(12), data_dir=data_dir))
    return asyncio.run(create_key("nodes", "two-nodes", data_dir=data_dir))["key"]


PLACEMENT = """
import json, sys
import ray
from ray.util.state import list_actors

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
actors = list_actors(address=sys.argv[2], filters=[("state", "=", "ALIVE")], detail=True, limit=10000)
print(json.dumps({"nodes": nodes, "actors": [{"class_name": a.class_name, "node_id": a.node_id} for a in actors]}))
"""


def test_a_job_runs_end_to_end_across_the_two_nodes(deployed, api_key):
    with CineVividClient(deployed, api_key, timeout=60) as cv:
        video = cv.create_video("a lighthouse on two nodes", seed=5, num_inference_steps=STEPS,
                                 num_frames=5, size="32x32")
        events = list(cv.events(video["id"], timeout=300))
        final = cv.get_video(video["id"])
        mp4 = cv.download_bytes(video["id"])
    assert final["status"] == "completed", final
    steps = [data["step"] for event, data in events if event == "step" and data.get("stage") == "transformer"]
    assert steps == list(range(1, STEPS + 1))  # the Transformer's progress, streamed from the other node
    (stream,) = probe_mp4(mp4)["video"]
    assert (stream["width"], stream["height"], stream["frames"]) == (32, 32, 5)


def test_transformer_replica_is_on_the_second_node_and_the_rest_on_the_head(two_nodes, deployed):
    r = _run([sys.executable, "-c", PLACEMENT, two_nodes["address"], two_nodes["dashboard"]], two_nodes["env"])
    state = json.loads(r.stdout.strip().splitlines()[-1])
    (worker_node,) = [nid for nid, res in state["nodes"].items() if res.get("worker_node") == 1]
    (head_node,) = [nid for nid in state["nodes"] if nid != worker_node]
    replicas: dict[str, list[str]] = {}
    for actor in state["actors"]:
        if actor["class_name"].startswith(f"ServeReplica:{APP}:"):
            replicas.setdefault(actor["class_name"].rsplit(":", 1)[1], []).append(actor["node_id"])
    assert set(replicas) == {TEXT_ENCODER.deployment, TRANSFORMER.deployment, VAE.deployment, GENERATOR.deployment,
                             INGRESS.deployment}, replicas
    assert replicas.pop(TRANSFORMER.deployment) == [worker_node]
    assert all(nodes == [head_node] for nodes in replicas.values()), replicas
