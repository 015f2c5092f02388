"""What `cinevivid up` records about the stack it runs (a JSON file in CINEVIVID_CACHE_DIR), and
how another process reaches that stack with it.

The record holds the Ray cluster's address, the path of the cluster's auth token (Ray 2.60
clusters require a token; `up` makes one per cluster), the Serve app's name and the dashboard's
URL. Other Ray drivers use it through `connect()` (behind `GeneratorClient.connect()`), shells
through `ray_env()` (behind `cinevivid env`). `ray.init(address="auto")` is no substitute: it
finds whichever cluster on the machine started last, and it does not know the token.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from pathlib import Path

from serve.config import DEFAULT_HOST, default_cache_dir
from serve.errors import StackNotRunning

RECORD_NAME = "launcher.json"
TOKEN_NAME = "ray_auth_token"
# Ray's single-machine mode (the one it uses on macOS and Windows): its processes bind to 127.0.0.1
# and a driver connects to 127.0.0.1 as is (in the default mode Ray swaps 127.0.0.1 for the
# machine's address, where a loopback-only cluster does not listen). `cinevivid up` starts its
# cluster so unless told otherwise (--node-ip-address); every driver of that cluster needs it too.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def state_file(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / RECORD_NAME


def read_state(cache_dir: str | Path | None = None) -> dict:
    try:
        return json.loads(state_file(cache_dir).read_text())
    except (OSError, ValueError):
        return {}


def write_state(state: dict, cache_dir: str | Path | None = None) -> None:
    path = state_file(cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state))


def reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or DEFAULT_HOST, int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def use_token(token_path: str) -> None:
    """Make this process (and the processes it starts) use the cluster token at `token_path`.
    Ray reads its auth settings once and caches them; when Ray is already imported, refresh them
    the way Ray itself does when it turns token auth on."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = token_path
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would win over the path
    if "ray._raylet" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def use_loopback_cluster() -> None:
    """Make this process (and the processes it starts) a driver of a loopback-only Ray cluster.
    Ray reads the setting when it is imported; when it already is, set what it read."""
    os.environ.update(LOOPBACK_ENV)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def recorded_stack(cache_dir: str | Path | None = None) -> dict:
    """The record of the running stack; StackNotRunning (saying what to do) when there is none or
    its cluster is gone."""
    path = state_file(cache_dir)
    state = read_state(cache_dir)
    if not state.get("address"):
        raise StackNotRunning(f"no CineVivid stack recorded in {path}: start one with `cinevivid up` "
                              "(with the same CINEVIVID_CACHE_DIR)")
    if not reachable(state["address"]):
        raise StackNotRunning(f"the Ray cluster recorded in {path} ({state['address']}) does not answer: "
                              "was it stopped? Start the stack again with `cinevivid up`")
    return state


def ray_env(state: dict) -> dict[str, str]:
    """The environment that makes `ray.init()` (and Ray's CLI) join the recorded cluster."""
    env = {"RAY_ADDRESS": state["address"]}
    if state.get("loopback"):
        env.update(LOOPBACK_ENV)
    if state.get("token_path"):
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=state["token_path"])
    return env


def connect(cache_dir: str | Path | None = None, log_to_driver: bool = False) -> dict:
    """Connect this process to the Ray cluster of the stack `cinevivid up` runs (a no-op when Ray
    is already initialised here). Returns the record (its "app_name" is the Serve app).
    `log_to_driver`: echo the cluster's worker logs (every replica's, other users' jobs included)
    on this process' stdout, as a plain `ray.init()` does; off by default: they are in the files
    `cinevivid logs` names."""
    import ray

    state = recorded_stack(cache_dir)
    if not ray.is_initialized():
        if state.get("token_path"):
            use_token(state["token_path"])
        if state.get("loopback"):
            use_loopback_cluster()
        ray.init(address=state["address"], logging_level="WARNING", log_to_driver=log_to_driver)
        if not log_to_driver:  # nor this driver's own Serve INFO lines (its handle's router starting)
            logging.getLogger("ray.serve").setLevel(logging.WARNING)
    return state
