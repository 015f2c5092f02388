"""A job that starts from an image or a video: its spec resolved against what it starts from, and
its inputs made ready for the stages. One place for the HTTP API (which then saves the inputs with
the job) and for the Generator (a Ray job calling it through a handle with an image or a video).

- image-to-video: the image (an array, or the bytes of a PNG/JPEG/WebP file) is checked, gives the
  video its orientation when the request sets no size (a portrait image, a portrait video), and is
  fitted to the video's size (scaled to cover, centre-cropped); so is an optional `last_image`.
- extend: the video to extend (MP4 bytes or a path) gives the new video its size and frame rate;
  `num_frames` (or `seconds`) is the length of the new segment: `num_frames - 1` frames are added
  (a multiple of 4). The diffusion-forcing job then makes `overlap_history + added` frames, the first
  `overlap_history` of them re-made from the source's end (`serve.pipeline.diffusion_forcing`,
  mode "v2v"), and the video is the source followed by the added frames. A source shorter than the
  model's `overlap_history` carries all of itself (its largest 4k+1 frames); one shorter than an
  `overlap_history` the request sets is a 400.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from serve.config import ModelConfig, TTSConfig
from serve.contracts import SIZE_MULTIPLE, GenerationInputs, GenerationSpec, ResolvedSpec
from serve.errors import InvalidSpecError
from serve.frames import is_frame_count, largest_frame_count
from serve.pipeline.spec import resolve_spec, select_model


def infer_mode(spec: GenerationSpec, inputs: GenerationInputs | None) -> str:
    if spec.mode is not None:
        return spec.mode
    if inputs is not None and inputs.video_mp4 is not None:
        return "extend"
    if inputs is not None and inputs.image is not None:
        return "image-to-video"
    return "text-to-video"


def as_image(value, field: str, limits=None) -> np.ndarray:
    """An image given as file bytes (checked and decoded) or as an array (checked): uint8 (H, W, 3)."""
    from serve.media.inputs import DEFAULT_IMAGE_LIMITS, decode_image

    limits = limits or DEFAULT_IMAGE_LIMITS
    if isinstance(value, (bytes, bytearray, memoryview)):
        return decode_image(bytes(value), field, limits)
    arr = np.asarray(value)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or 0 in arr.shape:
        raise InvalidSpecError(f"{field} must be a uint8 RGB image array (H, W, 3), got {arr.dtype} {arr.shape}",
                               param=field)
    h, w = arr.shape[:2]
    if w > limits.max_width or h > limits.max_height or w * h > limits.max_pixels:
        raise InvalidSpecError(f"{field} is {w}x{h} pixels; at most {limits.max_width}x{limits.max_height} and "
                               f"{limits.max_pixels} pixels", param=field)
    return arr


def prepare_job(spec: GenerationSpec, inputs: GenerationInputs | None, models: ModelConfig | Sequence[ModelConfig],
                tts: TTSConfig | None = None, *, image_limits=None, video_limits=None,
                video_source: bytes | Path | None = None,
                extended_from_video_id: str | None = None) -> tuple[ResolvedSpec, GenerationInputs | None]:
    """The resolved spec of a job and its inputs ready for the stages (images fitted to the size).
    `video_source`: the video to extend, when it is not in `inputs` (a file of the service's own)."""
    mode = infer_mode(spec, inputs)
    spec = spec.model_copy(update={"mode": mode})
    if mode == "text-to-video":
        if inputs is not None and (inputs.image is not None or inputs.video_mp4 is not None):
            raise InvalidSpecError("a text-to-video job takes no image or video", param="mode")
        return resolve_spec(spec, models, tts), None
    if mode == "image-to-video":
        return _image_job(spec, inputs, models, tts, image_limits)
    return _extension_job(spec, inputs, models, tts, video_limits, video_source, extended_from_video_id)


def _image_job(spec, inputs, models, tts, limits):
    from serve.media.inputs import fit_image

    if inputs is None or inputs.image is None:
        raise InvalidSpecError("image-to-video needs an image (input_reference)", param="input_reference")
    image = as_image(inputs.image, "input_reference", limits)
    last = None if inputs.last_image is None else as_image(inputs.last_image, "last_frame", limits)
    resolved = resolve_spec(spec, models, tts, image_size=(image.shape[1], image.shape[0]),
                            has_last_image=last is not None)
    w, h = resolved.width, resolved.height
    return resolved, GenerationInputs(image=fit_image(image, w, h),
                                      last_image=None if last is None else fit_image(last, w, h))


def _extension_job(spec, inputs, models, tts, limits, source, extended_from):
    from serve.media.inputs import DEFAULT_VIDEO_LIMITS, probe_video

    source = source if source is not None else (inputs.video_mp4 if inputs is not None else None)
    if source is None:
        raise InvalidSpecError("extend needs the video to extend", param="video")
    model = select_model(spec, models)  # (a model that cannot extend is refused before the video is read)
    info = probe_video(source, "video", limits or DEFAULT_VIDEO_LIMITS)
    for name, value in (("width", info.width), ("height", info.height)):
        if value % SIZE_MULTIPLE or not model.min_size <= value <= getattr(model, f"max_{name}"):
            raise InvalidSpecError(
                f"the video to extend is {info.width}x{info.height}; model {model.name} extends videos whose sides "
                f"are multiples of {SIZE_MULTIPLE} up to {model.max_width}x{model.max_height}", param="video")
    overlap = spec.overlap_history
    if overlap is None:  # the model's, or as much of a shorter video as makes 4k+1 frames
        overlap = min(model.diffusion_forcing.overlap_history, largest_frame_count(info.num_frames))
    if info.num_frames < overlap:
        raise InvalidSpecError(f"the video to extend has {info.num_frames} frames; extending it carries its last "
                               f"{overlap} (overlap_history)", param="video")
    new = spec.num_frames if spec.num_frames is not None else model.num_frames
    if not is_frame_count(new, minimum=5):
        raise InvalidSpecError(f"num_frames (the new segment) must be 4k+1 and at least 5, got {new}",
                               param="num_frames")
    fps = spec.fps if spec.fps is not None else max(1, round(info.fps))
    spec = spec.model_copy(update={"width": info.width, "height": info.height, "fps": fps,
                                   "num_frames": overlap + new - 1, "overlap_history": overlap})
    resolved = resolve_spec(spec, models, tts, extended_from_video_id=extended_from,
                            source_num_frames=info.num_frames)
    return resolved, GenerationInputs(video_mp4=source if isinstance(source, bytes) else None)
