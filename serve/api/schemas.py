"""Request and response models of the HTTP API (pydantic v2; requests forbid unknown fields).
The OpenAPI document is generated from these."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve.contracts import GenerationFields


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class _Response(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


# ---- errors ----
class ErrorBody(_Response):
    code: str
    message: str
    param: str | None = None


class ErrorEnvelope(_Response):
    error: ErrorBody


# ---- auth ----
class LoginRequest(_Request):
    username: str = Field(min_length=1, max_length=128)
    password: str = Field(min_length=1, max_length=1024)


class TokenResponse(_Response):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int


class ApiKeyCreateRequest(_Request):
    name: str = Field(default="", max_length=128)


class ApiKey(_Response):
    id: str
    object: Literal["api_key"] = "api_key"
    name: str
    prefix: str
    created_at: int
    revoked_at: int | None = None


class ApiKeyCreated(ApiKey):
    key: str = Field(description="The secret key; shown only once")


class ApiKeyList(_Response):
    object: Literal["list"] = "list"
    data: list[ApiKey]


# ---- videos (OpenAI Videos API + CineVivid extensions) ----
class _GenerationExtensions(_Request, GenerationFields):
    """The generation fields beyond OpenAI's (`serve.contracts.GenerationFields`, their one home),
    on every route that generates. A numeric field (here or in a subclass: `seconds`, `width`)
    refuses true/false (`GenerationFields._not_a_boolean`)."""

    @field_validator("voiceover", "lora", mode="before")
    @classmethod
    def _an_object(cls, v: Any, info) -> Any:
        # a form's JSON-encoded object is parsed by serve.api.requests (one parser for every body)
        if v is not None and not isinstance(v, dict):
            raise ValueError(f"{info.field_name} must be an object")
        return v


# A prompt must say something; the length limit is the model's (`max_prompt_chars`), checked with
# the other bounds so the error names the field with a 400.
def _prompt():
    return Field(description="What the video shows", json_schema_extra={"minLength": 1, "pattern": r"\S"})


# In JSON an image is {"image_url": "data:..."}; in a multipart form (x-upload) it is a file.
_IMAGE_REFERENCE = {"anyOf": [{"type": "object", "properties": {"image_url": {"type": "string", "minLength": 1}},
                               "required": ["image_url"]}, {"type": "null"}], "x-upload": True}


class VideoCreateRequest(_GenerationExtensions):
    prompt: str = _prompt()
    model: str | None = None
    seconds: str | float | None = Field(default=None, description="Clip length in seconds; maps onto frames")
    size: str | None = Field(default=None, description="WIDTHxHEIGHT within the model's bounds")
    input_reference: Any = Field(
        default=None, description="Image-to-video: the first frame, a PNG, JPEG or WebP file (multipart) or "
                                  "{\"image_url\": \"data:image/...;base64,...\"}; fitted to the video's size",
        json_schema_extra=_IMAGE_REFERENCE)
    last_frame: Any = Field(
        default=None, description="Image-to-video with an end frame too (models that support it): as input_reference",
        json_schema_extra=_IMAGE_REFERENCE)


class VideoExtendRequest(_GenerationExtensions):
    prompt: str = _prompt()
    model: str | None = Field(default=None, description="A model that can extend; default: the first that can")
    seconds: str | float = Field(description="Length of the new segment in seconds")
    video: Any = Field(description="The video to extend: {\"id\": \"video_...\"} (one of your completed videos) "
                                   "or an uploaded MP4 (multipart)",
                       json_schema_extra={"type": "object", "properties": {"id": {"type": "string", "minLength": 1}},
                                          "required": ["id"], "x-upload": True})


class ModelAdapter(_Response):
    name: str
    scale: float  # the scale a request gets when it sets none
    # what a request that sets none of these gets with this adapter (None: the model's default)
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    flow_shift: float | None = None


class Model(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "cinevivid"
    aliases: list[str] = Field(default_factory=list)
    modes: list[Literal["text-to-video", "image-to-video", "long-video", "extend"]]
    default: bool = False
    size: str  # the default WIDTHxHEIGHT
    max_size: str
    max_frames: int
    fps: int
    num_inference_steps: int
    lora_adapters: list[ModelAdapter] = Field(default_factory=list, description="What a request's `lora` may name")


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[Model]


class VideoRemixRequest(_Request):
    prompt: str = _prompt()


class VideoError(_Response):
    code: str
    message: str
    param: str | None = None


class Video(_Response):
    id: str
    object: Literal["video"] = "video"
    created_at: int
    status: Literal["queued", "in_progress", "completed", "failed"]
    model: str
    progress: int
    seconds: str
    size: str
    prompt: str | None = None
    completed_at: int | None = None
    expires_at: int | None = None
    error: VideoError | None = None
    remixed_from_video_id: str | None = None
    # CineVivid extensions
    stage: str | None = None
    has_audio: bool = False
    seed: int | None = None
    num_frames: int | None = None
    fps: int | None = None
    num_inference_steps: int | None = None
    # a diffusion-forcing job in progress: windows finished (and playable as a preview) of all
    windows_done: int | None = None
    windows_total: int | None = None
    playable_seconds: float | None = None
    # how it started: "text-to-video", "image-to-video" or "extend" (then the video it extends,
    # when that is one of yours; `seconds` and `num_frames` are then the whole stitched video's)
    mode: str = "text-to-video"
    extended_from_video_id: str | None = None


class VideoList(_Response):
    object: Literal["list"] = "list"
    data: list[Video]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class VideoDeleted(_Response):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


class Voice(_Response):
    voice_id: str
    name: str
    provider: str


class VoiceList(_Response):
    object: Literal["list"] = "list"
    data: list[Voice]


# ---- webhooks ----
WebhookEventType = Literal["video.completed", "video.failed"]


class WebhookEndpointCreateRequest(_Request):
    url: str = Field(description="Where to POST events: an http:// or https:// URL (length limit in "
                                 "args.ingress.webhooks.max_url_length)")
    events: list[WebhookEventType] = Field(default_factory=lambda: ["video.completed", "video.failed"],
                                           min_length=1, description="The event types to send")
    description: str = Field(default="", max_length=512)

    @field_validator("events")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))


class WebhookEndpoint(_Response):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[str]
    description: str = ""
    created_at: int
    owner: str = Field(description="The username the endpoint belongs to")


class WebhookEndpointCreated(WebhookEndpoint):
    secret: str = Field(description="The signing secret (whsec_...); shown only once")


class WebhookEndpointList(_Response):
    object: Literal["list"] = "list"
    data: list[WebhookEndpoint]


class WebhookEndpointDeleted(_Response):
    id: str
    object: Literal["webhook_endpoint.deleted"] = "webhook_endpoint.deleted"
    deleted: bool = True


class WebhookAttempt(_Response):
    attempt: int
    status_code: int | None = Field(description="The endpoint's HTTP status; null when it did not answer")
    error: str | None = None
    started_at: float
    duration_ms: float


class WebhookDelivery(_Response):
    id: str = Field(description="The webhook-id header, the same on every retry")
    object: Literal["webhook_delivery"] = "webhook_delivery"
    event_type: str
    video_id: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: float | None = Field(description="When a pending delivery is tried next")
    last_status_code: int | None = None
    last_error: str | None = None
    created_at: float
    delivered_at: float | None = None
    attempt_log: list[WebhookAttempt]


class WebhookDeliveryList(_Response):
    object: Literal["list"] = "list"
    data: list[WebhookDelivery]


# ---- original CineVivid routes ----
class TextToVideoRequest(_GenerationExtensions):
    prompt: str = _prompt()
    model: str | None = None
    width: int | None = None
    height: int | None = None
    flow_shift: float | None = None



class TaskCreated(_Response):
    task_id: str
    status: str


class Task(_Response):
    task_id: str
    status: str
    progress: int
    stage: str | None = None
    prompt: str
    created_at: int
    completed_at: int | None = None
    error: VideoError | None = None
    has_audio: bool = False
    video_url: str | None = None
    thumbnail_url: str | None = None


class ServiceInfo(_Response):
    name: str
    version: str
    model: str
    docs_url: str = "/docs"
    openapi_url: str = "/openapi.json"
    endpoints: list[str]


class ComponentHealth(_Response):
    status: Literal["healthy", "unhealthy", "unavailable"]
    detail: str = ""


class Health(_Response):
    status: Literal["healthy", "degraded", "unhealthy"]
    services: dict[str, ComponentHealth]


class AdminStats(_Response):
    total_videos: int
    active_users: int
    jobs_by_status: dict[str, int]
    queue_depth: int
    running_here: int
