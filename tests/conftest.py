"""Shared fixtures: one Ray cluster and one Serve instance for the whole session, the tiny model,
and the generation graph deployed once (`graph_app`)."""

from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path

import pytest

# `.ci/run` exports it: a test whose tool (PostgreSQL, promtool, Prometheus, Chromium, Locust) is
# missing fails instead of skipping, so a CI machine without it cannot pass by running less.
REQUIRE_ALL_ENV = "CINEVIVID_REQUIRE_ALL_TESTS"


def missing_tool(msg: str) -> None:
    """A test's tool is not installed: skip, saying what to install; an error under REQUIRE_ALL_ENV."""
    if os.environ.get(REQUIRE_ALL_ENV) == "1":
        pytest.fail(f"{msg} -- {REQUIRE_ALL_ENV}=1 (as in .ci/run), so this is an error, not a skip")
    pytest.skip(msg)

# Everything the replicas build or cache, and the launcher's record of the session cluster, go to
# a per-session folder (never a user's own CINEVIVID_CACHE_DIR, whose stack the session would
# otherwise find and use); set before Ray starts so the workers inherit it.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="cinevivid-tests-"))
os.environ["CINEVIVID_CACHE_DIR"] = str(_SESSION_DIR / "cache")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
# Nothing of a test run reaches outside this machine: no usage statistics (any Ray the tests
# start), no model hub (above), no real voice provider (tests/fake_elevenlabs.py).
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.pop("ELEVENLABS_API_KEY", None)
# The tests run behind the same HTTP front as production (HAProxy, see serve/ops/serve_env.py), with a
# short drain so replaced ingress replicas don't hold up the suite.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0.5")
# Serve's router asks a replica for its queue length within 0.1 s (backing off to 1 s) and, for a
# multiplexed request (a LoRA adapter), prefers the replicas holding the model for 1-2 s; on a busy
# 2-core box a probe that misses its deadline sends the request elsewhere. Deadlines a loaded test
# machine meets keep routing what Serve means it to be (tests/test_lora_graph.py asserts it).
os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1.0")
os.environ.setdefault("RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "5.0")
os.environ.setdefault("RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S", "5.0")
from serve.ops.serve_env import apply_own_serve_env, free_port, remove_haproxy_dir  # noqa: E402

if _made_haproxy := apply_own_serve_env():
    # the session cluster's HAProxy folder (stop_local_cluster removes it too); made at import, so a
    # run that starts no cluster, or a helper script that imports this file, removes it at its exit
    atexit.register(lambda pid=os.getpid(): os.getpid() == pid and remove_haproxy_dir(_made_haproxy))

import session_procs  # noqa: E402

session_procs.mark_this_session()  # every process the session starts inherits the tag


def pytest_sessionstart(session):
    stale = session_procs.sweep_stale()
    if stale:
        print(f"stopped {stale} processes left running by an earlier test session")


def pytest_unconfigure(config):
    """Last: whatever the session started and did not stop (interrupted, failed teardown) goes, and
    so do its folders (its data and Ray's logs), unless CINEVIVID_KEEP_TEST_DIR=1 keeps them to read."""
    session_procs.sweep_own()
    if os.environ.get("CINEVIVID_KEEP_TEST_DIR") != "1":
        import shutil

        from serve.ops.launcher import ray_temp_dir

        shutil.rmtree(ray_temp_dir(), ignore_errors=True)
        shutil.rmtree(_SESSION_DIR, ignore_errors=True)


from pg_server import postgres_server  # noqa: E402,F401 (session fixture: a throwaway PostgreSQL)

HTTP_APP = "http"
# The graph tests drive the session HTTP app's Generator through its Serve handle: one app of every
# stage for the session, reached over HTTP and through handles alike.
GRAPH_APP = HTTP_APP
# Every embedded tiny model, as the HTTP test app serves them: T2V (the default), I2V, DF.
TINY_MODELS = [
    {"name": "cinevivid-tiny", "aliases": ["skyreels-v2-tiny"],
     "lora": {"adapters_dir": "embedded", "max_loaded": 2}},  # the two tiny LoRAs, style-a and style-b
    {"name": "cinevivid-tiny-i2v", "pipeline": "i2v", "source": "embedded:tiny-i2v", "guidance_scale": 5.0,
     "flow_shift": 5.0, "width": 48, "height": 32},  # landscape by default: a portrait image turns it
    {"name": "cinevivid-tiny-df", "pipeline": "df", "source": "embedded:tiny-df", "max_frames": 129,
     "diffusion_forcing": {"mode": "always", "base_num_frames": 17, "max_base_num_frames": 33,
                           "overlap_history": 5}},
]


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from serve.pipeline.loading import tiny_model_path
    from serve.pipeline.tiny_model import make_tiny_model

    return make_tiny_model(tiny_model_path())


@pytest.fixture(scope="session")
def ray_cluster(tiny_model_dir):
    """One Ray cluster + Serve (HTTP on a free port) for the session, started the way `cinevivid up`
    starts one (serve.ops.launcher.start_local_cluster): every Ray process on 127.0.0.1 only, its own
    token and temp dir, no usage statistics."""
    from ray import serve

    from serve.ops.launcher import start_local_cluster, stop_local_cluster

    from fake_elevenlabs import session_cluster_key

    os.environ.update(session_cluster_key())  # the cluster's processes get the test key ...
    try:
        state = start_local_cluster(num_cpus=16)
    finally:
        for key in session_cluster_key():  # ... and nothing else this session starts does
            os.environ.pop(key, None)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield {"address": state["address"], "http_port": port, "http_url": f"http://127.0.0.1:{port}"}
        serve.shutdown()
    finally:
        stop_local_cluster()


def tiny_app_args(**overrides) -> dict:
    """App args for tests: the tiny model on the CPU, small fractional CPUs per replica."""
    small = {"ray_actor_options": {"num_cpus": 0.1}}
    args = {
        "name": "graph",
        "with_ingress": False,
        "deployments": {k: dict(small) for k in ("text_encoder", "transformer", "vae", "tts", "generator")},
        "tts": {"providers": ["none"]},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(args.get(key), dict):
            args[key] = {**args[key], **value}
        else:
            args[key] = value
    return args


@pytest.fixture(scope="session")
def http_env(ray_cluster, session_dir):
    """The session's app: every stage of the tiny models (TINY_MODELS) with the Ingress, behind
    HAProxy at route prefix "/" (tests/http_fixtures.py)."""
    from http_fixtures import deploy_session_http_app

    return deploy_session_http_app(ray_cluster, session_dir)


@pytest.fixture(scope="session")
def graph_app(http_env):
    """A Serve-handle client of the session app's Generator (no HTTP, no job records)."""
    from client.handle import GeneratorClient

    return GeneratorClient(GRAPH_APP)


@pytest.fixture(scope="session")
def stage_handle(graph_app):
    from ray import serve

    def get(deployment: str):
        return serve.get_deployment_handle(deployment, app_name=GRAPH_APP)

    return get
