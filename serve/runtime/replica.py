"""What every replica of the app shares: its log lines in the replica's Serve log, who it is as a
caller, and noticing when the callers of its work are gone.

- `setup_replica_logging()`: Ray Serve writes a replica's log file (`logs/serve/replica_<app>_
  <deployment>_<id>.log` in the Ray session dir) through the "ray.serve" logger only. The package's
  loggers (`serve.*`, `deployments.*`, `client.*`) are handed to that logger's handlers, so their
  lines land in the same file with the same format, and do not propagate to the root logger (no
  second copy on stderr).
- `caller_id()`: this process's Ray actor id, passed with each stage call (`caller=`) so that the
  stage can tell when the caller is gone. Ray does not cancel an actor task whose caller died: a
  killed Generator would leave its denoising running to the end.
- `CallerWatch`: one per replica; while work is in flight it asks the GCS, every `interval_s`, about
  the actors that called it (one cheap lookup per distinct caller) and calls back for the dead ones.
- `actor_state()`, `cluster_tag()`: the same lookup, and which Ray cluster this is, for the job
  dispatcher's "is the replica that holds this lease still there" check.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Callable

logger = logging.getLogger(__name__)

PACKAGE_LOGGERS = ("serve", "deployments", "client")
GONE_STATES = ("DEAD", "NOT_FOUND")


class _ToServeLog(logging.Handler):
    """Hands a record to the "ray.serve" logger's handlers (looked up per record, so a Serve
    logging reconfiguration is followed)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("ray.serve").handle(record)


def setup_replica_logging() -> bool:
    """Send the package's log lines to this Serve replica's log file. Call it in a deployment's
    `__init__`; outside a Serve replica it does nothing (returns False). Idempotent."""
    try:
        from ray import serve

        serve.get_replica_context()
    except Exception:  # noqa: BLE001 - not in a replica (a driver, a test process)
        return False
    level = logging.getLogger("ray.serve").getEffectiveLevel()
    for name in PACKAGE_LOGGERS:
        package_logger = logging.getLogger(name)
        if not any(isinstance(h, _ToServeLog) for h in package_logger.handlers):
            package_logger.addHandler(_ToServeLog())
        package_logger.propagate = False
        package_logger.setLevel(level)
    return True


def caller_id() -> str | None:
    """This process's Ray actor id (hex), or None outside an actor (a driver)."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return ray.get_runtime_context().get_actor_id()
    except Exception:  # noqa: BLE001
        return None


def replica_id() -> str | None:
    """This Serve replica's unique id (a restarted or replaced replica gets a new one); None outside one."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not in a replica
        return None


def cluster_tag() -> str | None:
    """A short tag of this Ray cluster (its session), or None without Ray: actor ids are only
    looked up in the cluster that made them."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return hashlib.sha256(ray.get_runtime_context().get_session_name().encode()).hexdigest()[:8]
    except Exception:  # noqa: BLE001
        return None


async def actor_state(actor_id: str, timeout_s: float = 5.0) -> tuple[str, float | None]:
    """(state, death time) of a Ray actor from the GCS: "ALIVE", "RESTARTING", "DEAD", ... or
    "NOT_FOUND"; the death time (epoch seconds) when it is dead. One GCS request (about 1 ms)."""
    import ray
    from ray.core.generated import gcs_pb2

    gcs = ray._private.worker.global_worker.gcs_client
    infos = await gcs.async_get_all_actor_info(actor_id=ray.ActorID.from_hex(actor_id), timeout=timeout_s)
    if not infos:
        return "NOT_FOUND", None
    data = next(iter(infos.values()))
    state = gcs_pb2.ActorTableData.ActorState.Name(data.state)
    return state, (data.end_time / 1000.0 if state == "DEAD" and data.end_time else None)


class CallerWatch:
    """Calls `on_gone(died_at)` once for each watched caller that is no longer alive.

    `watch(caller, on_gone)` returns `unwatch()`; a polling task runs on the replica's event loop
    only while something is watched. A lookup that fails (GCS busy) counts as alive."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self._watchers: dict[str, list[Callable[[float], None]]] = {}
        self._task: asyncio.Task | None = None
        self.callers_gone = 0  # for stats

    def watch(self, caller: str | None, on_gone: Callable[[float], None]) -> Callable[[], None]:
        if not caller:
            return lambda: None
        callbacks = self._watchers.setdefault(caller, [])
        callbacks.append(on_gone)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll(), name="cinevivid-caller-watch")

        def unwatch() -> None:
            current = self._watchers.get(caller)
            if current is not None and on_gone in current:
                current.remove(on_gone)
                if not current:
                    del self._watchers[caller]
        return unwatch

    @property
    def watched(self) -> int:
        return sum(len(v) for v in self._watchers.values())

    async def _poll(self) -> None:
        while self._watchers:
            await asyncio.sleep(self.interval_s)
            for caller in list(self._watchers):
                try:
                    state, died_at = await actor_state(caller)
                except Exception:  # noqa: BLE001 - unknown is not gone
                    logger.debug("caller %s: state lookup failed", caller, exc_info=True)
                    continue
                if state not in GONE_STATES:
                    continue
                callbacks = self._watchers.pop(caller, [])
                self.callers_gone += 1
                logger.warning("caller %s is %s: stopping its %d call(s)", caller, state.lower(), len(callbacks))
                for on_gone in callbacks:
                    try:
                        on_gone(died_at or time.time())
                    except Exception:  # noqa: BLE001
                        logger.exception("stopping a call of a gone caller failed")
