"""The job dispatcher inside the ingress: claims queued jobs (conditional UPDATE + lease), drives
the Generator's progress stream, publishes progress (live to subscribers, throttled to the DB),
stores the artifacts and finishes the record. Interrupted jobs (lease expired, shutdown) are
re-queued or, after `max_attempts`, failed with a reason. At most `limit` run here: the config's
`max_concurrent_jobs`, else what the stages can hold (the plan's `dispatch_limit`), else 2. Each poll
the backlog is published for the Transformers' autoscaling policy (`serve.jobs.backlog`), and the
jobs of a model at zero replicas are left queued ("starting the model") until its replica runs.

The lease owner names the replica: `<replica>@<host>:<pid> actor=<Ray actor id> ray=<cluster tag>`
(`<host>:<pid>:<random>` outside a Ray actor). On start and at each recovery poll the dispatcher
asks the GCS about the owners of the in-progress jobs: the jobs of an ingress replica that no
longer exists (actor dead, or unknown to this cluster) are taken over at once, the same way as an
expired lease (the crash spends an attempt), instead of after `lease_seconds`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
import uuid

from serve.config import DispatcherConfig, TTSConfig
from serve.contracts import (
    CANCEL_REASONS, CANCELLED, CANCELLED_MESSAGE, COMPLETED, DELETED, FAILED, IN_PROGRESS, SHUTDOWN,
    WAITING_FOR_CAPACITY, ErrorInfo, GenerationInputs, ProgressEvent, ResolvedSpec,
)
from serve.errors import (
    CineVividError, GenerationCancelled, InputsMissing, InsufficientStorage, JobLost, NoResult, OverloadedError,
    StageBusy, StageUnavailable, StorageError, TTSError, busy, is_disk_full, replica_stopped, unwrap_error,
)
from serve.jobs.artifacts import ArtifactStore
from serve.jobs.backlog import BacklogMonitor
from serve.jobs.events import ProgressBroker
from serve.jobs.generation_backend import GenerationBackend
from serve.jobs.metrics import JobMetrics
from serve.jobs.store import JobStore
from serve.runtime.replica import GONE_STATES, actor_state, caller_id, cluster_tag

logger = logging.getLogger(__name__)
_OWNER_ACTOR = re.compile(r" actor=([0-9a-f]+) ray=([0-9a-f]+)$")


def lease_owner_name() -> str:
    """This process's lease owner name (at most 128 characters, the column's size)."""
    actor, cluster = caller_id(), cluster_tag()
    host = socket.gethostname()[:40]
    if actor is None or cluster is None:
        return f"{host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    try:
        from ray import serve

        replica = serve.get_replica_context().replica_id.unique_id[:16]
    except Exception:  # noqa: BLE001 - an actor that is not a Serve replica
        replica = uuid.uuid4().hex[:8]
    return f"{replica}@{host}:{os.getpid()} actor={actor} ray={cluster}"


async def owner_is_gone(owner: str, cluster: str | None) -> bool:
    """True when `owner` was a Ray actor of this cluster that no longer exists. Owners of another
    cluster (or of no actor) are left to their leases; a failed lookup counts as alive."""
    match = _OWNER_ACTOR.search(owner)
    if match is None or cluster is None or match.group(2) != cluster:
        return False
    try:
        state, _ = await actor_state(match.group(1))
    except Exception:  # noqa: BLE001
        logger.debug("lease owner %s: state lookup failed", owner, exc_info=True)
        return False
    return state in GONE_STATES


class Dispatcher:
    def __init__(self, store: JobStore, generator: GenerationBackend, artifacts: ArtifactStore,
                 broker: ProgressBroker, metrics: JobMetrics, config: DispatcherConfig,
                 tts_config: TTSConfig | None = None, backlog: BacklogMonitor | None = None,
                 dispatch_limit: int | None = None):
        self.store = store
        self.backlog = backlog
        self.limit = config.max_concurrent_jobs or dispatch_limit or 2
        self.generator = generator
        self.artifacts = artifacts
        self.broker = broker
        self.metrics = metrics
        self.config = config
        self.tts_config = tts_config or TTSConfig()
        self.owner = lease_owner_name()
        self._cluster = cluster_tag()
        self._running: dict[str, asyncio.Task] = {}
        self._cancel_reason: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._stopping = False

    # ---- lifecycle ----
    async def start(self) -> None:
        self._stopping = False
        self._loop_task = asyncio.create_task(self._loop(), name="cinevivid-dispatcher")
        logger.info("dispatcher %s started (max %d concurrent jobs)", self.owner, self.limit)

    async def stop(self) -> None:
        """Stop claiming; give running jobs back to the queue so another replica (or this app
        after a restart) picks them up at once."""
        self._stopping = True
        if self._loop_task:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        running = list(self._running.items())
        for job_id, task in running:
            self._cancel_reason[job_id] = SHUTDOWN
            task.cancel()
        await asyncio.gather(*(t for _, t in running), return_exceptions=True)
        logger.info("dispatcher %s stopped; released %d running job(s)", self.owner, len(running))

    def wake(self) -> None:
        self._wake.set()

    def failed(self) -> BaseException | None:
        """The exception that ended the dispatcher loop, if it died (it should never)."""
        t = self._loop_task
        if t is not None and t.done() and not t.cancelled():
            return t.exception()
        return None

    @property
    def replica(self) -> str:
        """The readable part of the lease owner (`<replica>@<host>:<pid>`): the metrics' `replica` label."""
        return self.owner.split(" actor=")[0]

    @property
    def running_ids(self) -> list[str]:
        return list(self._running)

    def cancel_local(self, job_id: str, reason: str = CANCELLED) -> bool:
        """Stop a job running on this replica now (cancel / delete). False if it is not here."""
        if reason not in CANCEL_REASONS:
            raise ValueError(f"unknown cancel reason {reason!r} (one of {CANCEL_REASONS})")
        task = self._running.get(job_id)
        if task is None:
            return False
        self._cancel_reason[job_id] = reason
        task.cancel()
        return True

    # ---- main loop ----
    async def _loop(self) -> None:
        last_recovery = 0.0
        while not self._stopping:
            try:
                now = time.monotonic()
                if now - last_recovery >= self.config.poll_interval_s:
                    last_recovery = now
                    recovered = await self.store.recover_expired(self.config.max_attempts)
                    for status, ids in recovered.items():
                        for job_id in ids:
                            logger.warning("job %s: lease expired; now %s", job_id, status)
                            if status == FAILED:
                                self.metrics.observe_failure("max_attempts_exceeded")
                    await self._recover_gone_owners()
                hold = await self.backlog.refresh() if self.backlog is not None else frozenset()
                while len(self._running) < self.limit and not self._stopping:
                    job = await self.store.claim(self.owner, self.config.lease_seconds, hold_models=hold)
                    if job is None:
                        break
                    self._launch(job)
            except asyncio.CancelledError:
                raise
            except Exception:  # the DB may be down; keep trying
                logger.exception("dispatcher %s: loop error", self.owner)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.poll_interval_s)
            except asyncio.TimeoutError:
                pass

    async def _recover_gone_owners(self) -> None:
        """Take over at once the jobs of ingress replicas that no longer exist."""
        for owner in await self.store.lease_owners():
            if owner == self.owner or not await owner_is_gone(owner, self._cluster):
                continue
            recovered = await self.store.recover_owner(owner, self.config.max_attempts,
                                                       "its ingress replica stopped")
            for status, ids in recovered.items():
                for job_id in ids:
                    logger.warning("job %s: its ingress replica (%s) is gone; now %s", job_id, owner, status)
                    if status == FAILED:
                        self.metrics.observe_failure("max_attempts_exceeded")

    def _launch(self, job: dict) -> None:
        job_id = job["id"]
        self.broker.start(job_id)
        self.metrics.running_jobs.inc()
        self.metrics.queue_wait.observe(max(0.0, time.time() - job["created_at"]))
        task = asyncio.create_task(self._run(job), name=f"job-{job_id}")
        self._running[job_id] = task

        def _done(_t, job_id=job_id):
            self._running.pop(job_id, None)
            self._cancel_reason.pop(job_id, None)
            self.broker.finish(job_id)
            self.metrics.running_jobs.dec()
            self._wake.set()  # a slot is free
        task.add_done_callback(_done)

    # ---- one job ----
    async def _run(self, job: dict) -> None:
        job_id = job["id"]
        log = logging.LoggerAdapter(logger, {"job_id": job_id})
        started = time.time()
        log.info("job %s: claimed (attempt %d) by %s", job_id, job["attempts"], self.owner)
        self._publish(job_id, type="status", status=IN_PROGRESS, progress=0)
        stream = None
        state = {"progress": 0, "stage": None, "last_write": 0.0, "dirty": False,
                 # a long video's windows already in its preview (an earlier attempt's, when a replica
                 # died): a re-run does not show them again, so what a watcher sees never goes back
                 "windows_done": self._windows_in_preview(job_id)}
        heartbeat = asyncio.create_task(self._heartbeat(job_id, state))
        retries = 0
        waits = BusyWait(self.config.busy_wait_max_s)
        try:
            # the spec was validated once, at submission; it travels as the typed ResolvedSpec
            spec = ResolvedSpec.model_validate_json(job["spec"])
            inputs = await self._inputs(job_id, spec)
            while True:
                result = None
                try:
                    stream = self.generator.stream(spec, job_id, inputs)
                    async for event in stream:
                        if event.type == "result":
                            result = event.result
                            break
                        await self._on_event(job_id, event, state)
                except Exception as exc:  # noqa: BLE001 - a replica that stopped is retried
                    if (full := waits.stage_of(exc)) is not None:  # a full queue: wait for room, run again
                        self._cancel_stream(stream)
                        stream = None
                        await self._wait_for_capacity(job_id, full, waits, state, log)
                        continue
                    stopped = self._stopped_stage(exc)
                    if stopped is None:
                        raise
                    self._cancel_stream(stream)
                    stream = None
                    if retries >= self.config.stage_retries:
                        raise self._unavailable(job_id, stopped, retries, exc, log) from None
                    retries += 1
                    await self._retry_after(job_id, stopped, retries, exc, state, log)
                    continue
                break
            if result is None:
                raise NoResult("the generator ended without a result")
            video_path, thumb_path = await self._save_artifacts(job_id, result, log)
            heartbeat.cancel()
            ok = await self.store.complete(job_id, self.owner, video_path=video_path, thumbnail_path=thumb_path,
                                           has_audio=result.has_audio, duration_s=result.duration_s)
            if not ok:  # deleted (or taken from us) meanwhile: don't leave orphan files
                await self.artifacts.delete(video_path, thumb_path)
                raise JobLost()
            await self._safe(self.artifacts.delete_inputs(job_id))
            elapsed = time.time() - started
            self.metrics.observe_result(result, elapsed)
            self._publish(job_id, type="status", status=COMPLETED, progress=100)
            log.info("job %s: completed in %.2fs (%d bytes)%s", job_id, elapsed, len(result.mp4),
                     f" after {retries} retr{'ies' if retries != 1 else 'y'}" if retries else "")
        except asyncio.CancelledError:
            reason = self._cancel_reason.get(job_id, SHUTDOWN)
            self._cancel_stream(stream)
            await self._after_cancel(job_id, reason, log)
            # a task cancelled by us ends here; do not propagate (nothing awaits it)
        except JobLost:
            self._cancel_stream(stream)
            log.info("job %s: no longer owned here (deleted or re-queued); stopped", job_id)
            self._publish(job_id, type="status", status=DELETED, progress=state["progress"])
        except Exception as exc:  # noqa: BLE001 - every failure ends as a failed record
            self._cancel_stream(stream)
            err = unwrap_error(exc)
            if isinstance(err, GenerationCancelled):
                await self._after_cancel(job_id, CANCELLED, log)
            else:
                code = getattr(err, "code", "internal_error")
                message = getattr(err, "message", None) or str(err) or type(err).__name__
                param = getattr(err, "param", None)
                log.error("job %s: failed: %s: %s", job_id, code, message)
                if await self._safe(self.store.fail(job_id, self.owner, code=code, message=message, param=param)):
                    await self._safe(self.artifacts.delete_inputs(job_id))
                self.metrics.observe_failure(code, tts_provider=self._tts_provider(job, err))
                self._publish(job_id, type="status", status=FAILED, progress=state["progress"],
                              error=ErrorInfo(code=code, message=message, param=param))
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            # the final MP4 (if any) replaces the preview; a failed, cancelled or re-queued job has none
            await self._safe(self.artifacts.delete_preview(job_id))

    async def _inputs(self, job_id: str, spec: ResolvedSpec) -> GenerationInputs | None:
        """What an image-to-video or extension job starts from, read from its inputs folder."""
        if spec.mode == "text-to-video":
            return None
        files = await self.artifacts.load_inputs(job_id)
        needed = {"image-to-video": ["image.png"] + (["last_image.png"] if spec.has_last_image else []),
                  "extend": ["source.mp4"]}[spec.mode]
        missing = [n for n in needed if n not in files]
        if missing:
            raise InputsMissing(f"the inputs of this job are gone ({', '.join(missing)})")
        return GenerationInputs(image=_png_array(files.get("image.png")),
                                last_image=_png_array(files.get("last_image.png")),
                                video_mp4=files.get("source.mp4"))

    # ---- a stage replica that stopped; a full disk ----
    @staticmethod
    def _stopped_stage(exc: BaseException) -> str | None:
        """The stage whose replica stopped mid-call (the Generator's own replica when its stream
        died), or None when `exc` is any other failure."""
        err = unwrap_error(exc)
        if isinstance(err, StageUnavailable):
            return err.stage or "generator"
        if not isinstance(err, CineVividError) and replica_stopped(exc) is not None:
            return "generator"
        return None

    async def _wait_for_capacity(self, job_id: str, stage: str, waits: "BusyWait", state: dict, log) -> None:
        """The job's stage `stage` refused it (its queue full): show "waiting for capacity", count it,
        wait (BusyWait's backoff); OverloadedError once the job has waited busy_wait_max_s."""
        pause = waits.next_pause()
        if pause is None:
            raise OverloadedError(f"the {stage} stage stayed at capacity (its queue, max_queued_requests, full) "
                                  f"for {waits.waited_s:.0f} s; try again later", stage=stage)
        if waits.waits == 1:
            log.info("job %s: the %s stage is at capacity; waiting for room", job_id, stage)
        self.metrics.busy_waits.labels(stage).inc()
        await self._on_event(job_id, ProgressEvent(type="stage", stage=WAITING_FOR_CAPACITY, stage_status="started",
                                                   progress=state["progress"]), state)
        await asyncio.sleep(pause)

    async def _retry_after(self, job_id: str, stage: str, retry: int, exc: BaseException, state: dict,
                           log) -> None:
        """Tell watchers, count it, and wait a little (Serve is replacing the replica); the
        caller then runs the job again from the start: same spec and seed, same output."""
        if not isinstance(unwrap_error(exc), CineVividError):  # the Generator's own death: Ray's text
            log.warning("job %s: the generator replica stopped: %r", job_id, exc)
        log.warning("job %s: the %s replica stopped; retry %d of %d from the start", job_id, stage, retry,
                    self.config.stage_retries)
        self.metrics.job_retries.labels(stage).inc()
        self._publish(job_id, type="status", status=IN_PROGRESS, progress=state["progress"], retry=retry,
                      error=ErrorInfo(code=StageUnavailable.code,
                                      message=f"the {stage} replica stopped while running this job; "
                                              f"retrying from the start ({retry} of {self.config.stage_retries})"))
        await asyncio.sleep(self.config.stage_retry_backoff_s * 2 ** (retry - 1))

    @staticmethod
    def _unavailable(job_id: str, stage: str, retries: int, exc: BaseException, log) -> StageUnavailable:
        if not isinstance(unwrap_error(exc), CineVividError):
            log.warning("job %s: the generator replica stopped: %r", job_id, exc)
        tried = f"; retried {retries} time{'s' if retries != 1 else ''}" if retries else ""
        return StageUnavailable(f"the {stage} replica stopped while running this job{tried}", stage=stage)

    async def _save_artifacts(self, job_id: str, result, log) -> tuple[str, str]:
        """Store the MP4 and thumbnail; a full disk (or any other write error) fails the job with a
        reason the user can read, and leaves no file behind (ArtifactStore.save cleans up)."""
        try:
            return await self.artifacts.save(job_id, result.mp4, result.thumbnail_jpeg)
        except OSError as exc:
            if is_disk_full(exc):
                log.error("job %s: disk full, the video could not be stored: %s", job_id, exc)
                raise InsufficientStorage("the server's disk is full: the video was generated but could not be "
                                          "stored. Try again later.") from exc
            log.error("job %s: the video could not be stored: %s", job_id, exc)
            raise StorageError("the server could not store the video") from exc

    async def _after_cancel(self, job_id: str, reason: str, log) -> None:
        if reason == SHUTDOWN:
            status = await self._safe(self.store.release(job_id, self.owner))
            log.info("job %s: released at shutdown (no attempt spent); now %s", job_id, status)
            return
        if reason == DELETED:
            log.info("job %s: deleted while running; stopped", job_id)
            self._publish(job_id, type="status", status=DELETED)
            return
        await self._safe(self.store.fail(job_id, self.owner, code=CANCELLED, message=CANCELLED_MESSAGE))
        await self._safe(self.artifacts.delete_inputs(job_id))
        self.metrics.observe_failure(CANCELLED)
        log.info("job %s: cancelled", job_id)
        self._publish(job_id, type="status", status=FAILED,
                      error=ErrorInfo(code=CANCELLED, message=CANCELLED_MESSAGE))

    def _tts_provider(self, job: dict, err: BaseException) -> str | None:
        """The voice-over provider of a job that failed in its TTS stage (else None): the one the
        spec names, or the one the configured default resolves to (as the TTS stage resolves it)."""
        if not (isinstance(err, TTSError) or getattr(err, "stage", None) == "tts"):
            return None
        try:
            voiceover = ResolvedSpec.model_validate_json(job["spec"]).voiceover
        except Exception:  # noqa: BLE001
            voiceover = None
        if voiceover is None:
            return "unknown"
        from serve.pipeline.voiceover import resolve_provider

        return voiceover.provider or resolve_provider(voiceover, self.tts_config)

    @staticmethod
    def _cancel_stream(stream) -> None:
        if stream is not None:
            try:
                stream.cancel()
            except Exception:  # noqa: BLE001
                logger.debug("cancelling the generator stream failed", exc_info=True)

    @staticmethod
    async def _safe(coro):
        try:
            return await asyncio.shield(coro)
        except asyncio.CancelledError:
            return None
        except Exception:  # noqa: BLE001
            logger.exception("job store write failed")
            return None

    def _publish(self, job_id: str, **fields) -> None:
        self.broker.publish(job_id, ProgressEvent(id=job_id, **fields))

    def _windows_in_preview(self, job_id: str) -> int:
        preview = self.artifacts.preview_state(job_id)
        return int(preview.get("windows_done") or 0) if preview else 0

    async def _on_event(self, job_id: str, event: ProgressEvent, state: dict) -> None:
        if event.type == "window" and event.window < state["windows_done"]:
            # a re-run (same spec and seed: the same frames) passing a window the preview already
            # has: the preview, windows_done and playable_seconds stay as they are until it passes them
            return
        if event.type == "window":
            state["windows_done"] = event.window + 1
        if event.type == "window" and not state.get("preview_broken"):  # its fragments join the preview first
            try:
                await self.artifacts.append_preview(job_id, event.fragment or b"", windows_done=event.window + 1,
                                                    windows_total=event.num_windows, playable_s=event.playable_s)
            except OSError:  # the preview is a convenience: a full disk here is not worth the job
                logger.warning("job %s: preview write failed; no preview for this job", job_id, exc_info=True)
                state["preview_broken"] = True  # later fragments alone would not play
                await self._safe(self.artifacts.delete_preview(job_id))
        if event.type == "window":
            event = event.model_copy(update={"fragment": None, "frames": None})
        progress = int(max(state["progress"], min(99, int(event.progress or 0))))
        stage_changed = event.type == "stage" and event.stage and event.stage != state["stage"]
        state["progress"] = progress
        if event.stage:
            state["stage"] = event.stage
        # the Generator's event as is, with the job id and the job's whole-number progress
        self.broker.publish(job_id, event.model_copy(update={"id": job_id, "progress": progress}))
        state["dirty"] = True
        now = time.monotonic()
        if stage_changed or now - state["last_write"] >= self.config.progress_write_interval_s:
            try:
                await self._write_progress(job_id, state)
            except (JobLost, GenerationCancelled):
                raise
            except Exception:  # noqa: BLE001 - a missed progress write is not worth the job
                logger.warning("job %s: progress write failed", job_id, exc_info=True)

    async def _write_progress(self, job_id: str, state: dict) -> None:
        state["last_write"] = time.monotonic()
        state["dirty"] = False
        res = await self.store.heartbeat(job_id, self.owner, self.config.lease_seconds,
                                         progress=state["progress"], stage=state["stage"])
        if res is None:
            raise JobLost()
        if res["cancel_requested"]:
            self._cancel_reason[job_id] = CANCELLED
            raise GenerationCancelled("the job was cancelled")

    async def _heartbeat(self, job_id: str, state: dict) -> None:
        """Renew the lease while the job runs, even when no progress arrives (a long stage)."""
        interval = max(0.05, self.config.lease_seconds / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._write_progress(job_id, state)
            except JobLost:
                self.cancel_local(job_id, DELETED)
                return
            except GenerationCancelled:
                self.cancel_local(job_id, CANCELLED)
                return
            except Exception:  # noqa: BLE001 - the DB may be briefly unavailable; retry
                logger.warning("job %s: lease renewal failed", job_id, exc_info=True)


def _png_array(data: bytes | None):
    """A stored input image (written by the API as a lossless PNG of the fitted image) as uint8 RGB."""
    if data is None:
        return None
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


class BusyWait:
    """A job's waits for a stage whose queue was full (StageBusy, or Serve's BackPressureError from
    the Generator's own queue): pauses of 0.5 s doubling up to 5 s, for at most `max_s` in all."""

    FIRST_S, MAX_PAUSE_S = 0.5, 5.0

    def __init__(self, max_s: float):
        self.max_s, self.waits, self.waited_s = max_s, 0, 0.0

    @staticmethod
    def stage_of(exc: BaseException) -> str | None:
        """The stage that was full, or None when `exc` is another failure."""
        err = unwrap_error(exc)
        if isinstance(err, StageBusy):
            return err.stage or "generator"
        if not isinstance(err, CineVividError) and busy(exc) is not None:
            return "generator"  # the Generator's own queue
        return None

    def next_pause(self) -> float | None:
        """Seconds to wait before the next try, or None once `max_s` is spent."""
        pause = min(self.MAX_PAUSE_S, self.FIRST_S * 2 ** self.waits)
        if self.waited_s + pause > self.max_s:
            return None
        self.waits += 1
        self.waited_s += pause
        return pause
