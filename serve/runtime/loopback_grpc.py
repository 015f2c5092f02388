"""Serve replicas' inter-deployment gRPC servers on loopback, on a single-machine stack.

Ray 2.60 starts one gRPC server per Serve replica (the server that takes the calls of other
deployments' handles) and binds it to every interface: `ray/serve/_private/replica.py`,
`_on_initialized`:

    self._internal_grpc_port = add_port_to_grpc_server(self._server, "[::]:0")

with no option to change it. Callers reach a replica at `<its node's IP>:<that port>`, and on a
loopback cluster (`cinevivid up`, `make run`, the tests: every Ray process on 127.0.0.1) that IP is
127.0.0.1, so binding 127.0.0.1 instead takes the same calls and nothing from outside the machine.

`bind_loopback` is a Ray `runtime_env` `worker_process_setup_hook` (the app builder puts it in every
deployment's `ray_actor_options.runtime_env`, see `with_hook`): it runs in each replica's worker
process before the replica is created, and swaps the name
`add_port_to_grpc_server` in that module for one that turns `[::]:0` into `127.0.0.1:0`. On a node
whose IP is not a loopback address (a real multi-node cluster, whose nodes must reach each other)
it changes nothing.

Across Ray upgrades: the hook first checks that the replica code still binds the literal it
replaces, through the name it replaces. If an upgrade moves or renames it, the hook raises; Ray then
stops the worker ("worker_process_setup_hook failed"), the replica never starts and the deploy
fails, naming this module: loud, never a silent return to `[::]`. The socket scan in
tests/test_ops_dashboard.py and tests/test_session_cluster.py (no listener beyond loopback, no
exception) catches the other direction, a server bound some new way.
"""

from __future__ import annotations

import functools
import inspect
import ipaddress
import logging

logger = logging.getLogger(__name__)

HOOK = "serve.runtime.loopback_grpc.bind_loopback"  # what goes in runtime_env["worker_process_setup_hook"]
REPLICA_MODULE = "ray.serve._private.replica"
BIND_NAME = "add_port_to_grpc_server"
ANY_ADDRESS = "[::]:0"
LOOPBACK_ADDRESS = "127.0.0.1:0"


class RayReplicaCodeMoved(RuntimeError):
    """The installed Ray no longer binds its replicas' gRPC servers the way this hook patches."""


def check_replica_code(module) -> None:
    """Raise RayReplicaCodeMoved unless `module` (ray.serve._private.replica) binds its gRPC server
    with `add_port_to_grpc_server(..., "[::]:0")`, the call this hook rewrites."""
    binder = getattr(module, BIND_NAME, None)
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError) as exc:
        raise RayReplicaCodeMoved(f"cannot read the source of {module.__name__}: {exc}") from exc
    if not callable(binder) or f'{BIND_NAME}(self._server, "{ANY_ADDRESS}")' not in source:
        import ray

        raise RayReplicaCodeMoved(
            f"Ray {ray.__version__} no longer binds Serve replicas' gRPC servers with "
            f'{BIND_NAME}(self._server, "{ANY_ADDRESS}") in {module.__name__}: '
            f"{__name__} cannot keep them on loopback; update it for this Ray")


def _is_loopback(ip: str | None) -> bool:
    try:
        return ip is not None and ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def _node_ip() -> str | None:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - not connected: decide from nothing, change nothing
        return None


def patch_replica_module(module) -> bool:
    """Make `module`'s replicas bind their gRPC servers to 127.0.0.1. Idempotent; True when patched."""
    check_replica_code(module)
    original = getattr(module, BIND_NAME)
    if getattr(original, "_cinevivid_loopback", False):
        return True

    @functools.wraps(original)
    def bind(server, address):
        return original(server, LOOPBACK_ADDRESS if address == ANY_ADDRESS else address)

    bind._cinevivid_loopback = True
    setattr(module, BIND_NAME, bind)
    return True


def bind_loopback() -> None:
    """The worker-process setup hook: on a loopback node, Serve replicas' gRPC servers bind
    127.0.0.1. Raises (and Ray stops the worker) if the installed Ray's code has moved."""
    import importlib

    module = importlib.import_module(REPLICA_MODULE)
    check_replica_code(module)  # on every node: an upgrade is caught wherever it runs
    if _is_loopback(_node_ip()):
        patch_replica_module(module)


def with_hook(runtime_env: dict | None) -> dict:
    """`runtime_env` with this hook as its `worker_process_setup_hook` (one the config sets wins).

    Ray turns a job's hook (`ray.init(runtime_env=...)`) into the environment variable its workers
    run the hook from (`ray._private.runtime_env.setup_hook.export_setup_func_module`), but leaves
    an actor's `worker_process_setup_hook` as is, unused. A replica's runtime_env therefore carries
    that variable too, set the way Ray sets it for a hook given by module path."""
    from ray._private import ray_constants

    env = dict(runtime_env or {})
    hook = env.setdefault("worker_process_setup_hook", HOOK)
    if isinstance(hook, str):
        env["env_vars"] = {ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR: hook, **(env.get("env_vars") or {})}
    return env
