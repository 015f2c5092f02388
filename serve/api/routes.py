"""The HTTP API as a Starlette app over a `JobService`: OpenAI Videos API, the original CineVivid
routes, auth, health, metrics, OpenAPI, an offline docs page and the web UI (`/ui`). `create_app`
builds it; the `Ingress` deployment serves it through Ray Serve, and it runs as well under bare
uvicorn.

Authentication, the brute-force throttles and the per-user rate limit live here; the job service
knows users only by id. Each route's auth (public, user, admin) is declared once, in `API_ROUTES`,
and enforced from there (`authenticated`): an endpoint is called as `endpoint(request, user)`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator, Awaitable, Callable

from dataclasses import dataclass

from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from serve.api import schemas as m
from serve.api.admission import AdmissionMiddleware, CountedStream, StreamLimiter
from serve.api.auth import Authenticator, Principal, load_jwt_secret
from serve.api.content import file_response
from serve.api.errors import EXCEPTION_HANDLERS
from serve.api.metrics import HttpMetrics, MetricsMiddleware
from serve.api.headers import SecurityHeadersMiddleware
from serve.api.middleware import BodyLimitMiddleware, BodyTimeoutMiddleware
from serve.api.ratelimit import SharedRateLimiter
from serve.api import media_requests as media
from serve.api.requests import read_body, read_body_with_files, spec_from_openai
from serve.pipeline.lora import adapter_catalog
from serve.api.sse import job_events
from serve.api.throttle import FailedAuthThrottle, client_address, parse_networks
from serve.api.ui import ui_asset, ui_index
from serve.contracts import COMPLETED, GenerationSpec
from serve.errors import (
    AuthError, InvalidSpecError, NotFound, PermissionDenied, RateLimited, VideoNotReady,
)
from serve.config import IngressConfig
from serve.jobs.service import VERSION, JobService

logger = logging.getLogger(__name__)


def _json(model: type[BaseModel], data, status: int = 200, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(model.model_validate(data).model_dump(mode="json"), status_code=status, headers=headers)


@dataclass
class Api:
    """What the endpoints share, kept in `app.state.api`: the job service, authentication, the
    failed-auth throttles, the per-user rate limit and the HTTP metrics."""

    service: JobService
    auth: Authenticator
    throttle: FailedAuthThrottle
    rate_limiter: SharedRateLimiter
    http_metrics: HttpMetrics
    trusted_proxies: list
    streams: StreamLimiter
    image_slots: asyncio.Semaphore

    @property
    def config(self) -> IngressConfig:
        return self.service.config

    @property
    def poll_after_ms(self) -> str:
        return str(self.service.config.poll_after_ms)

    def client_address(self, request: Request) -> str:
        return client_address(request, self.trusted_proxies)


# Refused credentials that count towards the address's failed-auth throttle (a missing header
# or an expired token is no guess).
_COUNTED_AUTH_FAILURES = {"invalid_api_key", "api_key_revoked", "invalid_token"}


async def _principal(request: Request) -> Principal:
    """The caller (401 without valid credentials; 429 once its address has failed too often),
    within its request rate (else 429)."""
    api: Api = request.app.state.api
    try:
        p = await api.auth.authenticate(request.headers.get("authorization"))
    except AuthError as exc:
        if exc.code in _COUNTED_AUTH_FAILURES:
            await api.throttle.credential_failed(api.client_address(request))
        raise
    wait = await api.rate_limiter.check(p.user_id)
    if wait > 0:
        raise RateLimited(f"rate limit of {api.config.limits.rate_limit_per_minute:g} requests per minute "
                          "exceeded", retry_after_s=wait)
    return p


async def _admin(request: Request) -> Principal:
    p = await _principal(request)
    if not p.is_admin:
        raise PermissionDenied("this route needs the admin role")
    return p


async def _public(request: Request) -> None:
    return None


# What each `ApiRoute.auth` level asks of the caller before the endpoint runs: the caller it
# passes on (None on a public route), or an error (401, 403, 429) in the envelope.
AUTH_CHECKS: dict[str | None, Callable[[Request], Awaitable[Principal | None]]] = {
    None: _public, "user": _principal, "admin": _admin,
}


def authenticated(route: "ApiRoute") -> Callable[[Request], Awaitable[Response]]:
    """The route's endpoint behind the check its `auth` declares: every endpoint is called as
    `endpoint(request, user)`, `user` the authenticated `Principal` (None on a public route)."""
    try:
        check = AUTH_CHECKS[route.auth]
    except KeyError:
        raise ValueError(f"route {route.path}: unknown auth level {route.auth!r} "
                         f"(one of {sorted(map(str, AUTH_CHECKS))})") from None
    endpoint = route.endpoint

    async def checked(request: Request) -> Response:
        return await endpoint(request, await check(request))

    checked.__name__ = checked.__qualname__ = endpoint.__name__
    return checked


# ---- service ----
async def root(request: Request, user: Principal | None) -> Response:
    api: Api = request.app.state.api
    return _json(m.ServiceInfo, {
        "name": "CineVivid", "version": VERSION, "model": api.service.model_cfg.name,
        "endpoints": sorted({f"{' '.join(sorted(r.methods))} {r.path}" for r in API_ROUTES})})


async def health(request: Request, user: Principal | None) -> Response:
    api: Api = request.app.state.api
    h = await api.service.health()
    return _json(m.Health, h, status=503 if h["status"] == "unhealthy" else 200)


async def metrics(request: Request, user: Principal | None) -> Response:
    api: Api = request.app.state.api
    with contextlib.suppress(Exception):
        await api.service.refresh_gauges()
    return Response(api.http_metrics.render(), media_type=api.http_metrics.content_type)


async def openapi(request: Request, user: Principal | None) -> Response:
    from serve.api.openapi import build_openapi

    return JSONResponse(build_openapi(API_ROUTES, VERSION))


async def docs(request: Request, user: Principal | None) -> Response:
    from serve.api.openapi import DOCS_HTML

    return HTMLResponse(DOCS_HTML)


# ---- auth ----
async def login(request: Request, user: Principal | None) -> Response:
    api: Api = request.app.state.api
    req = await read_body(request, m.LoginRequest)
    address = api.client_address(request)
    token: dict | None = None
    refused: AuthError | None = None

    async def password_ok() -> bool:
        nonlocal token, refused
        try:
            token = await api.auth.login(req.username, req.password)
        except AuthError as exc:
            refused = exc
        return token is not None

    # 429 while locked (serve.api.throttle: the password is checked during a lock only where a
    # right one may pass, and nothing during a lock extends it)
    await api.throttle.check_login(req.username, address, password_ok)
    if token is None and refused is None:
        await password_ok()
    if token is None:
        await api.throttle.login_failed(req.username, address)
        assert refused is not None
        raise refused
    await api.throttle.login_succeeded(req.username, address)
    return _json(m.TokenResponse, token)


async def create_key(request: Request, user: Principal) -> Response:
    api: Api = request.app.state.api
    req = await read_body(request, m.ApiKeyCreateRequest, allow_empty=True)
    key = await api.auth.create_api_key(user.user_id, req.name, max_active=api.config.limits.max_api_keys_per_user)
    return _json(m.ApiKeyCreated, key, status=201)


async def list_keys(request: Request, user: Principal) -> Response:
    api: Api = request.app.state.api
    return _json(m.ApiKeyList, {"data": await api.auth.list_api_keys(user.user_id)})


async def revoke_key(request: Request, user: Principal) -> Response:
    api: Api = request.app.state.api
    key_id = request.path_params["key_id"]
    if not await api.auth.revoke_api_key(key_id, user.user_id):
        raise NotFound(f"no active API key with id {key_id!r}", param="key_id")
    return JSONResponse({"id": key_id, "object": "api_key", "revoked": True})


# ---- OpenAI videos ----
async def create_video(request: Request, user: Principal) -> Response:
    api: Api = request.app.state.api
    limits = api.config.limits
    await api.service.check_job_capacity(user.user_id)  # before the body is read or decoded
    req, uploads = await read_body_with_files(request, m.VideoCreateRequest, ("input_reference", "last_frame"),
                                              limits.max_image_bytes)
    if req.input_reference in (None, "") and req.last_frame in (None, ""):
        job = await api.service.submit(user.user_id, spec_from_openai(req, api.service.model_for(req.model)))
    else:
        # one image request at a time decodes and fits its images: a decoded 40 MP image is
        # hundreds of MB until it is fitted to the job's size (media.DECODE_SLOTS)
        async with api.image_slots:
            image = await media.read_image(api.service, req.input_reference, uploads.get("input_reference"),
                                           "input_reference")
            last = await media.read_image(api.service, req.last_frame, uploads.get("last_frame"), "last_frame")
            if image is None:
                raise InvalidSpecError("last_frame needs input_reference (the first frame) too", param="last_frame")
            resolved, files = await media.image_job(api.service, req, image, last)
            del image, last
        job = await api.service.submit(user.user_id, resolved, input_files=files)
    return _json(m.Video, api.service.video_view(job), headers={"openai-poll-after-ms": api.poll_after_ms})


async def extend_video(request: Request, user: Principal) -> Response:
    api: Api = request.app.state.api
    await api.service.check_job_capacity(user.user_id)  # before the body is read or decoded
    req, uploads = await read_body_with_files(request, m.VideoExtendRequest, ("video",),
                                              api.config.limits.max_video_bytes)
    resolved, files = await media.extension_job(api.service, user.user_id, req, uploads.get("video"))
    job = await api.service.submit(user.user_id, resolved, input_files=files)
    return _json(m.Video, api.service.video_view(job), headers={"openai-poll-after-ms": api.poll_after_ms})


async def list_models(request: Request, user: Principal) -> Response:
    api: Api = request.app.state.api
    data = [{"id": x.name, "aliases": x.aliases, "modes": x.modes(), "default": i == 0,
             "size": f"{x.width}x{x.height}", "max_size": f"{x.max_width}x{x.max_height}",
             "max_frames": x.max_frames, "fps": x.fps, "num_inference_steps": x.num_inference_steps,
             "lora_adapters": [{"name": a.name, "scale": a.scale, **a.request_defaults()}
                               for a in adapter_catalog(x).values()]}
            for i, x in enumerate(api.service.models)]
    return _json(m.ModelList, {"data": data})


async def get_video(request: Request, user: Principal) -> Response:
    api: Api = request.app.state.api
    job = await api.service.get_job(user.user_id, request.path_params["video_id"])
    return _json(m.Video, api.service.video_view(job), headers={"openai-poll-after-ms": api.poll_after_ms})


async def list_videos(request: Request, user: Principal) -> Response:
    api: Api = request.app.state.api
    q = request.query_params
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidSpecError("order must be 'asc' or 'desc'", param="order")
    try:
        limit = int(q.get("limit", "20"))
    except ValueError:
        raise InvalidSpecError("limit must be an integer", param="limit") from None
    if not 1 <= limit <= api.config.limits.max_list_limit:
        raise InvalidSpecError(f"limit must be between 1 and {api.config.limits.max_list_limit}", param="limit")
    after = q.get("after")
    if after is not None and not after:
        raise InvalidSpecError("after must be a video id (or left out)", param="after")
    rows, has_more = await api.service.store.list(user_id=user.user_id, after=after,
                                              limit=limit, order=order)
    data = [api.service.video_view(r) for r in rows]
    return _json(m.VideoList, {"data": data, "has_more": has_more,
                               "first_id": data[0]["id"] if data else None,
                               "last_id": data[-1]["id"] if data else None})


async def delete_video(request: Request, user: Principal) -> Response:
    api: Api = request.app.state.api
    job = await api.service.delete(user.user_id, request.path_params["video_id"])
    return _json(m.VideoDeleted, {"id": job["id"]})


async def cancel_video(request: Request, user: Principal) -> Response:
    api: Api = request.app.state.api
    job = await api.service.cancel(user.user_id, request.path_params["video_id"])
    return _json(m.Video, api.service.video_view(job))


async def remix_video(request: Request, user: Principal) -> Response:
    api: Api = request.app.state.api
    video_id = request.path_params["video_id"]
    await api.service.get_job(user.user_id, video_id)  # 404 before looking at the body
    req = await read_body(request, m.VideoRemixRequest)
    job = await api.service.remix(user.user_id, video_id, req.prompt)
    return _json(m.Video, api.service.video_view(job), headers={"openai-poll-after-ms": api.poll_after_ms})


def _counted(api: "Api", user: Principal, respond: Callable[[], Response]) -> Response:
    """The stream `respond()` makes, counted against the caller's and the replica's stream limits
    (429 too_many_streams beyond) until it ends."""
    release = api.streams.acquire(user.user_id)
    try:
        return CountedStream(respond(), release)  # type: ignore[return-value] - an ASGI response
    except BaseException:
        release()
        raise


async def video_content(request: Request, user: Principal) -> Response:
    api: Api = request.app.state.api
    job = await api.service.get_job(user.user_id, request.path_params["video_id"])
    return _counted(api, user, lambda: _content(request, api, job))


def _content(request: Request, api: "Api", job: dict) -> Response:
    variant = request.query_params.get("variant", "video")
    if variant not in ("video", "thumbnail", "preview"):
        raise InvalidSpecError(f"variant must be 'video', 'thumbnail' or 'preview' (got {variant!r})",
                               param="variant")
    if variant == "preview" and job["status"] != COMPLETED:
        return _preview_response(request, api, job)
    if variant == "preview":
        variant = "video"  # once completed, the preview is the finished video
    if job["status"] != COMPLETED:
        raise VideoNotReady(f"video {job['id']} is {job['status']}; content exists once it is completed")
    path = job["video_path"] if variant == "video" else job["thumbnail_path"]
    if not path:
        raise NotFound(f"the {variant} of video {job['id']} is missing from storage", param="variant")
    media = "video/mp4" if variant == "video" else "image/jpeg"
    ext = "mp4" if variant == "video" else "jpg"
    return file_response(request, path, media, f"{job['id']}.{ext}", f"{variant} of video {job['id']}")


def _preview_response(request: Request, api: "Api", job: dict) -> Response:
    """The playable part so far of a running diffusion-forcing job: its preview's whole fragments."""
    state = api.service.artifacts.preview_state(job["id"])
    path = api.service.artifacts.preview_paths(job["id"])[0]
    if state is None or not path.exists():
        raise VideoNotReady(f"video {job['id']} is {job['status']} and has no playable part yet (a preview exists "
                             f"for long videos once their first window is done)")
    headers = {"Cache-Control": "no-store", "X-Video-Status": job["status"],
               "X-Windows-Done": str(state["windows_done"]), "X-Windows-Total": str(state["windows_total"]),
               "X-Playable-Seconds": f"{state['playable_s']:g}"}
    try:
        return file_response(request, str(path), "video/mp4", f"{job['id']}.preview.mp4",
                             f"preview of video {job['id']}", size_limit=state["bytes"], headers=headers)
    except NotFound:  # the job ended between the two reads: its preview is gone
        raise VideoNotReady(f"video {job['id']} just ended; fetch it again") from None


async def video_events(request: Request, user: Principal) -> Response:
    api: Api = request.app.state.api
    job = await api.service.get_job(user.user_id, request.path_params["video_id"])
    return _counted(api, user, lambda: StreamingResponse(
        job_events(api.service, job), media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}))


async def voices(request: Request, user: Principal) -> Response:
    api: Api = request.app.state.api
    return _json(m.VoiceList, {"data": await api.service.generator.voices()})


# ---- webhooks ----
async def create_webhook(request: Request, user: Principal) -> Response:
    api: Api = request.app.state.api
    req = await read_body(request, m.WebhookEndpointCreateRequest, form_ok=False)
    endpoint = await api.service.webhook_store.create_endpoint(
        user_id=user.user_id, url=req.url, events=list(req.events), description=req.description)
    logger.info("webhook endpoint %s created by user %s", endpoint["id"], user.user_id)
    return _json(m.WebhookEndpointCreated, endpoint, status=201)


async def list_webhooks(request: Request, user: Principal) -> Response:
    api: Api = request.app.state.api
    endpoints = await api.service.webhook_store.list_endpoints(None if user.is_admin else user.user_id)
    return _json(m.WebhookEndpointList, {"data": endpoints})


async def delete_webhook(request: Request, user: Principal) -> Response:
    api: Api = request.app.state.api
    endpoint_id = request.path_params["webhook_id"]
    if not await api.service.webhook_store.delete_endpoint(endpoint_id, None if user.is_admin else user.user_id):
        raise NotFound(f"no webhook endpoint with id {endpoint_id!r}", param="webhook_id")
    logger.info("webhook endpoint %s deleted by user %s", endpoint_id, user.user_id)
    return _json(m.WebhookEndpointDeleted, {"id": endpoint_id})


async def webhook_deliveries(request: Request, user: Principal) -> Response:
    api: Api = request.app.state.api
    endpoint_id = request.path_params["webhook_id"]
    store = api.service.webhook_store
    if await store.get_endpoint(endpoint_id, None if user.is_admin else user.user_id) is None:
        raise NotFound(f"no webhook endpoint with id {endpoint_id!r}", param="webhook_id")
    rows = await store.list_deliveries(endpoint_id)
    data = [{**r, "video_id": r["job_id"], "next_attempt_at": r["next_attempt_at"] if r["status"] == "pending"
             else None} for r in rows]
    return _json(m.WebhookDeliveryList, {"data": data})


# ---- original CineVivid routes ----
async def text_to_video(request: Request, user: Principal) -> Response:
    api: Api = request.app.state.api
    req = await read_body(request, m.TextToVideoRequest, form_ok=False)
    job = await api.service.submit(user.user_id, GenerationSpec.model_validate(req.model_dump(exclude_none=True)))
    return _json(m.TaskCreated, {"task_id": job["id"], "status": job["status"]}, status=202)


async def get_task(request: Request, user: Principal) -> Response:
    api: Api = request.app.state.api
    job = await api.service.get_job(user.user_id, request.path_params["task_id"])
    return _json(m.Task, api.service.task_view(job))


async def admin_stats(request: Request, user: Principal) -> Response:
    api: Api = request.app.state.api
    return _json(m.AdminStats, await api.service.admin_stats())


async def cache_stats(request: Request, user: Principal) -> Response:
    api: Api = request.app.state.api
    return JSONResponse(await api.service.generator.model_info())


class ApiRoute:
    """One operation: its route, and what the OpenAPI document says of it. `query` maps each query
    parameter to its JSON schema; `errors` adds statuses beyond the common ones (with their
    description); `body_optional` documents a request body that may be left out."""

    def __init__(self, path: str, endpoint: Callable, methods: list[str], summary: str, *,
                 req: type[BaseModel] | None = None, resp: type[BaseModel] | None = None, status: int = 200,
                 auth: str | None = "user", form: bool = False, query: dict[str, dict] | None = None,
                 content: str | None = None, in_schema: bool = True, errors: dict[str, str] | None = None,
                 body_optional: bool = False):
        self.path, self.endpoint, self.methods, self.summary = path, endpoint, methods, summary
        self.req, self.resp, self.status, self.auth, self.form = req, resp, status, auth, form
        self.query, self.content, self.in_schema = query or {}, content, in_schema
        self.errors, self.body_optional = errors or {}, body_optional


R = ApiRoute
API_ROUTES = [
    R("/", root, ["GET"], "Service information", resp=m.ServiceInfo, auth=None),
    R("/health", health, ["GET"], "Health of the database, storage, each stage and the GPU", resp=m.Health,
      auth=None),
    R("/metrics", metrics, ["GET"], "Prometheus metrics (text format)", auth=None, content="text/plain"),
    R("/openapi.json", openapi, ["GET"], "This OpenAPI document", auth=None, in_schema=False),
    R("/docs", docs, ["GET"], "API docs page (works offline)", auth=None, in_schema=False),
    R("/ui", ui_index, ["GET"], "The web UI (works offline)", auth=None, in_schema=False),
    R("/ui/{asset:path}", ui_asset, ["GET"], "The web UI's files", auth=None, in_schema=False),
    R("/auth/login", login, ["POST"], "Exchange username and password for a bearer JWT", req=m.LoginRequest,
      resp=m.TokenResponse, auth=None),
    R("/v1/api-keys", create_key, ["POST"], "Create an API key (the secret is shown once)",
      req=m.ApiKeyCreateRequest, resp=m.ApiKeyCreated, status=201, body_optional=True,
      errors={"409": "You hold the most active API keys allowed; revoke one first (code api_key_limit_reached)"}),
    R("/v1/api-keys", list_keys, ["GET"], "List your API keys", resp=m.ApiKeyList),
    R("/v1/api-keys/{key_id}", revoke_key, ["DELETE"], "Revoke an API key"),
    R("/v1/videos", create_video, ["POST"], "Create a video job (JSON or multipart form)",
      req=m.VideoCreateRequest, resp=m.Video, form=True),
    R("/v1/videos/extensions", extend_video, ["POST"],
      "Extend one of your completed videos (or an uploaded MP4) by a new segment: a new video, the source "
      "followed by the segment (JSON or multipart form)", req=m.VideoExtendRequest, resp=m.Video, form=True,
      errors={"404": "No such video of yours (code not_found, param video)",
              "409": "The video is not completed yet (code video_not_ready, param video)"}),
    R("/v1/models", list_models, ["GET"], "The models this service serves, with the modes each does",
      resp=m.ModelList),
    R("/v1/videos", list_videos, ["GET"], "List your videos (after, limit, order)", resp=m.VideoList,
      query={"after": {"type": "string", "minLength": 1},
             "limit": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
             "order": {"type": "string", "enum": ["asc", "desc"], "default": "desc"}}),
    R("/v1/videos/{video_id}", get_video, ["GET"], "Retrieve a video job", resp=m.Video),
    R("/v1/videos/{video_id}", delete_video, ["DELETE"], "Delete a video (aborts it if running)",
      resp=m.VideoDeleted),
    R("/v1/videos/{video_id}/cancel", cancel_video, ["POST"], "Cancel a video job without deleting it",
      resp=m.Video),
    R("/v1/videos/{video_id}/remix", remix_video, ["POST"], "Same settings and seed, new prompt",
      req=m.VideoRemixRequest, resp=m.Video),
    R("/v1/videos/{video_id}/content", video_content, ["GET"],
      "Download the MP4 (Range supported) or thumbnail; variant=preview: the playable part so far of a long "
      "(diffusion-forcing) video still in progress (a fragmented MP4 that grows window by window), the "
      "finished video once completed",
      query={"variant": {"type": "string", "enum": ["video", "thumbnail", "preview"], "default": "video"}},
      content="video/mp4 image/jpeg", errors={"409": "The video is not completed yet, or (preview) has no "
                                                     "finished window yet (code video_not_ready)",
                                   "416": "The Range cannot be satisfied"}),
    R("/v1/videos/{video_id}/events", video_events, ["GET"], "Progress as Server-Sent Events",
      content="text/event-stream"),
    R("/v1/voices", voices, ["GET"], "Voices of the enabled voice-over providers", resp=m.VoiceList),
    R("/v1/webhooks", create_webhook, ["POST"], "Register a webhook endpoint (its signing secret is shown once)",
      req=m.WebhookEndpointCreateRequest, resp=m.WebhookEndpointCreated, status=201),
    R("/v1/webhooks", list_webhooks, ["GET"], "List your webhook endpoints (an admin: everyone's)",
      resp=m.WebhookEndpointList),
    R("/v1/webhooks/{webhook_id}", delete_webhook, ["DELETE"], "Delete a webhook endpoint and its pending deliveries",
      resp=m.WebhookEndpointDeleted),
    R("/v1/webhooks/{webhook_id}/deliveries", webhook_deliveries, ["GET"],
      "A webhook endpoint's newest deliveries, each with its attempts", resp=m.WebhookDeliveryList),
    R("/generate/text-to-video", text_to_video, ["POST"], "Queue a generation (original CineVivid route)",
      req=m.TextToVideoRequest, resp=m.TaskCreated, status=202),
    R("/tasks/{task_id}", get_task, ["GET"], "A generation task's state", resp=m.Task),
    R("/admin/stats", admin_stats, ["GET"], "Job and user statistics (admin)", resp=m.AdminStats,
      auth="admin"),
    R("/models/cache/stats", cache_stats, ["GET"], "Models cached and loaded (admin)", auth="admin"),
]


def starlette_routes(api_routes: list[ApiRoute]) -> list[Route]:
    """One Starlette route per path, whatever its methods, so that a 405 answers with an `Allow`
    header listing every method of the path. Each endpoint runs behind its route's auth check
    (`authenticated`): the table is the one place a route's auth is declared and enforced."""
    by_path: dict[str, dict[str, Callable]] = {}
    for r in api_routes:
        endpoint = authenticated(r)
        for method in r.methods:
            by_path.setdefault(r.path, {})[method] = endpoint
    routes = []
    for path, table in by_path.items():
        if len(set(table.values())) == 1:
            routes.append(Route(path, next(iter(table.values())), methods=list(table)))
            continue

        async def by_method(request: Request, table=table) -> Response:
            return await table["GET" if request.method == "HEAD" else request.method](request)

        routes.append(Route(path, by_method, methods=list(table)))
    return routes


def create_app(service: JobService, *, manage_lifecycle: bool = True) -> Starlette:
    """The HTTP app. With `manage_lifecycle` the app's lifespan starts and stops the service
    (its dispatcher and database); the Ingress deployment does the same through Serve."""
    config = service.config
    # A configuration error (e.g. no JWT secret in production) fails here, at replica start.
    auth = Authenticator(service.db, load_jwt_secret(config), token_ttl_s=config.auth.token_ttl_s,
                         issuer=config.auth.issuer)
    limits = config.limits
    api = Api(service=service, auth=auth, throttle=FailedAuthThrottle(service.db, limits.failed_auth),
              rate_limiter=SharedRateLimiter(limits.rate_limit_per_minute, limits.rate_limit_burst,
                                             app_name=service.app_args.name,
                                             shared=limits.rate_limit_scope == "cluster"),
              http_metrics=HttpMetrics(service.metrics.registry, replica=service.dispatcher.replica),
              trusted_proxies=parse_networks(config.trusted_proxies),
              streams=StreamLimiter(limits.max_streams_per_user, limits.max_streams_total),
              image_slots=asyncio.Semaphore(media.DECODE_SLOTS))

    @contextlib.asynccontextmanager
    async def lifespan(app) -> AsyncIterator[None]:
        if manage_lifecycle:
            await service.start()
        warming = asyncio.create_task(api.rate_limiter.warm())
        try:
            yield
        finally:
            warming.cancel()
            if manage_lifecycle:
                await service.stop()

    app = Starlette(routes=starlette_routes(API_ROUTES),
                    exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    lim = config.limits
    # multipart bodies that upload an image (twice: input_reference and last_frame) or a video
    media_bodies = {"/v1/videos": max(lim.max_upload_bytes, 2 * lim.max_image_bytes + lim.max_upload_bytes),
                    "/v1/videos/extensions": max(lim.max_upload_bytes, lim.max_video_bytes + lim.max_upload_bytes)}
    app.add_middleware(BodyLimitMiddleware, max_bytes=lim.max_upload_bytes, per_path=media_bodies)
    # a body that stops arriving: 408 (before HAProxy's own cut, a 400)
    app.add_middleware(BodyTimeoutMiddleware, idle_timeout_s=service.app_args.http_front.body_idle_timeout_s)
    # ordinary requests beyond the replica's request slots: 503 at once (streams and /health apart)
    app.add_middleware(AdmissionMiddleware, slots=service.app_args.deployments.ingress.max_ongoing_requests)
    app.add_middleware(MetricsMiddleware, metrics=api.http_metrics)
    app.add_middleware(SecurityHeadersMiddleware)
    app.state.api = api
    app.state.service = service
    app.state.api_routes = API_ROUTES
    return app
