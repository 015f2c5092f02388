"""`resolve_spec`: fill a GenerationSpec's defaults from the model config and check every bound,
before any model work. Each failure is an InvalidSpecError naming the offending field."""

from __future__ import annotations

import secrets
from typing import Sequence

from serve.config import ModelConfig, TTSConfig
from serve.errors import InvalidSpecError, UnknownModelError
from serve.contracts import (
    DF_FIELDS, DF_MODE, SIZE_MULTIPLE, VAE_TEMPORAL_FACTOR, GenerationSpec, LoraSpec, ResolvedSpec,
)
from serve.frames import check_causal_block, check_df_window, check_frame_count, is_frame_count, parallel_refusal

# diffusers warns above this much added noise ("may cause inconsistencies"); SkyReels-V2 advises <= 50
MAX_ADDNOISE_CONDITION = 60.0


# a request's mode -> the model mode it needs
MODE_NEEDS = {"text-to-video": "text-to-video", "image-to-video": "image-to-video", "extend": "extend"}


def select_model(spec: GenerationSpec, models: ModelConfig | Sequence[ModelConfig]) -> ModelConfig:
    """The model of the set that `spec.model` names (by name or alias; None: the first), which must
    serve the spec's mode; else an error naming `model`."""
    models = [models] if isinstance(models, ModelConfig) else list(models)
    mode = spec.mode or "text-to-video"
    if spec.model is None:  # the default model, or else the first that does the mode
        model = next((m for m in models if MODE_NEEDS[mode] in m.modes()), models[0])
    else:
        model = next((m for m in models if spec.model in m.all_names()), None)
        if model is None:
            names = sorted(n for m in models for n in m.all_names())
            raise UnknownModelError(f"unknown model {spec.model!r}; this deployment serves {names}", param="model")
    if MODE_NEEDS[mode] not in model.modes():
        able = [m.name for m in models if MODE_NEEDS[mode] in m.modes()]
        raise InvalidSpecError(f"model {model.name} does not do {mode}; "
                               + (f"models that do: {able}" if able else "no model of this deployment does"),
                               param="model")
    return model


def resolve_spec(spec: GenerationSpec, models: ModelConfig | Sequence[ModelConfig], tts: TTSConfig | None = None,
                 *, image_size: tuple[int, int] | None = None, extended_from_video_id: str | None = None,
                 has_last_image: bool = False, source_num_frames: int | None = None) -> ResolvedSpec:
    """`image_size` (width, height) of the reference image: when the request sets neither width
    nor height, a portrait image turns the model's default landscape size portrait (and the
    other way round), as SkyReels-V2 does."""
    # 1. The model, the prompts and the LoRA adapter (whose defaults come before the model's)
    model = select_model(spec, models)
    mode = spec.mode or "text-to-video"
    negative = _check_prompts(spec, model)
    lora, adapter_defaults = _resolve_lora(spec, model)

    # 2. Size, length and sampling
    width, height = _resolve_size(spec, model, image_size)
    frames = _resolve_num_frames(spec, model)
    sampling = _resolve_sampling(spec, model, adapter_defaults)

    # 3. Voice-over, the last frame, diffusion forcing
    voiceover = spec.voiceover
    if voiceover is not None:
        from serve.pipeline.voiceover import validate_voiceover

        voiceover = validate_voiceover(voiceover, tts or TTSConfig())

    if has_last_image and model.pipeline == "i2v":
        raise InvalidSpecError(f"model {model.name} does not take a last frame (an I2V model starts from one image); "
                               "the DF models do", param="last_frame")
    df = resolve_diffusion_forcing(spec, model, frames, force=mode != "text-to-video" and model.pipeline == "df",
                                   df_mode=DF_MODE[mode], last_image=has_last_image)

    # 4. What a replica spread over several devices can run (`model.parallel`)
    refusal = parallel_refusal(width, height, model.parallel.sequence_degree, df.get("causal_block_size", 1))
    if refusal:
        raise InvalidSpecError(f"model {model.name}: {refusal[0]}", param=refusal[1])

    seed = spec.seed if spec.seed is not None else secrets.randbelow(2**31)
    return ResolvedSpec(
        prompt=spec.prompt, negative_prompt=negative, model=model.name, width=width, height=height,
        num_frames=frames, seed=seed, voiceover=voiceover, lora=lora, return_frames=spec.return_frames, mode=mode,
        has_last_image=has_last_image, extended_from_video_id=extended_from_video_id,
        source_num_frames=source_num_frames, **sampling, **df,
    )


def _check_prompts(spec: GenerationSpec, model: ModelConfig) -> str:
    """Check the prompt and the negative prompt; returns the negative prompt (the model's by default)."""
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
    return negative


def _resolve_lora(spec: GenerationSpec, model: ModelConfig) -> tuple[LoraSpec | None, dict]:
    """The request's LoRA adapter (checked against the model's catalog) and its request defaults."""
    if spec.lora is None:
        return None, {}
    from serve.pipeline.lora import adapter_catalog

    catalog = adapter_catalog(model)
    adapter = catalog.get(spec.lora.name)
    if adapter is None:
        raise InvalidSpecError(f"unknown LoRA adapter {spec.lora.name!r} for model {model.name}; it has "
                               + (", ".join(repr(n) for n in sorted(catalog)) if catalog else "none"),
                               param="lora")
    lora = LoraSpec(name=adapter.name, scale=adapter.scale if spec.lora.scale is None else spec.lora.scale)
    return lora, adapter.request_defaults()  # e.g. a step-distilled adapter's 4 steps, guidance 1


def _resolve_size(spec: GenerationSpec, model: ModelConfig, image_size: tuple[int, int] | None) -> tuple[int, int]:
    """Width and height: the request's, else the model's (turned to the reference image's orientation)."""
    width = model.width if spec.width is None else spec.width
    height = model.height if spec.height is None else spec.height
    if image_size is not None and spec.width is None and spec.height is None \
            and (image_size[1] > image_size[0]) != (height > width):
        width, height = height, width
    for name, value, upper in (("width", width, model.max_width), ("height", height, model.max_height)):
        if value % SIZE_MULTIPLE != 0:
            raise InvalidSpecError(f"{name} must be a multiple of {SIZE_MULTIPLE}, got {value}", param=name)
        if not model.min_size <= value <= upper:
            raise InvalidSpecError(
                f"{name} must be between {model.min_size} and {upper} for model {model.name}, got {value}",
                param=name)
    return width, height


def _resolve_num_frames(spec: GenerationSpec, model: ModelConfig) -> int:
    frames = model.num_frames if spec.num_frames is None else spec.num_frames
    if not is_frame_count(frames):
        raise InvalidSpecError(
            f"num_frames must be 4k+1 (1, 5, 9, ...), got {frames}", param="num_frames")
    if frames > model.max_frames:
        raise InvalidSpecError(
            f"num_frames must be at most {model.max_frames} for model {model.name}, got {frames}",
            param="num_frames")
    return frames


def _resolve_sampling(spec: GenerationSpec, model: ModelConfig, adapter_defaults: dict) -> dict:
    """Steps, guidance, fps and flow shift: the request's, else the adapter's, else the model's."""
    steps = spec.num_inference_steps if spec.num_inference_steps is not None else adapter_defaults.get("num_inference_steps", model.num_inference_steps)
    if not 1 <= steps <= model.max_steps:
        raise InvalidSpecError(
            f"num_inference_steps must be between 1 and {model.max_steps}, got {steps}",
            param="num_inference_steps")

    guidance = spec.guidance_scale if spec.guidance_scale is not None else adapter_defaults.get("guidance_scale", model.guidance_scale)
    if not guidance >= 1.0 or guidance > 50:
        raise InvalidSpecError(f"guidance_scale must be between 1 and 50, got {guidance}", param="guidance_scale")

    fps = model.fps if spec.fps is None else spec.fps
    if not 1 <= fps <= model.max_fps:
        raise InvalidSpecError(f"fps must be between 1 and {model.max_fps}, got {fps}", param="fps")

    shift = spec.flow_shift if spec.flow_shift is not None else adapter_defaults.get("flow_shift", model.flow_shift)
    if not 0 < shift <= 100:
        raise InvalidSpecError(f"flow_shift must be in (0, 100], got {shift}", param="flow_shift")
    return {"num_inference_steps": steps, "guidance_scale": float(guidance), "fps": fps, "flow_shift": float(shift)}


def resolve_diffusion_forcing(spec: GenerationSpec, model: ModelConfig, frames: int, force: bool = False,
                              df_mode: str = "t2v", last_image: bool = False) -> dict:
    """The DF fields of the ResolvedSpec: all None for a T2V job; all filled and checked for a DF
    job (the model does DF, and it always does, or the video is longer than a window, or the
    request sets a DF field). Each failure names its field."""
    cfg = model.diffusion_forcing
    if cfg is None:
        for name in DF_FIELDS:
            if getattr(spec, name) is not None:
                raise InvalidSpecError(f"{name}: model {model.name} does not do diffusion forcing (long video)",
                                       param=name)
        return {}
    base = cfg.base_num_frames if spec.base_num_frames is None else spec.base_num_frames
    if not (force or cfg.mode == "always" or frames > base or spec.sets_diffusion_forcing()):
        return {}

    check_frame_count("base_num_frames", base, minimum=5)
    if base > cfg.max_base_num_frames:
        raise InvalidSpecError(f"base_num_frames must be at most {cfg.max_base_num_frames} for model "
                               f"{model.name}, got {base}", param="base_num_frames")
    overlap = cfg.overlap_history if spec.overlap_history is None else spec.overlap_history
    check_df_window(base, overlap)

    ar_step = cfg.ar_step if spec.ar_step is None else spec.ar_step
    if not 0 <= ar_step <= model.max_steps:
        raise InvalidSpecError(f"ar_step must be between 0 (synchronous) and {model.max_steps}, got {ar_step}",
                               param="ar_step")
    block = cfg.causal_block_size if spec.causal_block_size is None else spec.causal_block_size
    check_causal_block(base, overlap, block)
    noise = cfg.addnoise_condition if spec.addnoise_condition is None else spec.addnoise_condition
    if not 0 <= noise <= MAX_ADDNOISE_CONDITION:
        raise InvalidSpecError(f"addnoise_condition must be between 0 and {MAX_ADDNOISE_CONDITION:g} "
                               f"(20 is recommended), got {noise}", param="addnoise_condition")

    from serve.pipeline.diffusion_forcing import plan_windows

    def last_window(n: int) -> int:
        plan = plan_windows(n, base, overlap, block, df_mode, last_image)
        return plan.window_latent_frames[-1] - plan.end_latent_frames

    if df_mode == "v2v" and frames <= overlap:
        raise InvalidSpecError(f"num_frames ({frames}) must exceed overlap_history ({overlap}) to extend a video",
                               param="num_frames")
    if last_window(frames) % block:
        fits = [n for n in range(frames - 4 * 2 * block, frames + 4 * 2 * block + 1, VAE_TEMPORAL_FACTOR)
                if 1 <= n <= model.max_frames and (df_mode != "v2v" or n > overlap) and last_window(n) % block == 0]
        raise InvalidSpecError(
            f"num_frames={frames} leaves a last window of {last_window(frames)} latent frames, not a multiple of "
            f"causal_block_size ({block}); nearby num_frames that fit: {fits}", param="num_frames")
    return {"base_num_frames": base, "overlap_history": overlap, "ar_step": ar_step, "causal_block_size": block,
            "addnoise_condition": float(noise)}
