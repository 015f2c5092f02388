"""Each model's backlog, published for its Transformer's autoscaling policy, and the models whose
jobs wait for a replica.

Once per poll the dispatcher asks `BacklogMonitor.refresh()`:

- it reads the active jobs (queued + in progress, every ingress replica's) and weighs each in
  standard jobs (`serve.runtime.autoscale.job_load`: DiT token-steps over the model's default job);
- it publishes each autoscaling model's sum (`serve.runtime.autoscale.publish_backlog`), which
  `backlog_policy` turns into replicas in the Serve controller;
- for a model that may scale to zero (`min_replicas: 0` and the backlog policy) it reads the
  Transformer's running replicas from `serve.status()`: at zero, the model's jobs are held back
  (not claimed; they stay `queued` with the progress phase "starting the model", in
  GET /v1/videos/{id} and the SSE stream), and when its first replica runs, the wait is observed as
  `cinevivid_model_cold_start_seconds` and its jobs are claimed as usual.

Outside a Serve replica (an in-process test service) or without a plan it does nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from typing import Any

from serve.config import ModelConfig
from serve.contracts import QUEUED, STARTING_MODEL
from serve.jobs.metrics import JobMetrics
from serve.jobs.store import JobStore
from serve.runtime.autoscale import job_load, publish_backlog

logger = logging.getLogger(__name__)


def _serve_app_name() -> str | None:
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 - not in a Serve replica
        return None


def running_replicas(app: str) -> dict[str, int]:
    """Running replicas per deployment of Serve app `app` (a controller call: run it off the loop)."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return {}
    return {name: int(d.replica_states.get("RUNNING", 0)) for name, d in status.deployments.items()}


class BacklogMonitor:
    def __init__(self, store: JobStore, metrics: JobMetrics, models: list[ModelConfig],
                 scaling: dict[str, Any] | None, interval_s: float):
        self.store = store
        self.metrics = metrics
        self.facts: dict[str, dict] = dict((scaling or {}).get("models") or {})
        self.defaults = {m.name: (m.num_frames, m.height, m.width, m.num_inference_steps) for m in models}
        self.interval_s = max(0.2, interval_s)
        self.app = _serve_app_name() if self.facts else None
        published = {m for m, f in self.facts.items() if f.get("backlog_policy")}
        self.published = published if self.app else set()
        # models that may be at zero replicas: held back until a replica runs
        self.scale_to_zero = {m for m in self.published if self.facts[m]["min_replicas"] == 0}
        self.held: set[str] = set(self.scale_to_zero)
        self.waiting_since: dict[str, float] = {}
        self.last: dict[str, dict] = {}  # the last backlog per model (stats)
        self._at = 0.0

    @property
    def active(self) -> bool:
        return bool(self.published)

    def hold(self) -> frozenset[str]:
        return frozenset(self.held)

    def _load(self, model: str, spec_json: str) -> float:
        try:
            spec = json.loads(spec_json)
            return job_load(spec["num_frames"], spec["height"], spec["width"], spec["num_inference_steps"],
                            default=self.defaults[model])
        except Exception:  # noqa: BLE001 - an unreadable spec weighs one job
            return 1.0

    async def refresh(self, force: bool = False) -> frozenset[str]:
        """Publish the backlog and return the models whose jobs are held back now."""
        if not self.active:
            return frozenset()
        now = time.monotonic()
        if not force and now - self._at < self.interval_s:
            return self.hold()
        self._at = now
        rows = await self.store.backlog()
        per: dict[str, dict] = defaultdict(lambda: {"load": 0.0, "jobs": 0, "queued": 0, "unmarked": []})
        for r in rows:
            if r["model"] not in self.published:
                continue
            b = per[r["model"]]
            b["load"] += self._load(r["model"], r["spec"])
            b["jobs"] += 1
            if r["status"] == QUEUED:
                b["queued"] += 1
                if r["stage"] != STARTING_MODEL:
                    b["unmarked"].append(r["id"])
        running = await asyncio.to_thread(self._publish_and_read, {m: per[m] for m in self.published})
        for model in self.scale_to_zero:
            await self._gate(model, per[model], running)
        self.last = {m: {k: v for k, v in per[m].items() if k != "unmarked"} for m in self.published}
        return self.hold()

    def _publish_and_read(self, per: dict[str, dict]) -> dict[str, int] | None:
        for model, b in per.items():
            try:
                publish_backlog(self.app, self.facts[model]["deployment"], load=b["load"], jobs=b["jobs"],
                                queued=b["queued"])
            except Exception:  # noqa: BLE001 - the GCS may be briefly away; next poll
                logger.warning("backlog of %s: publish failed", model, exc_info=True)
        if not self.scale_to_zero:
            return None
        try:
            return running_replicas(self.app)
        except Exception:  # noqa: BLE001 - unknown: keep the last decision
            logger.warning("serve.status() failed; replica counts unknown this poll", exc_info=True)
            return None

    async def _gate(self, model: str, backlog: dict, running: dict[str, int] | None) -> None:
        if running is None:
            return
        replicas = running.get(self.facts[model]["deployment"], 0)
        if replicas == 0:
            self.held.add(model)
            if backlog["queued"]:
                if model not in self.waiting_since:
                    self.waiting_since[model] = time.monotonic()
                    self.metrics.models_waiting.labels(model).set(1)
                    logger.info("model %s is at zero replicas with %d job(s) queued: starting it", model,
                                backlog["queued"])
                await self.store.set_queued_stage(backlog["unmarked"], STARTING_MODEL)
            return
        self.held.discard(model)
        since = self.waiting_since.pop(model, None)
        if since is not None:
            waited = time.monotonic() - since
            self.metrics.cold_start.labels(model).observe(waited)
            self.metrics.models_waiting.labels(model).set(0)
            logger.info("model %s: its Transformer is running after a %.1f s cold start", model, waited)
