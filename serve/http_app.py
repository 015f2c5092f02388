"""The HTTP API as a Starlette app over a `JobService`: OpenAI Videos API, the original CineVivid
routes, auth, health, metrics, OpenAPI and an offline docs page. `create_app` builds it; the
`Ingress` deployment serves it through Ray Serve, and it runs as well under bare uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve import api_models as m
from serve.auth import PermissionDenied, Principal
from serve.errors import CineVividError, InvalidSpecError
from serve.generation import GenerationSpec
from serve.http_errors import EXCEPTION_HANDLERS, PayloadTooLarge, error_response, validation_error_response
from serve.job_service import VERSION, JobService, NotFound
from serve.jobs import TERMINAL

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# middleware
class BodyLimitMiddleware:
    """413 for a request body over `max_bytes`, by Content-Length or as it streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    if int(value) > self.max_bytes:
                        resp = error_response(413, "payload_too_large",
                                              f"request body is {int(value)} bytes; the limit is {self.max_bytes}")
                        return await resp(scope, receive, send)
                except ValueError:
                    pass
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise PayloadTooLarge(f"request body exceeds the limit of {self.max_bytes} bytes")
            return msg
        await self.app(scope, limited_receive, send)


class MetricsMiddleware:
    """Count requests by route template, method and status; observe latencies."""

    def __init__(self, app: ASGIApp, service: JobService):
        self.app = app
        self.metrics = service.metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_wrapper(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.http_requests.labels(label, scope.get("method", ""), str(status)).inc()
            self.metrics.http_latency.labels(label, scope.get("method", "")).observe(time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# helpers
async def _read_body(request: Request, model: type[BaseModel], *, allow_empty: bool = False,
                     form_ok: bool = True) -> BaseModel:
    """Parse a JSON or form body into `model`: 400 for unparseable JSON, 422 naming the field."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    data: Any
    if form_ok and ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form()
        except PayloadTooLarge:
            raise
        except Exception as exc:  # noqa: BLE001 - malformed multipart
            raise CineVividError(f"malformed form body: {exc}", code="invalid_form", status=400) from None
        data = _unflatten_form(form)
    else:
        raw = await request.body()
        if not raw.strip():
            if not allow_empty:
                raise CineVividError("the request body is empty; send a JSON object", code="invalid_json",
                                     status=400)
            data = {}
        else:
            try:
                data = json.loads(raw)
            except ValueError as exc:
                raise CineVividError(f"the request body is not valid JSON: {exc}", code="invalid_json",
                                     status=400) from None
    if not isinstance(data, dict):
        raise CineVividError("the request body must be a JSON object", code="invalid_json", status=400)
    return model.model_validate(data)


def _unflatten_form(form) -> dict:
    """Form fields to a dict; `a[b]=v` (how the openai SDK sends nested objects) becomes {"a": {"b": v}};
    an uploaded file becomes a marker so the request can reject it by name."""
    out: dict[str, Any] = {}
    for key, value in form.multi_items():
        if not isinstance(value, str):
            value = {"filename": getattr(value, "filename", None), "upload": True}
        if "[" in key and key.endswith("]"):
            head, _, rest = key.partition("[")
            sub = rest[:-1]
            node = out.setdefault(head, {})
            if isinstance(node, dict):
                node[sub] = value
            continue
        out[key] = value
    return out


def _json(model: type[BaseModel], data: Any, status: int = 200, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(model.model_validate(data).model_dump(mode="json"), status_code=status, headers=headers)


# ---------------------------------------------------------------------------------------------
def create_app(service: JobService, *, manage_lifecycle: bool = True) -> Starlette:
    """The HTTP app. With `manage_lifecycle` the app's lifespan starts and stops the service
    (its dispatcher and database); the Ingress deployment does the same through Serve."""
    limits = service.config.limits
    poll_after_ms = str(service.config.poll_after_ms)

    async def principal(request: Request) -> Principal:
        p = await service.authenticate(request.headers.get("authorization"))
        service.check_rate(p)
        return p

    async def admin(request: Request) -> Principal:
        p = await principal(request)
        if not p.is_admin:
            raise PermissionDenied("this route needs the admin role")
        return p

    # ---- service ----
    async def root(request: Request) -> Response:
        return _json(m.ServiceInfo, {
            "name": "CineVivid", "version": VERSION, "model": service.model_cfg.name,
            "endpoints": sorted({f"{' '.join(sorted(r.methods - {'HEAD'}))} {r.path}" for r in routes
                                 if isinstance(r, Route) and r.methods})})

    async def health(request: Request) -> Response:
        h = await service.health()
        return _json(m.Health, h, status=503 if h["status"] == "unhealthy" else 200)

    async def metrics(request: Request) -> Response:
        with contextlib.suppress(Exception):
            await service.refresh_gauges()
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    async def openapi(request: Request) -> Response:
        from serve.openapi_spec import build_openapi

        return JSONResponse(build_openapi(api_routes, VERSION))

    async def docs(request: Request) -> Response:
        from serve.openapi_spec import DOCS_HTML

        return HTMLResponse(DOCS_HTML)

    # ---- auth ----
    async def login(request: Request) -> Response:
        req = await _read_body(request, m.LoginRequest)
        return _json(m.TokenResponse, await service.auth.login(req.username, req.password))

    async def create_key(request: Request) -> Response:
        p = await principal(request)
        req = await _read_body(request, m.ApiKeyCreateRequest, allow_empty=True)
        return _json(m.ApiKeyCreated, await service.auth.create_api_key(p.user_id, req.name), status=201)

    async def list_keys(request: Request) -> Response:
        p = await principal(request)
        return _json(m.ApiKeyList, {"data": await service.auth.list_api_keys(p.user_id)})

    async def revoke_key(request: Request) -> Response:
        p = await principal(request)
        key_id = request.path_params["key_id"]
        if not await service.auth.revoke_api_key(key_id, p.user_id):
            raise NotFound(f"no active API key with id {key_id!r}", param="key_id")
        return JSONResponse({"id": key_id, "object": "api_key", "revoked": True})

    # ---- OpenAI videos ----
    async def create_video(request: Request) -> Response:
        p = await principal(request)
        req = await _read_body(request, m.VideoCreateRequest)
        job = await service.submit(p, service.spec_from_openai(req))
        return _json(m.Video, service.video_view(job), headers={"openai-poll-after-ms": poll_after_ms})

    async def get_video(request: Request) -> Response:
        p = await principal(request)
        job = await service.get_job(p, request.path_params["video_id"])
        return _json(m.Video, service.video_view(job), headers={"openai-poll-after-ms": poll_after_ms})

    async def list_videos(request: Request) -> Response:
        p = await principal(request)
        q = request.query_params
        order = q.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidSpecError("order must be 'asc' or 'desc'", param="order")
        try:
            limit = int(q.get("limit", "20"))
        except ValueError:
            raise InvalidSpecError("limit must be an integer", param="limit") from None
        if not 1 <= limit <= limits.max_list_limit:
            raise InvalidSpecError(f"limit must be between 1 and {limits.max_list_limit}", param="limit")
        rows, has_more = await service.store.list(user_id=p.user_id, after=q.get("after") or None,
                                                  limit=limit, order=order)
        data = [service.video_view(r) for r in rows]
        return _json(m.VideoList, {"data": data, "has_more": has_more,
                                   "first_id": data[0]["id"] if data else None,
                                   "last_id": data[-1]["id"] if data else None})

    async def delete_video(request: Request) -> Response:
        p = await principal(request)
        job = await service.delete(p, request.path_params["video_id"])
        return _json(m.VideoDeleted, {"id": job["id"]})

    async def cancel_video(request: Request) -> Response:
        p = await principal(request)
        job = await service.cancel(p, request.path_params["video_id"])
        return _json(m.Video, service.video_view(job))

    async def remix_video(request: Request) -> Response:
        p = await principal(request)
        video_id = request.path_params["video_id"]
        await service.get_job(p, video_id)  # 404 before looking at the body
        req = await _read_body(request, m.VideoRemixRequest)
        job = await service.remix(p, video_id, req.prompt)
        return _json(m.Video, service.video_view(job), headers={"openai-poll-after-ms": poll_after_ms})

    async def video_content(request: Request) -> Response:
        p = await principal(request)
        job = await service.get_job(p, request.path_params["video_id"])
        variant = request.query_params.get("variant", "video")
        if variant not in ("video", "thumbnail"):
            raise InvalidSpecError(f"variant must be 'video' or 'thumbnail' (got {variant!r})", param="variant")
        if job["status"] != "completed":
            raise CineVividError(f"video {job['id']} is {job['status']}; content exists once it is completed",
                                 code="video_not_ready", status=409)
        path = job["video_path"] if variant == "video" else job["thumbnail_path"]
        if not path or not Path(path).exists():
            raise NotFound(f"the {variant} of video {job['id']} is missing from storage", param="variant")
        media = "video/mp4" if variant == "video" else "image/jpeg"
        ext = "mp4" if variant == "video" else "jpg"
        return FileResponse(path, media_type=media, filename=f"{job['id']}.{ext}",
                            content_disposition_type="inline")

    async def video_events(request: Request) -> Response:
        p = await principal(request)
        job = await service.get_job(p, request.path_params["video_id"])
        return StreamingResponse(_sse(service, job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def voices(request: Request) -> Response:
        await principal(request)
        return _json(m.VoiceList, {"data": await service.generator.voices()})

    # ---- original CineVivid routes ----
    async def text_to_video(request: Request) -> Response:
        p = await principal(request)
        req = await _read_body(request, m.TextToVideoRequest, form_ok=False)
        job = await service.submit(p, GenerationSpec.model_validate(req.model_dump(exclude_none=True)))
        return _json(m.TaskCreated, {"task_id": job["id"], "status": job["status"]}, status=202)

    async def get_task(request: Request) -> Response:
        p = await principal(request)
        job = await service.get_job(p, request.path_params["task_id"])
        return _json(m.Task, service.task_view(job))

    async def admin_stats(request: Request) -> Response:
        await admin(request)
        return _json(m.AdminStats, await service.admin_stats())

    async def cache_stats(request: Request) -> Response:
        await admin(request)
        return JSONResponse(await service.generator.model_info())

    R = ApiRoute
    api_routes = [
        R("/", root, ["GET"], "Service information", resp=m.ServiceInfo, auth=None),
        R("/health", health, ["GET"], "Health of the database, storage, each stage and the GPU", resp=m.Health,
          auth=None),
        R("/metrics", metrics, ["GET"], "Prometheus metrics (text format)", auth=None, content="text/plain"),
        R("/openapi.json", openapi, ["GET"], "This OpenAPI document", auth=None, in_schema=False),
        R("/docs", docs, ["GET"], "API docs page (works offline)", auth=None, in_schema=False),
        R("/auth/login", login, ["POST"], "Exchange username and password for a bearer JWT", req=m.LoginRequest,
          resp=m.TokenResponse, auth=None),
        R("/v1/api-keys", create_key, ["POST"], "Create an API key (the secret is shown once)",
          req=m.ApiKeyCreateRequest, resp=m.ApiKeyCreated, status=201),
        R("/v1/api-keys", list_keys, ["GET"], "List your API keys", resp=m.ApiKeyList),
        R("/v1/api-keys/{key_id}", revoke_key, ["DELETE"], "Revoke an API key"),
        R("/v1/videos", create_video, ["POST"], "Create a video job (JSON or multipart form)",
          req=m.VideoCreateRequest, resp=m.Video, form=True),
        R("/v1/videos", list_videos, ["GET"], "List your videos (after, limit, order)", resp=m.VideoList,
          query=["after", "limit", "order"]),
        R("/v1/videos/{video_id}", get_video, ["GET"], "Retrieve a video job", resp=m.Video),
        R("/v1/videos/{video_id}", delete_video, ["DELETE"], "Delete a video (aborts it if running)",
          resp=m.VideoDeleted),
        R("/v1/videos/{video_id}/cancel", cancel_video, ["POST"], "Cancel a video job without deleting it",
          resp=m.Video),
        R("/v1/videos/{video_id}/remix", remix_video, ["POST"], "Same settings and seed, new prompt",
          req=m.VideoRemixRequest, resp=m.Video),
        R("/v1/videos/{video_id}/content", video_content, ["GET"], "Download the MP4 (Range supported) or thumbnail",
          query=["variant"], content="video/mp4"),
        R("/v1/videos/{video_id}/events", video_events, ["GET"], "Progress as Server-Sent Events",
          content="text/event-stream"),
        R("/v1/voices", voices, ["GET"], "Voices of the enabled voice-over providers", resp=m.VoiceList),
        R("/generate/text-to-video", text_to_video, ["POST"], "Queue a generation (original CineVivid route)",
          req=m.TextToVideoRequest, resp=m.TaskCreated, status=202),
        R("/tasks/{task_id}", get_task, ["GET"], "A generation task's state", resp=m.Task),
        R("/admin/stats", admin_stats, ["GET"], "Job and user statistics (admin)", resp=m.AdminStats,
          auth="admin"),
        R("/models/cache/stats", cache_stats, ["GET"], "Models cached and loaded (admin)", auth="admin"),
    ]
    routes = [Route(r.path, r.endpoint, methods=r.methods) for r in api_routes]

    @contextlib.asynccontextmanager
    async def lifespan(app) -> AsyncIterator[None]:
        if manage_lifecycle:
            await service.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                await service.stop()

    app = Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, service=service)
    app.state.service = service
    app.state.api_routes = api_routes
    return app


class ApiRoute:
    def __init__(self, path: str, endpoint: Callable, methods: list[str], summary: str, *,
                 req: type[BaseModel] | None = None, resp: type[BaseModel] | None = None, status: int = 200,
                 auth: str | None = "user", form: bool = False, query: list[str] | None = None,
                 content: str | None = None, in_schema: bool = True):
        self.path, self.endpoint, self.methods, self.summary = path, endpoint, methods, summary
        self.req, self.resp, self.status, self.auth, self.form = req, resp, status, auth, form
        self.query, self.content, self.in_schema = query or [], content, in_schema


# ---------------------------------------------------------------------------------------------
def _sse_event(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


async def _sse(service: JobService, job: dict, keepalive_s: float = 15.0) -> AsyncIterator[bytes]:
    """Events for one job until it ends: `status` (queued/in_progress/completed/failed), `stage`
    (a stage started/finished), `step` (one per denoising step), and `progress` (from the job
    record, when the job runs on another replica); every event carries `progress`, which never
    goes down. The stream ends after the final `status` event."""
    job_id = job["id"]
    queue, history = service.broker.subscribe(job_id)
    last_progress = 0
    last_status = None

    def emit(ev: dict) -> bytes:
        nonlocal last_progress, last_status
        ev = dict(ev)
        kind = ev.pop("type", "status")
        last_progress = max(last_progress, int(ev.get("progress") or 0))
        ev["progress"] = last_progress
        ev["id"] = job_id
        if kind == "status":
            last_status = ev.get("status")
        return _sse_event(kind, ev)

    poll = service.config.dispatcher.poll_interval_s
    try:
        if history:
            for ev in history:
                yield emit(ev)
        else:
            yield emit({"type": "status", "status": job["status"], "progress": job["progress"],
                        "stage": job["stage"], **_error_of(job)})
            if job["status"] in TERMINAL:
                return
        if last_status in TERMINAL:
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
                    yield _sse_event("status", {"id": job_id, "status": "deleted", "progress": last_progress})
                    return
                if row["status"] != last_status:
                    yield emit({"type": "status", "status": row["status"], "progress": row["progress"],
                                "stage": row["stage"], **_error_of(row)})
                elif row["progress"] > last_progress:  # running elsewhere: progress from its record
                    yield emit({"type": "progress", "status": row["status"], "progress": row["progress"],
                                "stage": row["stage"]})
                if row["status"] in TERMINAL:
                    return
                if idle >= keepalive_s:
                    idle = 0.0
                    yield b": keepalive\n\n"
                continue
            idle = 0.0
            if ev.get("status") == "deleted":
                yield _sse_event("status", {"id": job_id, "status": "deleted", "progress": last_progress})
                return
            yield emit(ev)
            if ev.get("type") == "status" and ev.get("status") in TERMINAL:
                return
    finally:
        service.broker.unsubscribe(job_id, queue)


def _error_of(job: dict) -> dict:
    if job.get("error_code"):
        return {"error": {"code": job["error_code"], "message": job["error_message"], "param": job["error_param"]}}
    return {}
