"""The backlog drives each model's Transformer replicas: Ray Serve's custom autoscaling policy
(`autoscaling_config.policy.policy_function: serve.runtime.autoscale:backlog_policy`) and the
backlog it reads.

The job queue lives in the database, out of Serve's sight: a backlog of 100 queued jobs would look,
to Serve's default policy, like the few jobs the dispatchers have handed over. So the ingress
(`serve.jobs.backlog.BacklogMonitor`) publishes each model's backlog - its queued and in-progress
jobs, weighted by cost - into the GCS key-value store, under `<app>/<Transformer deployment>`, and
this policy, run by the Serve controller once per control-loop tick, reads it:

    demand   = max(published backlog, the replicas' own in-flight load, requests at the handles)
    replicas = ceil(demand / target_ongoing_requests)

in "standard jobs": a job at the model's default size, frames and steps weighs 1; a job twice as
many DiT token-steps weighs 2 (`job_load`). Serve applies min/max_replicas, upscale/downscale
delays and factors around it, so `min_replicas: 0` gives the GPUs back after `downscale_delay_s`
with nothing queued, and a backlog on a model at zero replicas starts one at once (Serve skips the
upscale delay from zero).

Why the key-value store: a deployment-level policy only sees its own deployment's metrics (its
replicas' `record_autoscaling_stats`, its handles' queues). At zero replicas there is no replica to
report, and the dispatchers hold back a model's jobs until it has a replica (a job waits `queued`,
"starting the model"), so nothing reaches its handles either. Serve's application-level policy
(`applications[].autoscaling_policy`) could read the Ingress replicas' custom metrics, but in the
installed Ray it is config-file only (not `serve.run`), marked "not yet supported", and sees only
deployments that autoscale.

The policy is cloudpickled by value into the controller: this module imports only the standard
library and Ray.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

BACKLOG_NAMESPACE = "cinevivid_backlog"
POLICY_FUNCTION = "serve.runtime.autoscale:backlog_policy"
# the replica's own in-flight load, reported by `Transformer.record_autoscaling_stats`
LOAD_METRIC = "cinevivid_load"
# a published backlog older than this is ignored (its ingress is gone): the replicas' own report rules
BACKLOG_MAX_AGE_S = 30.0


def token_steps(num_frames: int, height: int, width: int, steps: int) -> int:
    """A job's DiT work: latent tokens (frames /4, pixels /8 by the VAE, /2x2 by the patch) x steps."""
    return ((max(1, num_frames) - 1) // 4 + 1) * max(1, height // 16) * max(1, width // 16) * max(1, steps)


def job_load(num_frames: int, height: int, width: int, steps: int, *, default: tuple[int, int, int, int]) -> float:
    """A job's weight in standard jobs: its token-steps over those of the model's default job
    (`default` = (num_frames, height, width, steps))."""
    return token_steps(num_frames, height, width, steps) / token_steps(*default)


def backlog_key(app: str, deployment: str) -> bytes:
    return f"{app}/{deployment}".encode()


def publish_backlog(app: str, deployment: str, *, load: float, jobs: int, queued: int) -> None:
    """Write one deployment's backlog for the policy (a GCS call: run it off the event loop)."""
    from ray.experimental.internal_kv import _internal_kv_put

    value = json.dumps({"load": load, "jobs": jobs, "queued": queued, "at": time.time()})
    _internal_kv_put(backlog_key(app, deployment), value.encode(), overwrite=True, namespace=BACKLOG_NAMESPACE)


def read_backlog(app: str, deployment: str, max_age_s: float = BACKLOG_MAX_AGE_S) -> dict[str, Any] | None:
    """The backlog last published for a deployment, or None (none, unreadable, or stale)."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return None
    try:
        raw = _internal_kv_get(backlog_key(app, deployment), namespace=BACKLOG_NAMESPACE)
        value = json.loads(raw) if raw else None
    except Exception:  # noqa: BLE001 - a failed read counts as no backlog published
        return None
    if not value or time.time() - float(value.get("at", 0)) > max_age_s:
        return None
    return value


def desired_replicas(demand: float, target_per_replica: float) -> int:
    """Replicas for `demand` standard jobs at `target_per_replica` each (before Serve's bounds)."""
    if demand <= 0:
        return 0
    return max(1, math.ceil(demand / max(target_per_replica, 1e-9) - 1e-9))


def backlog_policy(ctx) -> tuple[int, dict[str, Any]]:
    """Serve's custom autoscaling policy for a Transformer: replicas for the model's backlog.

    `ctx` is Serve's `AutoscalingContext`; the returned count is bounded by Serve (min/max
    replicas, delays, factors). `policy_state` keeps the inputs of the last decision for
    `serve.status()`-side debugging."""
    published = read_backlog(ctx.app_name or "", ctx.deployment_name)
    backlog = float(published["load"]) if published else 0.0
    own = 0.0
    try:
        metrics = ctx.aggregated_metrics or {}
        own = float(sum((metrics.get(LOAD_METRIC) or {}).values()))
    except Exception:  # noqa: BLE001 - no replica reported yet
        own = 0.0
    handles = float(ctx.total_num_requests or 0.0)
    demand = max(backlog, own, handles)
    target = ctx.config.get_target_ongoing_requests() if ctx.config is not None else 1.0
    state = dict(ctx.policy_state or {})
    state["cinevivid"] = {"backlog": backlog, "own": own, "handles": handles, "demand": demand}
    return desired_replicas(demand, target), state
