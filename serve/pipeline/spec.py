"""`resolve_spec`: fill a GenerationSpec's defaults from the model config and check every bound,
before any model work. Each failure is an InvalidSpecError naming the offending field."""

from __future__ import annotations

import secrets

from serve.config import ModelConfig, TTSConfig
from serve.errors import InvalidSpecError, UnknownModelError
from serve.contracts import SIZE_MULTIPLE, VAE_TEMPORAL_FACTOR, GenerationSpec, ResolvedSpec


def resolve_spec(spec: GenerationSpec, model: ModelConfig, tts: TTSConfig | None = None) -> ResolvedSpec:
    if spec.model is not None and spec.model not in model.all_names():
        raise UnknownModelError(
            f"unknown model {spec.model!r}; this deployment serves {sorted(model.all_names())}", param="model")

    prompt = (spec.prompt or "").strip()
    if not prompt:
        raise InvalidSpecError("prompt must not be empty", param="prompt")
    if len(spec.prompt) > model.max_prompt_chars:
        raise InvalidSpecError(
            f"prompt is {len(spec.prompt)} characters; the limit is {model.max_prompt_chars}", param="prompt")
    negative = model.negative_prompt if spec.negative_prompt is None else spec.negative_prompt
    if len(negative) > model.max_prompt_chars:
        raise InvalidSpecError(
            f"negative_prompt is {len(negative)} characters; the limit is {model.max_prompt_chars}",
            param="negative_prompt")

    width = model.width if spec.width is None else spec.width
    height = model.height if spec.height is None else spec.height
    for name, value, upper in (("width", width, model.max_width), ("height", height, model.max_height)):
        if value % SIZE_MULTIPLE != 0:
            raise InvalidSpecError(f"{name} must be a multiple of {SIZE_MULTIPLE}, got {value}", param=name)
        if not model.min_size <= value <= upper:
            raise InvalidSpecError(
                f"{name} must be between {model.min_size} and {upper} for model {model.name}, got {value}",
                param=name)

    frames = model.num_frames if spec.num_frames is None else spec.num_frames
    if frames < 1 or (frames - 1) % VAE_TEMPORAL_FACTOR != 0:
        raise InvalidSpecError(
            f"num_frames must be 4k+1 (1, 5, 9, ...), got {frames}", param="num_frames")
    if frames > model.max_frames:
        raise InvalidSpecError(
            f"num_frames must be at most {model.max_frames} for model {model.name}, got {frames}",
            param="num_frames")

    steps = model.num_inference_steps if spec.num_inference_steps is None else spec.num_inference_steps
    if not 1 <= steps <= model.max_steps:
        raise InvalidSpecError(
            f"num_inference_steps must be between 1 and {model.max_steps}, got {steps}",
            param="num_inference_steps")

    guidance = model.guidance_scale if spec.guidance_scale is None else spec.guidance_scale
    if not guidance >= 1.0 or guidance > 50:
        raise InvalidSpecError(f"guidance_scale must be between 1 and 50, got {guidance}", param="guidance_scale")

    fps = model.fps if spec.fps is None else spec.fps
    if not 1 <= fps <= model.max_fps:
        raise InvalidSpecError(f"fps must be between 1 and {model.max_fps}, got {fps}", param="fps")

    shift = model.flow_shift if spec.flow_shift is None else spec.flow_shift
    if not 0 < shift <= 100:
        raise InvalidSpecError(f"flow_shift must be in (0, 100], got {shift}", param="flow_shift")

    voiceover = spec.voiceover
    if voiceover is not None:
        from serve.pipeline.voiceover import validate_voiceover

        voiceover = validate_voiceover(voiceover, tts or TTSConfig())

    seed = spec.seed if spec.seed is not None else secrets.randbelow(2**31)
    return ResolvedSpec(
        prompt=spec.prompt, negative_prompt=negative, model=model.name, width=width, height=height,
        num_frames=frames, fps=fps, num_inference_steps=steps, guidance_scale=float(guidance),
        flow_shift=float(shift), seed=seed, voiceover=voiceover, return_frames=spec.return_frames,
    )
