"""The job service behind the HTTP routes: validation against the model's bounds and the configured
limits (once, at submission), job records, artifacts, progress, health and stats. It knows users
only by id: authentication and rate limits are the HTTP layer's (`serve.api`). The Ingress
deployment and bare uvicorn both build one and serve it with `serve.api.routes.create_app`."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from serve.config import AppArgs, IngressConfig, ModelConfig, TTSConfig
from serve.contracts import (
    CANCELLED, COMPLETED, DELETED, FAILED, IN_PROGRESS, QUEUED, SIZE_MULTIPLE, GenerationInputs,
    GenerationSpec, ResolvedSpec,
)
from serve.errors import InvalidSpecError, NotFound, TooManyJobsError
from serve.frames import largest_frame_count
from serve.jobs.artifacts import ArtifactStore
from serve.jobs.backlog import BacklogMonitor
from serve.jobs.db import Database
from serve.jobs.dispatcher import Dispatcher
from serve.jobs.events import ProgressBroker
from serve.jobs.generation_backend import GenerationBackend
from serve.jobs.metrics import JobMetrics
from serve.jobs.store import JobStore, new_job_id
from serve.jobs.views import video_view
from serve.jobs.webhook_store import WebhookStore
from serve.jobs.webhooks import WebhookWorker
from serve.media.inputs import ImageLimits, VideoLimits
from serve.media.prepare import prepare_job
from serve.pipeline.spec import resolve_spec, select_model

logger = logging.getLogger(__name__)

VERSION = "0.1.0"


class JobService:
    def __init__(self, app_args: AppArgs | dict, generator: GenerationBackend, scaling: dict | None = None):
        self.app_args = app_args if isinstance(app_args, AppArgs) else AppArgs.model_validate(app_args)
        self.config: IngressConfig = self.app_args.ingress
        self.generator = generator
        # every model of the set, its bounds narrowed by the ingress limits; the first is the default
        self.models = [self._limited_model(m, self.config) for m in self.app_args.models]
        self.model_cfg = self.models[0]
        self.tts_cfg: TTSConfig = self.app_args.tts
        self.db = Database(self.config.resolved_database_url(), busy_timeout_ms=self.config.sqlite_busy_timeout_ms)
        self.store = JobStore(self.db)
        self.artifacts = ArtifactStore(self.config.resolved_data_dir())
        self.metrics = JobMetrics(data_dir=self.artifacts.root)
        self.broker = ProgressBroker(self.config.dispatcher.subscriber_history)
        # `scaling` (serve.app.scaling_facts, from the Ingress): each model's Transformer range, the dispatch limit
        self.backlog = BacklogMonitor(self.store, self.metrics, self.models, scaling,
                                      self.config.dispatcher.poll_interval_s)
        self.dispatcher = Dispatcher(self.store, generator, self.artifacts, self.broker, self.metrics,
                                     self.config.dispatcher, self.tts_cfg, backlog=self.backlog,
                                     dispatch_limit=(scaling or {}).get("dispatch_limit"))
        self.webhook_store = WebhookStore(self.db, self.config.webhooks)
        self.webhooks = WebhookWorker(self.webhook_store, self.config.webhooks, self.metrics)
        self.store.on_webhooks = self.webhooks.wake  # a job that finishes here is announced at once
        self._voice_catalog: tuple[float, dict | None] | None = None  # (when, catalog), cached
        self._started = False
        self._migrate_task: asyncio.Task | None = None
        self._health_task: asyncio.Task | None = None

    @staticmethod
    def _limited_model(model: ModelConfig, config: IngressConfig) -> ModelConfig:
        """The model's bounds, narrowed by the ingress limits where those are set."""
        lim = config.limits
        upd: dict[str, Any] = {}
        for field, limit in (("max_prompt_chars", lim.max_prompt_chars), ("max_frames", lim.max_frames),
                             ("max_width", lim.max_width), ("max_height", lim.max_height),
                             ("max_steps", lim.max_steps)):
            if limit is not None:
                upd[field] = min(getattr(model, field), limit)
        limited = model.model_copy(update=upd)
        # defaults above a narrowed bound come down to it, so a request without them still fits
        defaults = {
            "width": min(limited.width, max(SIZE_MULTIPLE, limited.max_width // SIZE_MULTIPLE * SIZE_MULTIPLE)),
            "height": min(limited.height, max(SIZE_MULTIPLE, limited.max_height // SIZE_MULTIPLE * SIZE_MULTIPLE)),
            "num_frames": min(limited.num_frames, largest_frame_count(limited.max_frames)),
            "num_inference_steps": min(limited.num_inference_steps, limited.max_steps),
        }
        return limited.model_copy(update=defaults)

    # ---- lifecycle ----
    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.artifacts.ensure()
        try:
            await self.db.migrate()
            self.db.restrict_file_modes()
        except Exception:  # the database may be down; /health says so, the dispatcher retries
            logger.exception("database migration failed at startup (%s); will retry", self._safe_db_url())
            self._migrate_task = asyncio.create_task(self._retry_migrate())
        else:
            await self.dispatcher.start()
            await self.webhooks.start()
        # after the first migration attempt: a health check's connection must not race the one that
        # switches a new SQLite file to WAL
        if self.config.health_check_interval_s > 0:
            self._health_task = asyncio.create_task(self._check_health_periodically(), name="cinevivid-health")

    async def _retry_migrate(self) -> None:
        delay = 1.0
        while True:
            await asyncio.sleep(delay)
            try:
                await self.db.migrate()
            except Exception as exc:  # noqa: BLE001
                logger.warning("database still unavailable: %s", type(exc).__name__)
                delay = min(delay * 2, 30.0)
                continue
            logger.info("database available; starting the dispatcher")
            await self.dispatcher.start()
            await self.webhooks.start()
            return

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        for task in (self._migrate_task, self._health_task):
            if task:
                task.cancel()
        await self.dispatcher.stop()  # first: a job released or failed now still queues its webhooks
        await self.webhooks.stop()
        await self.db.dispose()

    def _safe_db_url(self) -> str:
        from sqlalchemy.engine import make_url

        return make_url(self.db.url).render_as_string(hide_password=True)

    # ---- specs ----
    def model_for(self, name: str | None, mode: str = "text-to-video") -> ModelConfig:
        """The model a request names (None: the default, or the first that does `mode`), with its
        bounds as this service applies them; an error naming `model` when none fits."""
        return select_model(GenerationSpec(prompt="-", model=name, mode=mode), self.models)

    def image_limits(self) -> ImageLimits:
        lim = self.config.limits
        return ImageLimits(max_bytes=lim.max_image_bytes, max_width=lim.max_image_side,
                           max_height=lim.max_image_side, max_pixels=lim.max_image_pixels)

    def video_limits(self) -> VideoLimits:
        """What a video to extend may be."""
        lim = self.config.limits
        return VideoLimits(max_bytes=lim.max_video_bytes, max_width=lim.max_video_side,
                           max_height=lim.max_video_side, max_pixels=lim.max_video_side ** 2,
                           max_frames=lim.max_video_frames)

    def prepare(self, spec: GenerationSpec, inputs: GenerationInputs | None, **kw):
        """`serve.media.prepare.prepare_job` with this service's models and limits."""
        return prepare_job(spec, inputs, self.models, self.tts_cfg, image_limits=self.image_limits(),
                           video_limits=self.video_limits(), **kw)

    def resolve(self, spec: GenerationSpec, **inputs) -> ResolvedSpec:
        """`inputs`: what `resolve_spec` takes about the job's image or source video."""
        return resolve_spec(spec, self.models, self.tts_cfg, **inputs)

    VOICE_CATALOG_TTL_S = 30.0

    async def check_voiceover(self, voiceover) -> None:
        """Refuse, at submission, a voice-over the TTS stage could not speak: a provider it has not
        configured (ElevenLabs without its key), or a voice its provider's list does not have. The
        stage's catalog is cached for VOICE_CATALOG_TTL_S; when it cannot be had (no TTS stage, the
        stage down) the voice-over is passed on and the stage decides, as before."""
        from serve.pipeline.voiceover import validate_voiceover

        now = time.monotonic()
        if self._voice_catalog is None or now - self._voice_catalog[0] > self.VOICE_CATALOG_TTL_S:
            catalog = None
            fetch = getattr(self.generator, "voice_catalog", None)
            if fetch is not None:
                try:
                    catalog = await asyncio.wait_for(fetch(), 10)
                except Exception as exc:  # noqa: BLE001 - the stage decides at run time then
                    logger.warning("voice catalog unavailable: %s", exc)
            self._voice_catalog = (now, catalog)
        catalog = self._voice_catalog[1]
        if catalog is not None:
            validate_voiceover(voiceover, self.tts_cfg, known_voices=catalog, available=catalog)

    # ---- jobs ----
    async def submit(self, user_id: str, spec: GenerationSpec | ResolvedSpec, *, remixed_from: str | None = None,
                     input_files: dict[str, bytes | Path] | None = None) -> dict:
        """Validate `spec` (the one validation of a job's spec; a ResolvedSpec was validated by the
        caller) and queue it. `input_files`: the job's inputs (see ArtifactStore.save_inputs),
        saved before the job exists and removed again if it cannot be queued."""
        resolved = spec if isinstance(spec, ResolvedSpec) else self.resolve(spec)
        if resolved.voiceover is not None:
            await self.check_voiceover(resolved.voiceover)
        job_id = new_job_id()
        if input_files:
            await self.artifacts.save_inputs(job_id, input_files)
        try:
            job = await self.store.create(
                user_id=user_id, model=resolved.model, prompt=resolved.prompt,
                spec_json=resolved.model_dump_json(), remixed_from=remixed_from,
                max_active_per_user=self.config.limits.max_concurrent_jobs_per_user, job_id=job_id)
        except BaseException:
            if input_files:
                await self.artifacts.delete_inputs(job_id)
            raise
        self.metrics.jobs_submitted.inc()
        logger.info("job %s: queued for user %s (%dx%d, %d frames, %d steps)", job["id"], user_id,
                    resolved.width, resolved.height, resolved.num_frames, resolved.num_inference_steps)
        self.dispatcher.wake()
        return job

    async def check_job_capacity(self, user_id: str) -> None:
        """429 too_many_active_jobs when the user already has the most active jobs allowed: asked
        before a request's body is read or decoded (submit checks again, atomically)."""
        cap = self.config.limits.max_concurrent_jobs_per_user
        active = await self.store.active_count(user_id)
        if active >= cap:
            raise TooManyJobsError(f"you have {active} queued or running jobs; the limit is {cap}", retry_after_s=5)

    async def get_job(self, user_id: str, job_id: str) -> dict:
        job = await self.store.get(job_id, user_id)
        if job is None:
            raise NotFound(f"no video with id {job_id!r}", param="video_id")
        return job

    async def remix(self, user_id: str, job_id: str, prompt: str) -> dict:
        src = await self.get_job(user_id, job_id)
        resolved = ResolvedSpec.model_validate_json(src["spec"])
        if resolved.mode != "text-to-video":
            raise InvalidSpecError(f"video {job_id} was made by {resolved.mode}; only text-to-video videos can be "
                                   "remixed (create a new one from the same inputs)", param="video_id")
        spec = resolved.as_request()
        spec["prompt"] = prompt
        return await self.submit(user_id, GenerationSpec.model_validate(spec), remixed_from=src["id"])

    async def cancel(self, user_id: str, job_id: str) -> dict:
        before = await self.store.get(job_id, user_id)
        job = await self.store.request_cancel(job_id, user_id)
        if job is None:
            raise NotFound(f"no video with id {job_id!r}", param="video_id")
        if job["status"] == FAILED:  # ended (in the queue, or before): its inputs are not needed any more
            await self.artifacts.delete_inputs(job_id)
        if before is not None and before["status"] == QUEUED and job["status"] == FAILED:
            self.metrics.observe_failure(CANCELLED)  # failed here, in the queue (a running job: by its dispatcher)
        if job["status"] == IN_PROGRESS:
            if self.dispatcher.cancel_local(job_id, CANCELLED):
                await self._wait_not_running(job_id)
                job = await self.store.get(job_id) or job
        logger.info("job %s: cancel requested by user %s; now %s", job_id, user_id, job["status"])
        return job

    async def delete(self, user_id: str, job_id: str) -> dict:
        job = await self.store.delete(job_id, user_id)
        if job is None:
            raise NotFound(f"no video with id {job_id!r}", param="video_id")
        if self.dispatcher.cancel_local(job_id, DELETED):
            await self._wait_not_running(job_id)
        await self.artifacts.delete(job["video_path"], job["thumbnail_path"], *self.artifacts.paths(job_id),
                                    *self.artifacts.preview_paths(job_id))
        await self.artifacts.delete_inputs(job_id)
        logger.info("job %s: deleted by user %s (was %s)", job_id, user_id, job["status"])
        return job

    async def _wait_not_running(self, job_id: str, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while job_id in self.dispatcher.running_ids and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    # ---- views ----
    def video_view(self, job: dict) -> dict:
        return video_view(job, self.artifacts.preview_state(job["id"]) if job["status"] == IN_PROGRESS else None)

    def task_view(self, job: dict) -> dict:
        v = self.video_view(job)
        done = job["status"] == COMPLETED
        return {"task_id": job["id"], "status": job["status"], "progress": v["progress"], "stage": v["stage"],
                "prompt": job["prompt"], "created_at": v["created_at"], "completed_at": v["completed_at"],
                "error": v["error"], "has_audio": v["has_audio"],
                "video_url": f"/v1/videos/{job['id']}/content" if done else None,
                "thumbnail_url": f"/v1/videos/{job['id']}/content?variant=thumbnail" if done else None}

    # ---- health & stats ----
    async def health(self) -> dict:
        timeout = self.config.health_timeout_s
        services: dict[str, dict] = {}
        try:
            await self.db.ping(timeout)
            services["database"] = {"status": "healthy", "detail": self.db.read_engine.dialect.name}
        except Exception as exc:  # noqa: BLE001
            services["database"] = {"status": "unhealthy", "detail": f"unreachable: {type(exc).__name__}: {exc}"[:300]}
        try:
            disk = await asyncio.to_thread(self.artifacts.check_writable, *self.db.local_folders())
            services["storage"] = {"status": "healthy", "detail": f"{disk['free_bytes'] // 2**20} MiB free"}
        except Exception as exc:  # noqa: BLE001
            services["storage"] = {"status": "unhealthy", "detail": f"{type(exc).__name__}: {exc}"[:300]}
        generator_ok = True
        try:
            stages = await asyncio.wait_for(self.generator.health(), timeout)
            for name, h in stages.items():
                services[name] = {"status": "healthy" if h.get("status") == "healthy" else "unhealthy",
                                  "detail": str(h.get("detail", ""))[:300]}
        except Exception as exc:  # noqa: BLE001
            generator_ok = False
            services["generator"] = {"status": "unhealthy", "detail": f"unreachable: {type(exc).__name__}"}
        services["gpu"] = self._gpu_health()
        bad = [k for k, v in services.items() if v["status"] == "unhealthy"]
        if not bad:
            overall = "healthy"
        elif not generator_ok and services["database"]["status"] == "unhealthy":
            overall = "unhealthy"
        else:
            overall = "degraded"
        self.metrics.set_health(services)
        return {"status": overall, "services": services}

    async def _check_health_periodically(self) -> None:
        """Keep the per-service health gauge current when nobody calls /health."""
        while True:
            try:
                await self.health()
            except Exception:  # noqa: BLE001 - health() reports failures; this is a safety net
                logger.warning("periodic health check failed", exc_info=True)
            await asyncio.sleep(self.config.health_check_interval_s)

    def _gpu_health(self) -> dict:
        try:
            import torch

            if not torch.cuda.is_available():
                return {"status": "unavailable", "detail": "no GPU visible to the ingress (stages report their own)"}
            parts = []
            for i in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(i)
                parts.append(f"cuda:{i} {(total - free) // 2**20}/{total // 2**20} MiB")
            return {"status": "healthy", "detail": "; ".join(parts)}
        except Exception as exc:  # noqa: BLE001
            return {"status": "unhealthy", "detail": f"{type(exc).__name__}: {exc}"[:300]}

    async def refresh_gauges(self) -> None:
        counts = await self.store.counts_by_status()
        for status, n in counts.items():
            self.metrics.jobs_by_status.labels(status).set(n)
        self.metrics.queue_depth.set(counts.get(QUEUED, 0))

    async def admin_stats(self) -> dict:
        counts = await self.store.counts_by_status()
        return {"total_videos": counts.get(COMPLETED, 0), "active_users": await self.store.active_users(),
                "jobs_by_status": counts, "queue_depth": counts.get(QUEUED, 0),
                "running_here": len(self.dispatcher.running_ids)}
