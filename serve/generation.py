"""Stage contracts of the generation graph: the spec a caller sends, the events it streams back,
the result it gets, and the small models that cross stage boundaries (tensors travel as numpy).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class VoiceoverSpec(BaseModel):
    """A spoken voice-over to synthesise alongside the video and mux as AAC."""

    model_config = ConfigDict(extra="forbid")

    text: str
    voice: str | None = None
    provider: Literal["elevenlabs", "piper", "none"] | None = None
    fit: Literal["trim", "error"] = "trim"


class GenerationSpec(BaseModel):
    """One text-to-video generation. Defaults that depend on the model are filled by the
    Generator from the model's config (see `ModelConfig`); validation against the model's
    bounds happens in `serve.validation.validate_spec` before any model work."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    prompt: str
    negative_prompt: str | None = None
    model: str | None = None
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    fps: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    flow_shift: float | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    voiceover: VoiceoverSpec | None = None
    # Debug/fidelity aid: also return the float32 frames in [0, 1] (what diffusers returns).
    return_frames: bool = False


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
    return_frames: bool = False

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def shape_key(self) -> tuple:
        """Jobs with the same key can be denoised as one batch."""
        return (self.model, self.width, self.height, self.num_frames, self.num_inference_steps,
                self.guidance_scale, self.flow_shift)


class PromptEmbeds(BaseModel):
    """TextEncoder -> Transformer: (1, L, D) fp32 embeddings; rows after the real tokens are zero."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    prompt_embeds: np.ndarray
    negative_prompt_embeds: np.ndarray | None = None
    cache_hits: int = 0


class StageTiming(BaseModel):
    stage: str
    start: float  # unix time, seconds
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


class ProgressEvent(BaseModel):
    """One event of a streamed generation. `type`:
    - "stage": a stage started or finished (`stage`, `status` in {"started", "finished"})
    - "step": denoising step `step` of `total_steps` finished
    - "result": the last event; `result` holds the GenerationResult
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    type: Literal["stage", "step", "result"]
    stage: str | None = None
    status: Literal["started", "finished"] | None = None
    step: int | None = None
    total_steps: int | None = None
    progress: float = 0.0  # 0..100
    result: "GenerationResult | None" = None


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
