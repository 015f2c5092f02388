"""Server-Sent Events of one job: the `ProgressEvent`s its dispatcher publishes, as `event: <type>`
and `data: <ProgressEvent JSON>`, until the job ends."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from serve.contracts import DELETED, QUEUED, TERMINAL_STATUSES, ErrorInfo, ProgressEvent
from serve.jobs.service import JobService


def sse_frame(event: ProgressEvent) -> bytes:
    return f"event: {event.type}\ndata: {event.to_json()}\n\n".encode()


def _status_of(job: dict, kind: str = "status") -> ProgressEvent:
    """A status (or progress) event from a job record."""
    error = None
    if job.get("error_code"):
        error = ErrorInfo(code=job["error_code"], message=job["error_message"] or "", param=job["error_param"])
    return ProgressEvent(type=kind, id=job["id"], status=job["status"], progress=int(job["progress"]),
                         stage=job["stage"], error=error)


async def job_events(service: JobService, job: dict, keepalive_s: float = 15.0) -> AsyncIterator[bytes]:
    """Events for one job until it ends: `status` (queued/in_progress/completed/failed), `stage`
    (a stage started/finished), `step` (one per denoising step), and `progress` (from the job
    record, when the job runs on another replica); every event carries `progress`, which never
    goes down. The stream ends after the final `status` event."""
    job_id = job["id"]
    queue, history = service.broker.subscribe(job_id)
    last_progress = 0
    last_status = None
    last_stage = job.get("stage")

    def emit(ev: ProgressEvent) -> bytes:
        nonlocal last_progress, last_status
        last_progress = max(last_progress, int(ev.progress or 0))
        if ev.type == "status":
            last_status = ev.status
        return sse_frame(ev.model_copy(update={"progress": last_progress, "id": job_id}))

    def deleted() -> bytes:
        return sse_frame(ProgressEvent(type="status", id=job_id, status=DELETED, progress=last_progress))

    poll = service.config.dispatcher.poll_interval_s
    try:
        if history:
            for ev in history:
                yield emit(ev)
        else:
            yield emit(_status_of(job))
            if job["status"] in TERMINAL_STATUSES:
                return
        if last_status in TERMINAL_STATUSES:
            return
        idle = 0.0
        while True:
            try:
                ev = await asyncio.wait_for(queue.get(), poll)
            except asyncio.TimeoutError:
                idle += poll
                # the job may run on another replica (or its events were missed): read the record
                row = await service.store.get(job_id)
                if row is None:
                    yield deleted()
                    return
                if row["status"] != last_status or (row["status"] == QUEUED and row["stage"] != last_stage):
                    last_stage = row["stage"]  # a queued job's phase ("starting the model") is news too
                    yield emit(_status_of(row))
                elif row["progress"] > last_progress:  # running elsewhere: progress from its record
                    yield emit(_status_of(row, "progress"))
                if row["status"] in TERMINAL_STATUSES:
                    return
                if idle >= keepalive_s:
                    idle = 0.0
                    yield b": keepalive\n\n"
                continue
            idle = 0.0
            if ev.status == DELETED:
                yield deleted()
                return
            yield emit(ev)
            if ev.type == "status" and ev.status in TERMINAL_STATUSES:
                return
    finally:
        service.broker.unsubscribe(job_id, queue)
