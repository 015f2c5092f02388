"""Stage contracts of the generation graph: the spec a caller sends, the events it streams back,
the result it gets, and the small models that cross stage boundaries (tensors travel as numpy).
"""

from __future__ import annotations

import typing

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve.frames import (  # noqa: F401 - the geometry of the Wan VAE and DiT, re-exported here
    PATCH_SIZE, SIZE_MULTIPLE, VAE_SPATIAL_FACTOR, VAE_TEMPORAL_FACTOR, dit_tokens, latent_frames,
)


# -- job statuses (the OpenAI Videos API's) ----------------------------------------------------
QUEUED, IN_PROGRESS, COMPLETED, FAILED = "queued", "in_progress", "completed", "failed"
JOB_STATUSES = (QUEUED, IN_PROGRESS, COMPLETED, FAILED)
ACTIVE_STATUSES = (QUEUED, IN_PROGRESS)
TERMINAL_STATUSES = (COMPLETED, FAILED)
# the pseudo-status of a progress event (and a client's end state) when the job's record is deleted
DELETED = "deleted"
# why a running job stops early: a user's cancel, its deletion, (Transformer) its caller's death, or
# (dispatcher) the replica shutting down, which releases the job to the queue without spending an attempt.
# A cancelled job fails with the error code CANCELLED and the message CANCELLED_MESSAGE.
CANCELLED, CALLER_GONE, SHUTDOWN = "cancelled", "caller_gone", "shutdown"
CANCEL_REASONS = (CANCELLED, DELETED, CALLER_GONE, SHUTDOWN)
CANCELLED_MESSAGE = "the job was cancelled"
# the progress phase (`stage`) of a queued job whose model is at zero replicas while one starts
STARTING_MODEL = "starting the model"
# the progress phase (`stage`) of a running job that a stage refused because its queue was full
# (`serve.errors.StageBusy`): the job service hands it over again when there is room
WAITING_FOR_CAPACITY = "waiting for capacity"


class VoiceoverSpec(BaseModel):
    """A spoken voice-over to synthesise alongside the video and mux as AAC."""

    model_config = ConfigDict(extra="forbid")

    text: str
    voice: str | None = None
    provider: Literal["elevenlabs", "piper", "none"] | None = None
    fit: Literal["trim", "error"] = "trim"


class LoraSpec(BaseModel):
    """A request's LoRA adapter: one of the model's (`GET /v1/models` lists them) at `scale`
    (None: the adapter's configured scale)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    scale: float | None = Field(default=None, ge=-10.0, le=10.0)

    @field_validator("scale", mode="before")
    @classmethod
    def _not_a_boolean(cls, v):
        if isinstance(v, bool):  # true/false is not a number (pydantic would take it as 1.0/0.0)
            raise ValueError("must be a number, not true/false")
        return v


def _numeric(annotation) -> bool:
    """Whether a field's type takes numbers (int or float, not only bool)."""
    return annotation in (int, float) or any(_numeric(a) for a in typing.get_args(annotation))


class GenerationFields(BaseModel):
    """The generation fields a caller may set on every route (the JSON body of `POST /v1/videos`,
    its extensions, the original routes and the handle client's `GenerationSpec`): ONE home, so a
    new generation field is added here, in `ResolvedSpec`, in its resolution
    (`serve.pipeline.spec`) and in the loop's settings (`LoopSettings`/`DFSettings`). Every
    numeric field refuses true/false (pydantic would take them as 1/0)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    negative_prompt: str | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    num_frames: int | None = None
    fps: int | None = None
    voiceover: VoiceoverSpec | None = None
    lora: LoraSpec | None = Field(
        default=None, description="A LoRA adapter of the model for this job: {\"name\": ..., \"scale\": ...} "
                                  "(GET /v1/models lists each model's; in a form: lora[name], lora[scale])")
    # Long video by diffusion forcing (models with a `diffusion_forcing` config); setting any of
    # these makes the job a DF job. Defaults: the model's.
    base_num_frames: int | None = Field(default=None, description="Frames per window, 4k+1 (e.g. 97)")
    overlap_history: int | None = Field(
        default=None, description="Frames each window carries over from the one before, 4k+1 (e.g. 17)")
    ar_step: int | None = Field(default=None, description="0: synchronous; > 0: asynchronous (e.g. 5)")
    causal_block_size: int | None = Field(
        default=None, description="Latent frames per causal block; divides a window's latent frames")
    addnoise_condition: float | None = Field(
        default=None, description="Noise mixed into the carried frames, 0..60 (20 recommended)")

    @field_validator("*", mode="before")
    @classmethod
    def _not_a_boolean(cls, v: Any, info) -> Any:
        if isinstance(v, bool) and _numeric(cls.model_fields[info.field_name].annotation):
            raise ValueError("must be a number, not true/false")
        return v


class GenerationSpec(GenerationFields):
    """One text-to-video generation as a caller asks for it. `serve.pipeline.spec.resolve_spec`
    fills the defaults that depend on the model (`ModelConfig`) and checks every bound, once,
    before any model work, giving the `ResolvedSpec` the stages run."""

    prompt: str
    model: str | None = None
    width: int | None = None
    height: int | None = None
    flow_shift: float | None = None
    # What the job starts from: a prompt only, a reference image (image-to-video; the image itself
    # travels beside the spec, in `GenerationInputs`), or a finished video to extend. Set by the
    # API from the request's inputs; None: text-to-video.
    mode: Literal["text-to-video", "image-to-video", "extend"] | None = None
    # Debug/fidelity aid: also return the float32 frames in [0, 1] (what diffusers returns).
    return_frames: bool = False

    def sets_diffusion_forcing(self) -> bool:
        return any(getattr(self, name) is not None for name in DF_FIELDS)


# the request fields of diffusion forcing
DF_FIELDS = ("base_num_frames", "overlap_history", "ar_step", "causal_block_size", "addnoise_condition")
# a request's mode -> the diffusion-forcing loop's (`serve.pipeline.diffusion_forcing.DFSettings.mode`)
DF_MODE = {"text-to-video": "t2v", "image-to-video": "i2v", "extend": "v2v"}


class ResolvedSpec(BaseModel):
    """A spec with every field filled and validated; what the stages actually run."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    prompt: str
    negative_prompt: str
    model: str
    width: int
    height: int
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    flow_shift: float
    seed: int
    voiceover: VoiceoverSpec | None = None
    lora: LoraSpec | None = None  # scale filled in; jobs with different adapters never share a batch
    # Diffusion forcing: all set for a DF job, all None for a T2V job.
    base_num_frames: int | None = None
    overlap_history: int | None = None
    ar_step: int | None = None
    causal_block_size: int | None = None
    addnoise_condition: float | None = None
    mode: Literal["text-to-video", "image-to-video", "extend"] = "text-to-video"
    # image-to-video with an end frame too (`last_frame`)
    has_last_image: bool = False
    # extend: the video this one continues (its id, when it is one of the service's own videos)
    extended_from_video_id: str | None = None
    # extend: the frames of the video extended (the new video is those, then `added_frames`)
    source_num_frames: int | None = None
    return_frames: bool = False

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def as_request(self) -> dict:
        """The GenerationSpec fields that make this same spec again (a remix starts from them)."""
        return self.model_dump(exclude={"has_last_image", "extended_from_video_id", "source_num_frames"})

    @property
    def added_frames(self) -> int:
        """Frames this job adds to the video: all it makes, less (extend) the `overlap_history`
        frames re-made from the end of the video it extends."""
        return self.num_frames - (self.overlap_history if self.mode == "extend" else 0)

    @property
    def output_frames(self) -> int:
        """Frames of the finished video (an extension's: the source's and the added ones)."""
        return (self.source_num_frames or 0) + self.added_frames

    @property
    def is_diffusion_forcing(self) -> bool:
        return self.base_num_frames is not None

    @property
    def lora_key(self) -> tuple | None:
        """(adapter, scale), or None: what a batch must share besides its shape."""
        return (self.lora.name, self.lora.scale) if self.lora is not None else None

    def request_batch_key(self) -> tuple:
        """Jobs with the same key can be denoised as one request-level batch, in lockstep: the same
        shape AND the same schedule (steps, guidance, shift) and adapter (DF jobs run alone).
        Step-level batching only needs the shapes: `serve.pipeline.continuous.step_batch_key`."""
        return (self.model, self.mode, self.has_last_image, self.width, self.height, self.num_frames,
                self.num_inference_steps, self.guidance_scale, self.flow_shift, self.lora_key,
                *(getattr(self, name) for name in DF_FIELDS))


class GenerationInputs(BaseModel):
    """What a job starts from besides its spec, checked and fitted by the request layer
    (`serve.media.inputs`): the reference image and optional end image of an image-to-video job,
    at the job's size, and the source video of an extension (its MP4 bytes: the Generator decodes
    the frames it needs and re-encodes the source ahead of the new segment)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    # uint8 (H, W, 3); from a handle caller also the bytes of a PNG/JPEG/WebP file (checked, decoded)
    image: np.ndarray | bytes | None = None
    last_image: np.ndarray | bytes | None = None
    video_mp4: bytes | None = None


class PromptEmbeds(BaseModel):
    """TextEncoder -> Transformer: (1, L, D) fp32 embeddings; rows after the real tokens are zero."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    prompt_embeds: np.ndarray
    negative_prompt_embeds: np.ndarray | None = None
    cache_hits: int = 0


class DecodedFrames(BaseModel):
    """VAE -> Generator: decoded frames (all of them, or one chunk of a stream)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    frames: np.ndarray  # uint8 (F, H, W, 3)
    float_frames: np.ndarray | None = None  # float32 (F, H, W, 3) in [0, 1]


class StageTiming(BaseModel):
    stage: str
    start: float  # unix time, seconds
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


class ErrorInfo(BaseModel):
    """The API's error envelope body: what failed, in words, and the request field at fault."""

    code: str
    message: str
    param: str | None = None


StageStatus = Literal["started", "finished"]


class ProgressEvent(BaseModel):
    """One progress event: the same type and JSON shape from the stage replica that emits it to
    the browser that shows it (`to_json` is the SSE `data:`; `type` is the SSE `event:`).

    - "stage": a stage started or finished (`stage`, `stage_status`); the Transformer and the VAE
      emit their own "started", the Generator the "finished" ones
    - "step": denoising step `step` of `total_steps` finished (`stage` "transformer")
    - "status": the job's status changed (`status`; `error` once failed); from the job service.
      `retry` n (with status "in_progress") says the job starts again from the beginning, for the
      n-th time, because a stage replica stopped; `error` then says which (`stage_unavailable`)
    - "progress": the job's progress read from its record (it runs on another ingress replica)
    - "window": a diffusion-forcing window's frames are final and encoded (`window` of
      `num_windows`, `playable_s` seconds playable so far); `fragment` holds the fragmented-MP4
      bytes to append to the preview (the first carries the init segment) and `frames` the
      window's uint8 frames when the spec asks for frames; neither is serialised to JSON
    - "result": the last event of a Generator stream; `result` holds the GenerationResult and is
      never serialised to JSON

    `progress` (0-100) is filled in by the Generator, which knows each stage's share; the job
    service adds the job `id` and keeps `progress` from going down.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    type: Literal["stage", "step", "status", "progress", "window", "result"]
    id: str | None = None
    status: Literal["queued", "in_progress", "completed", "failed", "deleted"] | None = None
    stage: str | None = None
    stage_status: StageStatus | None = None
    step: int | None = None
    total_steps: int | None = None
    progress: int | float = 0  # 0..100; the job service sends whole numbers
    error: ErrorInfo | None = None
    retry: int | None = None
    window: int | None = None  # 0-based index of the window that finished
    num_windows: int | None = None
    playable_s: float | None = None
    # the Serve replica that runs the stage (its "started" event; for observability, never sent to users)
    replica: str | None = Field(default=None, exclude=True)
    fragment: bytes | None = Field(default=None, exclude=True)
    frames: np.ndarray | None = Field(default=None, exclude=True)
    result: "GenerationResult | None" = Field(default=None, exclude=True)

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True, exclude={"type"})


class DenoisedLatents(BaseModel):
    """Transformer -> VAE: the last item of a `denoise` stream. `ref` is a one-element list
    holding the ObjectRef of the normalised fp32 latents (B=1, C, T, h, w): a list, so that Ray
    hands the reference over instead of resolving it."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    ref: list[Any]
    # diffusion forcing: one DenoisedLatents per window, with that window's new (final) latents
    window: int | None = None
    num_windows: int | None = None


class GenerationResult(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    mp4: bytes
    thumbnail_jpeg: bytes
    spec: ResolvedSpec
    width: int
    height: int
    num_frames: int
    fps: int
    duration_s: float
    has_audio: bool = False
    timings: list[StageTiming] = Field(default_factory=list)
    frames: np.ndarray | None = None  # float32 (F, H, W, 3) in [0, 1] when spec.return_frames
    metadata: dict[str, Any] = Field(default_factory=dict)

    def timing(self, stage: str) -> StageTiming | None:
        return next((t for t in self.timings if t.stage == stage), None)


ProgressEvent.model_rebuild()
