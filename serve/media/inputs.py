"""Pictures and videos a user sends (image-to-video's `input_reference`, a video to extend):
checked, then decoded to uint8 RGB arrays, all before any model work.

Every bad input is a typed error naming the request field (`param`): too many bytes is a 413
`PayloadTooLarge`; anything else (not an accepted format, a picture that is too large or has no
pixels, a damaged or truncated file, a video without a picture track, ...) is a 400
`InvalidSpecError` whose message says what is wrong in a user's words.

Pictures (PNG, JPEG, WebP), cheapest check first:
- the byte count, then the format by its magic bytes: only those three are ever parsed, so a GIF
  (a TIFF, a BMP, ...) is refused before any decoder sees it;
- the pixel size, read from the header by our own few lines (PNG IHDR, JPEG SOF, WebP VP8/VP8L/
  VP8X) and checked before Pillow opens the file. Pillow alone cannot do this step for us:
  `Image.open` refuses a header over 2x `Image.MAX_IMAGE_PIXELS` (`DecompressionBombError`)
  before we could learn the size, refuses a 0x0 PNG as "cannot identify", and its WebP plugin
  allocates the whole canvas when the file is opened. Our limits are below Pillow's, so its bomb
  check does not fire for a header we accept (it is still caught, should the readers disagree),
  and the size Pillow reports is checked again before any pixel is decoded;
- the pixels, decoded in full (`load()`) inside one try, with `ImageFile.LOAD_TRUNCATED_IMAGES`
  left False: a truncated file is an error, never a grey-padded picture;
- EXIF orientation is applied (the picture comes out as a viewer shows it); transparency is
  composited on white (what a viewer shows on a page; the colour hidden under a transparent pixel
  is arbitrary, often black, so dropping alpha as `convert("RGB")` does would show it). No colour
  management: an ICC profile is ignored, as SkyReels-V2's own loading does.

Videos (MP4/MOV, any codec PyAV decodes) go through FFmpeg's MP4/MOV demuxer only, from memory
(`io.BytesIO`) or a path; nothing is written to disk. The header is checked (a picture track, its
size, frame count and duration) before the frames are decoded, and again while they are decoded
(a header can lie). A display rotation (a phone's portrait video) is applied.

`fit_image` and `orient_size` prepare the picture as SkyReels-V2's `generate_video.py` does for
image-to-video.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import struct
import zlib
from collections import deque
from typing import Iterator, NamedTuple

import av
import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from serve.errors import InvalidSpecError, PayloadTooLarge

MIB = 2**20


# -- limits -----------------------------------------------------------------------------------
class ImageLimits(BaseModel):
    """What a picture may be. Over `max_bytes` is a 413; over any other bound a 400."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_bytes: int = Field(default=20 * MIB, ge=1)
    max_width: int = Field(default=8192, ge=1)
    max_height: int = Field(default=8192, ge=1)
    max_pixels: int = Field(default=40_000_000, ge=1)  # below Pillow's bomb warning (~89.5 MP)


class VideoLimits(BaseModel):
    """What a video may be. Over `max_bytes` is a 413; over any other bound a 400.
    `max_decoded_bytes` bounds the RGB frames a whole-video decode returns (F x H x W x 3);
    a decode of the last (or first) n frames holds only those."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_bytes: int = Field(default=200 * MIB, ge=1)
    max_width: int = Field(default=4096, ge=1)
    max_height: int = Field(default=4096, ge=1)
    max_pixels: int = Field(default=4096 * 2304, ge=1)  # 4K UHD and DCI 4K, either orientation
    max_frames: int = Field(default=3600, ge=1)  # a minute at 60 fps
    max_duration_s: float = Field(default=120.0, gt=0)
    max_decoded_bytes: int = Field(default=2 * 2**30, ge=1)


DEFAULT_IMAGE_LIMITS = ImageLimits()
DEFAULT_VIDEO_LIMITS = VideoLimits()

# Pillow's format name -> what a user calls it. Cameras' JPEGs with a second picture (MPO) are
# JPEGs to the user and open with Pillow's JPEG plugin.
IMAGE_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "WEBP": "WebP"}
IMAGE_MEDIA_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}
ACCEPTED_IMAGES = "a PNG, JPEG or WebP image"
VIDEO_DEMUXER = "mov"  # FFmpeg's "mov,mp4,m4a,3gp,3g2,mj2": MP4 and QuickTime MOV


# -- shared checks ----------------------------------------------------------------------------
def _size_text(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n} bytes"


def _limit_text(n: int) -> str:
    return f"{n / MIB:g} MiB" if n % MIB == 0 else f"{n} bytes"


def _check_bytes(n: int, field: str, max_bytes: int) -> None:
    if n > max_bytes:
        raise PayloadTooLarge(f"{field} is {_size_text(n)}; at most {_limit_text(max_bytes)} is accepted",
                              param=field)
    if n == 0:
        raise InvalidSpecError(f"{field} is empty", param=field)


def _check_dims(width: int, height: int, field: str, max_width: int, max_height: int, max_pixels: int,
                what: str = "") -> None:
    """0 pixels, or more than the limits allow: a 400 saying the size and the limits."""
    if width <= 0 or height <= 0:
        raise InvalidSpecError(f"{field} is {width}x{height} pixels{what}; it must have at least one pixel",
                               param=field)
    if width > max_width or height > max_height or width * height > max_pixels:
        raise InvalidSpecError(
            f"{field} is {width}x{height} pixels{what}; at most {max_width}x{max_height} pixels "
            f"and {max_pixels / 1e6:.3g} megapixels are accepted", param=field)


# -- pictures ---------------------------------------------------------------------------------
_OTHER_FORMATS = (  # (magic at offset, what it is): only for a clearer refusal, never parsed
    (0, b"GIF87a", "a GIF image"), (0, b"GIF89a", "a GIF image"), (0, b"BM", "a BMP image"),
    (0, b"II*\x00", "a TIFF image"), (0, b"MM\x00*", "a TIFF image"), (0, b"%PDF", "a PDF document"),
    (0, b"\x00\x00\x01\x00", "an icon file"), (0, b"\xff\x0a", "a JPEG XL image"),
    (4, b"ftypheic", "a HEIC image"), (4, b"ftypheix", "a HEIC image"), (4, b"ftypmif1", "a HEIF image"),
    (4, b"ftypavif", "an AVIF image"), (4, b"ftyp", "a video"),
)


def sniff_image(data: bytes) -> str | None:
    """The Pillow format name ("PNG", "JPEG", "WEBP") by magic bytes, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _what_else(data: bytes) -> str:
    """' (it is a GIF image)' and the like, for the refusal of a format we do not parse."""
    for offset, magic, name in _OTHER_FORMATS:
        if data[offset:offset + len(magic)] == magic:
            return f" (it is {name})"
    head = data[:512].lstrip()
    if head[:5].lower() in (b"<svg ", b"<?xml"):
        return " (it is an SVG or XML document)"
    if not head or any(b < 9 or 13 < b < 32 for b in head):  # control bytes: binary
        return ""
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not just a character cut at byte 512
            return ""
    return " (it is text)"


def _png_size(data: bytes) -> tuple[int, int] | None:
    # signature (8), then the IHDR chunk: length (4) "IHDR" width (4) height (4), big-endian
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the first SOF marker, walking the segments before the scan."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        i += 2
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no SOF before the pixels
            return None
        (length,) = struct.unpack(">H", data[i:i + 2])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
            if i + 7 > len(data):
                return None
            height, width = struct.unpack(">HH", data[i + 3:i + 7])
            return width, height
        i += length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":  # lossy key frame
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:  # lossless: 14-bit sizes minus one
        (bits,) = struct.unpack("<I", data[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:  # extended: the canvas, 24-bit sizes minus one
        return (int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1)
    return None


_HEADER_SIZE = {"PNG": _png_size, "JPEG": _jpeg_size, "WEBP": _webp_size}


def image_header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as the header of a PNG, JPEG or WebP says, without decoding; None when the
    format is not one of those or the header cannot be read here (Pillow then decides)."""
    fmt = sniff_image(data)
    return _HEADER_SIZE[fmt](data) if fmt else None


# Pillow raises these (and little else) for a damaged file: a bad chunk or CRC (SyntaxError), a
# short read (OSError, EOFError, struct.error), a broken deflate stream (zlib.error), an oversized
# text chunk (ValueError). Never MemoryError: the size was checked first.
_DAMAGED = (OSError, SyntaxError, EOFError, ValueError, struct.error, zlib.error, IndexError, TypeError)


def decode_image(data: bytes, field: str, limits: ImageLimits = DEFAULT_IMAGE_LIMITS) -> np.ndarray:
    """A PNG, JPEG or WebP picture -> uint8 (H, W, 3) RGB, upright, transparency on white.
    413 for too many bytes; 400 for anything else wrong, naming `field`."""
    data = bytes(data)
    _check_bytes(len(data), field, limits.max_bytes)
    fmt = sniff_image(data)
    if fmt is None:
        raise InvalidSpecError(f"{field} is not {ACCEPTED_IMAGES}{_what_else(data)}", param=field)
    name = IMAGE_FORMATS[fmt]
    size = _HEADER_SIZE[fmt](data)
    if size is not None:
        _check_dims(*size, field, limits.max_width, limits.max_height, limits.max_pixels)
    img = _open_image(data, fmt, field, name, limits)
    try:
        img.load()  # every pixel, now: a truncated file raises here
    except Image.DecompressionBombError:
        raise _too_many_pixels(field, limits) from None
    except _DAMAGED as e:
        raise InvalidSpecError(f"{field} is a damaged or truncated {name} image: its pixels could not be "
                               f"decoded ({e})", param=field) from None
    return np.array(_to_rgb(_upright(img)), dtype=np.uint8)


def _open_image(data: bytes, fmt: str, field: str, name: str, limits: ImageLimits) -> Image.Image:
    """Image.open restricted to the sniffed format (lazy: the header only), then its size checked."""
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError:
        raise _too_many_pixels(field, limits) from None
    except (Image.UnidentifiedImageError, *_DAMAGED):
        raise InvalidSpecError(f"{field} is a damaged {name} image: its header could not be read",
                               param=field) from None
    if img.format not in IMAGE_FORMATS:  # cannot happen with formats=[fmt]; cheap to be sure
        raise InvalidSpecError(f"{field} is not {ACCEPTED_IMAGES}", param=field)
    _check_dims(*img.size, field, limits.max_width, limits.max_height, limits.max_pixels)
    return img


def _too_many_pixels(field: str, limits: ImageLimits) -> InvalidSpecError:
    return InvalidSpecError(f"{field} has too many pixels; at most {limits.max_width}x{limits.max_height} "
                            f"pixels and {limits.max_pixels / 1e6:.3g} megapixels are accepted", param=field)


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation. An EXIF block Pillow cannot read leaves the picture as stored:
    the pixels are fine, only the camera's note about how it was held is lost. In place: no copy
    of an upright picture."""
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except _DAMAGED:
        pass
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparency (an alpha channel or a PNG transparent colour) composited on white;
    16-bit greyscale scaled to 8 bits (Pillow's convert would clip it)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        grey = (np.asarray(img).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", img.size, (255, 255, 255))
        out.paste(rgba, mask=rgba)
        return out
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_data_url(url: str, field: str, limits: ImageLimits = DEFAULT_IMAGE_LIMITS) -> bytes:
    """The bytes of a `data:image/png;base64,...` URL (image/png, image/jpeg or image/webp).
    Remote URLs are refused (nothing is fetched); 413 when the payload is over `limits.max_bytes`."""
    if not isinstance(url, str):
        raise InvalidSpecError(f"{field} must be a string: a data: URL", param=field)
    if not url[:5].lower() == "data:":
        raise InvalidSpecError(f"{field} must be a data: URL (data:image/png;base64,...); fetching remote "
                               "URLs is not supported", param=field)
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise InvalidSpecError(f"{field} is not a valid data: URL (no comma before the data)", param=field)
    parts = [p.strip().lower() for p in header.split(";")]
    media_type = parts[0]
    if media_type not in IMAGE_MEDIA_TYPES:
        shown = media_type or "none"
        raise InvalidSpecError(f"{field} has media type {shown[:64]}; it must be image/png, image/jpeg "
                               "or image/webp", param=field)
    if parts[-1] != "base64":
        raise InvalidSpecError(f"{field} must be base64-encoded (data:{media_type};base64,...)", param=field)
    if len(payload) > limits.max_bytes * 4 // 3 + 4096:  # before decoding: room for whitespace, padding
        raise PayloadTooLarge(f"{field} is about {_size_text(len(payload) * 3 // 4)}; at most "
                              f"{_limit_text(limits.max_bytes)} is accepted", param=field)
    if "%" in payload:  # a percent-encoded payload ("%2B" for "+")
        from urllib.parse import unquote

        payload = unquote(payload)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSpecError(f"{field} does not hold valid base64 data after 'base64,'", param=field) from None
    _check_bytes(len(data), field, limits.max_bytes)
    return data


# -- preparing a picture for the model --------------------------------------------------------
def orient_size(img: np.ndarray, width: int, height: int) -> tuple[int, int]:
    """The model's (width, height) turned to the picture's orientation, for a request that did
    not fix the size: a portrait picture gets the portrait size (SkyReels-V2's generate_video.py:
    `if image_height > image_width: height, width = width, height`, its defaults being
    landscape), a landscape one the landscape size; a square picture keeps the size given."""
    img_h, img_w = img.shape[:2]
    if img_h != img_w and (img_h > img_w) != (height > width):
        return height, width
    return width, height


def fit_image(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 (H, W, 3) -> exactly (height, width, 3), as SkyReels-V2 prepares an image-to-video
    picture: the largest centred crop with the target's aspect ratio (its `resizecrop`: the full
    width or the full height kept, the crop box rounded as Pillow rounds it), then a LANCZOS
    resize to the target (what its diffusers `VideoProcessor.preprocess` does, `resample="lanczos"`).
    The picture always covers the target: nothing is padded, nothing is stretched."""
    if width < 1 or height < 1:
        raise ValueError(f"target size must be positive, got {width}x{height}")
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"img must be uint8 (H, W, 3), got {img.dtype} {img.shape}")
    img_h, img_w = img.shape[:2]
    if (img_w, img_h) == (width, height):
        return img
    if img_h / img_w > height / width:  # taller than the target: all the width, the middle rows
        crop_w, crop_h = img_w, max(1, int(img_w * height / width))
    else:  # wider (or the same shape): all the height, the middle columns
        crop_w, crop_h = max(1, int(img_h * width / height)), img_h
    box = ((img_w - crop_w) / 2, (img_h - crop_h) / 2, (img_w + crop_w) / 2, (img_h + crop_h) / 2)
    out = Image.fromarray(img).crop(box).resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(out, dtype=np.uint8)


# -- videos -----------------------------------------------------------------------------------
VideoSource = bytes | bytearray | memoryview | str | os.PathLike


class VideoProbe(NamedTuple):
    """A video as its header says, at its displayed size (a rotation applied)."""

    width: int
    height: int
    num_frames: int  # the header's count, or duration x fps where the header has none
    fps: float
    duration_s: float


def _open_video(source: VideoSource, field: str, limits: VideoLimits) -> av.container.InputContainer:
    if isinstance(source, (bytes, bytearray, memoryview)):
        n, fp = len(source), io.BytesIO(source)
    else:
        n, fp = os.path.getsize(source), os.fspath(source)  # a missing file is the server's bug: OSError
    _check_bytes(n, field, limits.max_bytes)
    try:
        return av.open(fp, mode="r", format=VIDEO_DEMUXER)
    except (av.FFmpegError, ValueError, OSError):
        raise InvalidSpecError(f"{field} is not an MP4 or MOV video that can be read (it may be another "
                               "format, damaged or truncated)", param=field) from None


def _video_stream(container: av.container.InputContainer, field: str) -> av.VideoStream:
    if not container.streams.video:
        raise InvalidSpecError(f"{field} has no video stream", param=field)
    stream = container.streams.video[0]
    if stream.codec_context is None:  # PyAV's answer for a codec FFmpeg has no decoder for
        raise InvalidSpecError(f"{field} uses a video codec that cannot be decoded", param=field)
    return stream


def _header(container: av.container.InputContainer, stream: av.VideoStream, field: str,
            limits: VideoLimits) -> VideoProbe:
    """The stored (not yet rotated) size, frame count, rate and duration, checked."""
    cc = stream.codec_context
    width, height = cc.width, cc.height
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / av.time_base
    else:
        duration = 0.0
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else (stream.frames / duration if stream.frames and duration else 0.0)
    frames = stream.frames or (round(duration * fps) if duration and fps else 0)
    _check_dims(width, height, field, limits.max_width, limits.max_height, limits.max_pixels, " per frame")
    if frames > limits.max_frames:
        raise InvalidSpecError(f"{field} has {frames} frames; at most {limits.max_frames} are accepted",
                               param=field)
    if duration > limits.max_duration_s:
        raise InvalidSpecError(f"{field} is {duration:.1f} s long; at most {limits.max_duration_s:g} s is "
                               "accepted", param=field)
    if not fps > 0:
        raise InvalidSpecError(f"{field} has no frame rate", param=field)
    return VideoProbe(width, height, frames, fps, duration)


def _rotation_k(frame: av.VideoFrame) -> int:
    """Quarter turns counterclockwise (np.rot90's k) that show the frame as the display matrix says."""
    return round((frame.rotation or 0) / 90) % 4


def _damaged(field: str, frame_no: int, total: int = 0) -> InvalidSpecError:
    """Frame numbers count in stored (decoding) order, from 1."""
    of = f" of {total}" if total else ""
    return InvalidSpecError(f"{field} is damaged or truncated: frame {frame_no}{of} could not be read",
                            param=field)


def probe_video(source: VideoSource, field: str, limits: VideoLimits = DEFAULT_VIDEO_LIMITS) -> VideoProbe:
    """Width, height (as displayed), frame count, fps and duration from the container header,
    checked against `limits`; the first frame is decoded too (one frame: it tells the display
    rotation and that the picture track decodes at all). Same errors as `decode_video`."""
    with _open_video(source, field, limits) as container:
        stream = _video_stream(container, field)
        info = _header(container, stream, field, limits)
        try:
            first = next(container.decode(stream), None)
        except (av.FFmpegError, ValueError):
            raise _damaged(field, 1) from None
        if first is None:
            raise InvalidSpecError(f"{field} has no frames (it may be truncated)", param=field)
        if _rotation_k(first) % 2:
            info = info._replace(width=info.height, height=info.width)
        return info


def decode_video(source: VideoSource, field: str, limits: VideoLimits = DEFAULT_VIDEO_LIMITS,
                 max_frames: int | None = None, last_n: int | None = None) -> tuple[np.ndarray, float]:
    """An MP4/MOV (bytes or a path) -> (uint8 (F, H, W, 3) RGB frames as displayed, fps).

    `max_frames`: only the first `max_frames` frames (decoding stops there). `last_n`: only the
    last `last_n` frames (a video to extend); every frame is decoded, but only the last n are kept
    (a deque of decoded frames, converted to RGB at the end), so memory is n frames whatever the
    length. Without either, the whole video, at most `limits.max_decoded_bytes` of RGB.
    413 for too many bytes; 400 for no video stream, no frames, over a limit, or damaged/truncated.
    """
    if max_frames is not None and last_n is not None:
        raise ValueError("give max_frames or last_n, not both")
    if (max_frames is not None and max_frames < 1) or (last_n is not None and last_n < 1):
        raise ValueError("max_frames and last_n must be at least 1")
    with _open_video(source, field, limits) as container:
        stream = _video_stream(container, field)
        info = _header(container, stream, field, limits)
        frame_bytes = info.width * info.height * 3
        if max_frames is None and last_n is None:
            _check_decoded_bytes(info.num_frames * frame_bytes, field, limits)
        kept = _demux_decode(container, stream, info, field, limits, max_frames, last_n)
        if not kept:
            raise InvalidSpecError(f"{field} has no frames (it may be truncated)", param=field)
        return _to_rgb_frames(kept), info.fps


def _demux_decode(container: av.container.InputContainer, stream: av.VideoStream, info: VideoProbe,
                  field: str, limits: VideoLimits, max_frames: int | None,
                  last_n: int | None) -> deque[av.VideoFrame]:
    """The decoded frames to return, not yet RGB: all, the first `max_frames` or the last `last_n`.
    A file read to its end is checked against its header's frame count."""
    stream.thread_type = "AUTO"  # frame threads too: a long video to extend is decoded in full
    kept: deque[av.VideoFrame] = deque(maxlen=last_n)
    frame_bytes = info.width * info.height * 3
    packets = decoded = 0
    try:
        for packet in container.demux(stream):
            if packet.is_corrupt:  # a short read at the end of a cut file: part of a frame
                raise _damaged(field, packets + 1, stream.frames)
            packets += 1 if packet.size else 0
            for frame in packet.decode():
                decoded += 1
                if (frame.width, frame.height) != (info.width, info.height):
                    raise InvalidSpecError(
                        f"{field} changes picture size mid-stream ({info.width}x{info.height} to "
                        f"{frame.width}x{frame.height}); this is not supported", param=field)
                if decoded > limits.max_frames:  # the header said fewer
                    raise InvalidSpecError(f"{field} has more than {limits.max_frames} frames; at most "
                                           f"{limits.max_frames} are accepted", param=field)
                if last_n is None:
                    _check_decoded_bytes(decoded * frame_bytes, field, limits)
                kept.append(frame)
                if max_frames is not None and decoded >= max_frames:
                    return kept
    except (av.FFmpegError, ValueError):
        raise _damaged(field, packets, stream.frames) from None
    if stream.frames and packets < stream.frames:  # cut at a packet boundary: the demuxer just stops
        raise InvalidSpecError(f"{field} is truncated: its header lists {stream.frames} frames but the "
                               f"file holds only {packets}", param=field)
    return kept


def _check_decoded_bytes(n: int, field: str, limits: VideoLimits) -> None:
    if n > limits.max_decoded_bytes:
        raise InvalidSpecError(f"{field} is too long at its size to decode whole: {_size_text(n)} of frames; "
                               f"at most {_limit_text(limits.max_decoded_bytes)}", param=field)


def _to_rgb_frames(kept: deque[av.VideoFrame]) -> np.ndarray:
    """The kept frames as one uint8 (F, H, W, 3) array, each frame released once converted,
    turned as the first frame's display matrix says."""
    k = _rotation_k(kept[0])
    first = np.rot90(kept.popleft().to_ndarray(format="rgb24"), k)
    out = np.empty((len(kept) + 1, *first.shape), dtype=np.uint8)
    out[0] = first
    for i in range(1, len(out)):
        out[i] = np.rot90(kept.popleft().to_ndarray(format="rgb24"), k)
    return out


# -- reading back a video to extend (checked when its job was made) ------------------------------
def iter_video_frames(source: VideoSource, field: str = "video", chunk: int = 16) -> Iterator[np.ndarray]:
    """uint8 RGB frames (n, H, W, 3) as displayed, `chunk` at a time: a video re-encoded ahead of
    its extension without holding it whole."""
    try:
        with _open_video(source, field, DEFAULT_VIDEO_LIMITS) as container:
            batch: list[np.ndarray] = []
            for frame in container.decode(_video_stream(container, field)):
                batch.append(np.rot90(frame.to_ndarray(format="rgb24"), _rotation_k(frame)))
                if len(batch) == chunk:
                    yield np.stack(batch)
                    batch = []
            if batch:
                yield np.stack(batch)
    except av.FFmpegError as exc:
        raise InvalidSpecError(f"{field} could not be decoded: {exc}", param=field) from None


def decode_audio_track(source: VideoSource, sample_rate: int) -> np.ndarray | None:
    """The first audio track as float32 mono PCM at `sample_rate`; None when there is none."""
    with _open_video(source, "video", DEFAULT_VIDEO_LIMITS) as container:
        if not container.streams.audio:
            return None
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        parts = [out.to_ndarray().reshape(-1) for frame in container.decode(container.streams.audio[0])
                 for out in resampler.resample(frame)]
        parts += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
