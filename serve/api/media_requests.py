"""Requests that start from an image or a video: `POST /v1/videos` with `input_reference` (and
`last_frame`), and `POST /v1/videos/extensions`. Everything a user sends is checked here, before
the job exists and before any model work (`serve.media.inputs`: format, bytes, pixels, decodable);
the job is then queued with its inputs saved beside it (`ArtifactStore.save_inputs`), so nothing is
left on disk for a request that is refused.

An image arrives as a multipart upload (what the openai SDK sends for a file) or as JSON
`{"image_url": "data:image/...;base64,..."}`; `file_id` references are refused (no files API). It is
fitted to the video's size (scaled to cover it, centre-cropped); when the request sets no size, a
portrait image makes a portrait video.

A video to extend is `{"id": "video_..."}`, one of the caller's own completed videos (another
user's is a 404, one not completed a 409), or an uploaded MP4. The new video is the source followed
by the new segment; its size and frame rate are the source's.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
import io
from pathlib import Path
from typing import Any

import numpy as np

from serve.api.requests import spec_from_openai
from serve.contracts import COMPLETED, GenerationInputs, ResolvedSpec
from serve.errors import InvalidSpecError, NotFound, VideoNotReady
from serve.jobs.service import JobService


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


async def read_image(service: JobService, value: Any, upload: bytes | None, field: str) -> np.ndarray | None:
    """The image a request gives in `field` (an upload, or {"image_url": data URL}), checked and
    decoded to uint8 (H, W, 3); None when the field is absent."""
    from serve.media import inputs

    limits = service.image_limits()
    if upload is not None:
        data = upload
    elif value in (None, ""):
        return None
    else:
        if isinstance(value, str):  # a form field: a JSON object as text, or the data URL itself
            import json

            try:
                value = json.loads(value) if value.lstrip().startswith("{") else {"image_url": value}
            except ValueError:
                raise InvalidSpecError(f"{field} must be an image file or {{\"image_url\": \"data:...\"}}",
                                       param=field) from None
        if not isinstance(value, dict):
            raise InvalidSpecError(f"{field} must be an image file or {{\"image_url\": \"data:...\"}}", param=field)
        if value.get("file_id"):
            raise InvalidSpecError(f"{field}.file_id is not supported (this service has no files API); upload the "
                                   "image, or send it as {\"image_url\": \"data:image/png;base64,...\"}", param=field)
        url = value.get("image_url")
        if not isinstance(url, str) or not url:
            raise InvalidSpecError(f"{field} needs image_url (a data: URL) or an uploaded file", param=field)
        data = inputs.decode_data_url(url, field, limits)
    return await asyncio.to_thread(_bounded_decode, inputs.decode_image, data, field, limits)


# Image decodes at once in one ingress process: a 40 MP image costs a few hundred MB while it is
# decoded; a slot each keeps the replica's memory at DECODE_SLOTS of them, whatever the number of
# concurrent uploads (the others wait their turn, in threads), and the memory goes back to the OS
# after each (`_give_back_memory`).
DECODE_SLOTS = 1
_decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)


def _bounded_decode(decode, data: bytes, field: str, limits) -> np.ndarray:
    with _decode_slots:
        try:
            return decode(data, field, limits)
        finally:
            _give_back_memory()


def _give_back_memory() -> None:
    """glibc keeps freed heap pages for reuse: hand them back (a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


async def image_job(service: JobService, req, image: np.ndarray, last: np.ndarray | None
                    ) -> tuple[ResolvedSpec, dict[str, bytes]]:
    """The ResolvedSpec of an image-to-video request and the input files to queue it with."""
    model = service.model_for(req.model, "image-to-video")
    spec = spec_from_openai(req, model).model_copy(update={"mode": "image-to-video"})
    resolved, ready = service.prepare(spec, GenerationInputs(image=image, last_image=last))
    files = {"image.png": await asyncio.to_thread(_png, ready.image)}
    if ready.last_image is not None:
        files["last_image.png"] = await asyncio.to_thread(_png, ready.last_image)
    return resolved, files


async def extension_job(service: JobService, user_id: str, req, upload: bytes | None
                        ) -> tuple[ResolvedSpec, dict[str, bytes | Path]]:
    """The ResolvedSpec of an extension request and its input files (the source MP4)."""
    source_id = None
    if upload is not None:
        source: bytes | Path = upload
    else:
        ref = req.video
        if isinstance(ref, str):
            ref = {"id": ref}
        if not isinstance(ref, dict) or not isinstance(ref.get("id"), str) or not ref["id"]:
            raise InvalidSpecError("video must be {\"id\": \"video_...\"} (one of your completed videos) or an "
                                   "uploaded MP4", param="video")
        job = await service.store.get(ref["id"], user_id)
        if job is None:
            raise NotFound(f"no video with id {ref['id']!r}", param="video")
        if job["status"] != COMPLETED or not job["video_path"]:
            raise VideoNotReady(f"video {ref['id']} is {job['status']}; only a completed video can be extended",
                                param="video")
        source, source_id = Path(job["video_path"]), job["id"]
    from serve.media.inputs import probe_video

    model = service.model_for(req.model, "extend")
    info = await asyncio.to_thread(probe_video, source, "video", service.video_limits())
    # `seconds` of the new segment at the source's frame rate
    spec = spec_from_openai(req, model, default_fps=max(1, round(info.fps))).model_copy(update={"mode": "extend"})
    resolved, _ = await asyncio.to_thread(service.prepare, spec, None, video_source=source,
                                          extended_from_video_id=source_id)
    return resolved, {"source.mp4": source}
