"""User-supplied pictures and videos (serve/media/inputs.py, no Ray): real files made here with
Pillow and PyAV, and hostile ones built byte by byte (a 0x0 PNG, a PNG/JPEG/WebP header claiming
a huge picture, a GIF bomb), each decoded or refused with the right error, field and message."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import GifImagePlugin, Image, ImageFile

from serve.errors import InvalidSpecError, PayloadTooLarge
from serve.media import inputs
from serve.media.inputs import (ImageLimits, VideoLimits, VideoProbe, decode_data_url, decode_image, decode_video,
                                fit_image, image_header_size, orient_size, probe_video)

FIELD = "input_reference"


def _refused(exc_type, fn, *args, param=FIELD, words=(), **kwargs):
    """Call `fn`, assert it raises exactly `exc_type` naming `param`, with each of `words` in the message."""
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    err = info.value
    assert type(err) is exc_type, err
    assert err.param == param, err
    assert err.message.startswith(param), err.message
    for w in words:
        assert w in err.message, err.message
    return err


# -- pictures made here ---------------------------------------------------------------------
def _pattern(w: int = 48, h: int = 32) -> np.ndarray:
    """Four flat quadrants (red, green, blue, white): lossy codecs keep them near exact."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (255, 0, 0)
    img[: h // 2, w // 2:] = (0, 255, 0)
    img[h // 2:, : w // 2] = (0, 0, 255)
    img[h // 2:, w // 2:] = (255, 255, 255)
    return img


def _save(img: Image.Image | np.ndarray, fmt: str, **kw) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (RGB, 8 bit), with one tiny IDAT: never decodable."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + _png_chunk(b"IEND", b""))


@pytest.mark.parametrize("fmt,kw,tol", [("PNG", {}, 0), ("JPEG", {"quality": 95}, 8),
                                        ("WEBP", {"lossless": True}, 0), ("WEBP", {"quality": 90}, 12)])
def test_each_format_decodes_to_its_pixels(fmt, kw, tol):
    src = _pattern()
    data = _save(src, fmt, **kw)
    assert image_header_size(data) == (48, 32)
    out = decode_image(data, FIELD)
    assert out.dtype == np.uint8 and out.shape == (32, 48, 3) and out.flags.writeable
    for rows, cols in [(slice(4, 12), slice(4, 20)), (slice(4, 12), slice(28, 44)),
                       (slice(20, 28), slice(4, 20)), (slice(20, 28), slice(28, 44))]:
        assert np.abs(out[rows, cols].astype(int) - src[rows, cols]).max() <= tol, (fmt, rows, cols)


def test_first_picture_of_an_mpo_apng_or_animated_webp_and_a_cmyk_jpeg():
    red, blue = Image.new("RGB", (16, 8), (255, 0, 0)), Image.new("RGB", (16, 8), (0, 0, 255))
    for fmt in ("MPO", "PNG", "WEBP"):  # a camera's JPEG with a second picture, an APNG, an animated WebP
        data = _save(red, fmt, save_all=True, append_images=[blue], **({"lossless": True} if fmt == "WEBP" else {}))
        assert Image.open(io.BytesIO(data)).n_frames == 2
        out = decode_image(data, FIELD)
        assert out.shape == (8, 16, 3) and np.abs(out.astype(int) - (255, 0, 0)).max() < 8, fmt
    cmyk = _save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95)  # red, in ink
    assert np.abs(decode_image(cmyk, FIELD).astype(int) - (255, 0, 0)).max() < 8


def test_header_sizes_match_pillow_for_the_webp_variants_and_a_progressive_jpeg():
    rgba = Image.new("RGBA", (37, 21), (10, 20, 30, 128))
    for data in (_save(rgba, "WEBP", lossless=True), _save(rgba, "WEBP", quality=80),
                 _save(_pattern(37, 21), "WEBP", quality=80), _save(_pattern(37, 21), "JPEG", progressive=True),
                 _save(rgba.convert("RGB"), "JPEG", exif=Image.Exif())):
        assert image_header_size(data) == Image.open(io.BytesIO(data)).size == (37, 21)


def test_exif_rotated_jpeg_comes_out_upright():
    stored = np.zeros((20, 40, 3), np.uint8)  # landscape as stored: red left half, blue right half
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored left side becomes the top
    out = decode_image(_save(stored, "JPEG", quality=95, exif=exif), FIELD)
    assert out.shape == (40, 20, 3)
    assert np.abs(out[2:16].astype(int) - (255, 0, 0)).max() < 12
    assert np.abs(out[24:38].astype(int) - (0, 0, 255)).max() < 12


def test_transparency_is_composited_on_white():
    rgba = np.zeros((4, 3, 4), np.uint8)
    rgba[:, 0] = (0, 0, 0, 0)  # fully transparent (black hidden beneath): white
    rgba[:, 1] = (0, 200, 0, 255)  # opaque: as is
    rgba[:, 2] = (255, 0, 0, 128)  # half: halfway to white
    out = decode_image(_save(Image.fromarray(rgba, "RGBA"), "PNG"), FIELD)
    assert out.shape == (4, 3, 3)
    assert (out[:, 0] == 255).all()
    assert (out[:, 1] == (0, 200, 0)).all()
    assert np.abs(out[:, 2].astype(int) - (255, 127, 127)).max() <= 1
    # a palette PNG with a transparent index, and greyscale + alpha, take the same path
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((1, 0), 1)
    assert decode_image(_save(pal, "PNG", transparency=0), FIELD).tolist() == [[[255, 255, 255], [10, 20, 30]]]
    la = Image.fromarray(np.array([[[50, 0], [50, 255]]], np.uint8), "LA")
    assert decode_image(_save(la, "PNG"), FIELD).tolist() == [[[255, 255, 255], [50, 50, 50]]]


def test_sixteen_bit_greyscale_png_is_scaled_not_clipped():
    grey = np.array([[0, 0x8000, 0xFFFF]], np.uint16)
    out = decode_image(_save(Image.fromarray(grey), "PNG"), FIELD)
    assert out[0, :, 0].tolist() == [0, 0x80, 0xFF] and (out[..., 0] == out[..., 2]).all()


@pytest.mark.parametrize("data,words", [
    (np.random.default_rng(0).bytes(2000), ["is not a PNG, JPEG or WebP image"]),
    (b"name,age\nfox,3\n" * 20, ["is not a PNG, JPEG or WebP image", "(it is text)"]),
    (b"<svg xmlns='http://www.w3.org/2000/svg'/>", ["(it is an SVG or XML document)"]),
    (_save(_pattern(), "BMP"), ["(it is a BMP image)"]),
    (_save(_pattern(), "TIFF"), ["(it is a TIFF image)"]),
])
def test_not_an_image_is_refused_by_format(data, words):
    _refused(InvalidSpecError, decode_image, data, FIELD, words=words)


def test_empty_and_too_many_bytes():
    _refused(InvalidSpecError, decode_image, b"", FIELD, words=["is empty"])
    err = _refused(PayloadTooLarge, decode_image, _save(_pattern(), "PNG"), FIELD,
                   limits=ImageLimits(max_bytes=100), words=["at most 100 bytes"])
    assert err.status == 413 and InvalidSpecError.status == 400


def _noisy(w: int = 64, h: int = 64) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_image_is_an_error_not_a_grey_picture(fmt):
    data = _save(_noisy(), fmt)
    for keep in (0.5, 0.9):
        _refused(InvalidSpecError, decode_image, data[: int(len(data) * keep)], FIELD,
                 words=["damaged", fmt if fmt != "WEBP" else "WebP"])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_png_data_is_an_error():
    data = bytearray(_save(_noisy(), "PNG"))
    start = data.index(b"IDAT") + 40
    data[start:start + 64] = bytes(64)  # the CRC no longer matches, the deflate stream is broken
    _refused(InvalidSpecError, decode_image, bytes(data), FIELD, words=["damaged"])


def test_zero_by_zero_png_is_refused_by_its_header():
    data = _png_header_only(0, 0)
    assert image_header_size(data) == (0, 0)
    _refused(InvalidSpecError, decode_image, data, FIELD, words=["0x0 pixels", "at least one pixel"])
    _refused(InvalidSpecError, decode_image, _png_header_only(640, 0), FIELD, words=["640x0 pixels"])


def _forbid_decoding(monkeypatch):
    """Any Pillow open or pixel decode from here on fails the test."""
    def boom(*a, **k):
        raise AssertionError("a refused header must not reach Pillow")
    monkeypatch.setattr(Image, "open", boom)
    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)


def _jpeg_header_only(width: int, height: int) -> bytes:
    sof = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    app0 = b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    return (b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", len(app0) + 2) + app0
            + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9")


def _webp_vp8x_header_only(width: int, height: int) -> bytes:
    body = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + \
        (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def test_huge_headers_are_refused_before_decoding(monkeypatch):
    _forbid_decoding(monkeypatch)  # refused from the header bytes alone: Pillow never opens them
    _refused(InvalidSpecError, decode_image, _png_header_only(20000, 20000), FIELD,
             words=["is 20000x20000 pixels", "at most 8192x8192 pixels and 40 megapixels"])
    _refused(InvalidSpecError, decode_image, _png_header_only(7000, 7000), FIELD, words=["7000x7000"])  # 49 MP
    _refused(InvalidSpecError, decode_image, _jpeg_header_only(65000, 65000), FIELD, words=["65000x65000"])
    # WebP: Pillow's decoder would allocate the whole 16000x16000 canvas (1 GB) on open
    _refused(InvalidSpecError, decode_image, _webp_vp8x_header_only(16000, 16000), FIELD, words=["16000x16000"])


def test_gif_bomb_is_refused_by_format_before_any_frame(monkeypatch):
    def boom(self):
        raise AssertionError("a GIF must not be parsed")
    monkeypatch.setattr(GifImagePlugin.GifImageFile, "_open", boom)
    _forbid_decoding(monkeypatch)  # refused by its signature: not even Image.open runs
    # a logical screen of 65535x65535 with a 256-colour table: nothing more is needed to be refused
    huge = b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0xF7, 0, 0) + bytes(768) + b";"
    # and a real one: many frames
    frames = [Image.new("P", (64, 64), i) for i in range(60)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    for data in (huge, buf.getvalue()):
        _refused(InvalidSpecError, decode_image, data, FIELD,
                 words=["is not a PNG, JPEG or WebP image (it is a GIF image)"])


def test_damaged_header_of_an_accepted_format():
    data = bytearray(_save(_pattern(), "PNG"))
    data[29:33] = b"\x00\x00\x00\x00"  # the IHDR CRC
    _refused(InvalidSpecError, decode_image, bytes(data), FIELD, words=["damaged PNG image"])
    _refused(InvalidSpecError, decode_image, b"\xff\xd8\xff\xe0" + bytes(10), FIELD, words=["damaged JPEG image"])


# -- data: URLs -------------------------------------------------------------------------------
def test_data_url_round_trip_and_its_refusals():
    png = _save(_pattern(), "PNG")
    b64 = base64.b64encode(png).decode()
    assert decode_data_url(f"data:image/png;base64,{b64}", "image_url") == png
    wrapped = "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))  # MIME line breaks are fine
    assert decode_data_url(f"DATA:Image/PNG;name=a.png;base64,{wrapped}", "image_url") == png
    assert decode_data_url("data:image/jpeg;base64," + b64.replace("+", "%2B"), "image_url") == png
    _refused(InvalidSpecError, decode_data_url, "https://example.com/a.png", "image_url", param="image_url",
             words=["must be a data: URL", "fetching remote URLs is not supported"])
    _refused(InvalidSpecError, decode_data_url, "data:image/png;base64,iVBORw0KGgo!!!!", "image_url",
             param="image_url", words=["valid base64"])
    _refused(InvalidSpecError, decode_data_url, "data:image/png;base64,iVBORw0KGg", "image_url",
             param="image_url", words=["valid base64"])  # bad padding
    _refused(InvalidSpecError, decode_data_url, f"data:image/gif;base64,{b64}", "image_url", param="image_url",
             words=["media type image/gif", "image/png, image/jpeg or image/webp"])
    _refused(InvalidSpecError, decode_data_url, f"data:text/plain;base64,{b64}", "image_url", param="image_url",
             words=["media type text/plain"])
    _refused(InvalidSpecError, decode_data_url, "data:image/png,%89PNG", "image_url", param="image_url",
             words=["base64-encoded"])
    _refused(InvalidSpecError, decode_data_url, "data:image/png;base64", "image_url", param="image_url",
             words=["not a valid data: URL"])
    _refused(InvalidSpecError, decode_data_url, "data:image/png;base64,", "image_url", param="image_url",
             words=["is empty"])
    _refused(PayloadTooLarge, decode_data_url, "data:image/png;base64," + "A" * 40_000, "image_url",
             limits=ImageLimits(max_bytes=1000), param="image_url", words=["at most 1000 bytes"])
    # and what it returns is then checked as a picture
    gif = base64.b64encode(b"GIF89a" + bytes(20)).decode()
    data = decode_data_url(f"data:image/png;base64,{gif}", "image_url")
    _refused(InvalidSpecError, decode_image, data, "image_url", param="image_url", words=["GIF"])


# -- fitting to the model's size --------------------------------------------------------------
def test_fit_image_landscape_crops_the_sides():
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, :50] = (255, 0, 0)  # cut away: a 1:1 target keeps the middle 100 columns
    img[:, 50:150] = (0, 200, 0)
    img[:, 150:] = (0, 0, 255)
    assert orient_size(img, 96, 64) == (96, 64)
    out = fit_image(img, 64, 64)
    assert out.shape == (64, 64, 3) and (out == (0, 200, 0)).all()
    wide = fit_image(_pattern(48, 32), 96, 48)  # 3:2 into 2:1: the full width, the middle 24 rows, upscaled
    ref = Image.fromarray(_pattern(48, 32)).crop((0, 4, 48, 28)).resize((96, 48), Image.Resampling.LANCZOS)
    assert (wide == np.asarray(ref)).all()


def test_portrait_stays_portrait():
    img = np.zeros((300, 100, 3), np.uint8)
    img[:50] = (255, 0, 0)
    img[50:250] = (0, 200, 0)
    img[250:] = (0, 0, 255)
    width, height = orient_size(img, 64, 32)  # the model's landscape default, turned
    assert (width, height) == (32, 64)
    out = fit_image(img, width, height)
    assert out.shape == (64, 32, 3) and (out == (0, 200, 0)).all()  # the middle 100x200, scaled
    assert orient_size(np.zeros((10, 10, 3), np.uint8), 64, 32) == (64, 32)  # square keeps the default
    assert orient_size(np.zeros((10, 20, 3), np.uint8), 32, 64) == (64, 32)  # landscape turns a portrait size
    same = _pattern()
    assert fit_image(same, 48, 32) is same
    assert fit_image(np.zeros((1, 4000, 3), np.uint8), 16, 16).shape == (16, 16, 3)  # a sliver: one pixel wide crop


# -- videos -----------------------------------------------------------------------------------
FPS = 8


def _mp4(n: int = 10, w: int = 64, h: int = 48, rotation: int | None = None, path=None) -> bytes:
    """Frame i is flat grey 20 * i (H.264 keeps it within a few levels)."""
    target = path if path is not None else io.BytesIO()
    options = {"movflags": "faststart"} if path is not None else {}
    c = av.open(target, mode="w", format="mp4", options=options)
    s = c.add_stream("libx264", rate=FPS)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    s.options = {"preset": "ultrafast"}
    if rotation is not None:
        s.set_display_rotation(rotation)
    for i in range(n):
        frame = np.full((h, w, 3), 20 * i, np.uint8)
        if rotation is not None:
            frame[:8, :8] = 255  # a mark in the stored top-left corner
        for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path.read_bytes() if path is not None else target.getvalue()


def _audio_only_mp4() -> bytes:
    buf = io.BytesIO()
    c = av.open(buf, mode="w", format="mp4")
    s = c.add_stream("aac", rate=22050)
    s.layout = "mono"
    for i in range(8):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 22050, i * 1024, Fraction(1, 22050)
        for p in s.encode(frame):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return buf.getvalue()


def _greys(frames: np.ndarray) -> list[int]:
    return [int(round(float(f.mean()) / 20)) * 20 for f in frames]


def test_decode_video_whole_first_and_last_frames():
    data = _mp4()
    frames, fps = decode_video(data, "video")
    assert frames.dtype == np.uint8 and frames.shape == (10, 48, 64, 3) and fps == FPS
    assert _greys(frames) == [20 * i for i in range(10)]
    assert np.abs(frames.astype(int) - np.arange(10).reshape(10, 1, 1, 1) * 20).max() <= 4
    last, fps = decode_video(data, "video", last_n=3)
    assert last.shape == (3, 48, 64, 3) and _greys(last) == [140, 160, 180] and fps == FPS
    assert (last == frames[-3:]).all()
    assert _greys(decode_video(data, "video", last_n=50)[0]) == _greys(frames)  # fewer than n: all of them
    assert _greys(decode_video(data, "video", max_frames=2)[0]) == [0, 20]
    assert probe_video(data, "video") == VideoProbe(64, 48, 10, 8.0, 1.25)
    with pytest.raises(ValueError):
        decode_video(data, "video", max_frames=2, last_n=2)


def test_decode_video_from_a_path_and_a_display_rotation(tmp_path):
    data = _mp4(n=3, w=64, h=32, rotation=-90, path=tmp_path / "turned.mp4")  # -90: a quarter turn clockwise
    assert probe_video(tmp_path / "turned.mp4", "video")[:2] == (32, 64)
    frames, _ = decode_video(data, "video")
    assert frames.shape == (3, 64, 32, 3)
    assert frames[0, :8, -8:].min() > 200 and frames[0, -8:, :8].max() < 60  # the mark is now top-right


def test_video_with_no_video_stream():
    data = _audio_only_mp4()
    with av.open(io.BytesIO(data)) as c:
        assert len(c.streams.audio) == 1 and not c.streams.video
    _refused(InvalidSpecError, decode_video, data, "video", param="video", words=["video has no video stream"])
    _refused(InvalidSpecError, probe_video, data, "video", param="video", words=["has no video stream"])


@pytest.mark.parametrize("data,words", [
    (np.random.default_rng(0).bytes(5000), ["is not an MP4 or MOV video"]),
    (_save(_pattern(), "PNG"), ["is not an MP4 or MOV video"]),
    (b"", ["is empty"]),
])
def test_not_a_video(data, words):
    _refused(InvalidSpecError, decode_video, data, "video", param="video", words=words)


def test_video_codec_without_a_decoder():
    data = _mp4().replace(b"avc1", b"zzzz")  # the sample entry's codec tag: no FFmpeg decoder knows it
    for fn in (probe_video, decode_video):
        _refused(InvalidSpecError, fn, data, "video", param="video", words=["codec that cannot be decoded"])


def test_truncated_mp4():
    data = _mp4()  # the index (moov) is written last: a cut file has none, or a broken one
    for keep in (0.3, 0.6, 0.9):
        _refused(InvalidSpecError, decode_video, data[: int(len(data) * keep)], "video", param="video",
                 words=["truncated"])
    # a cut into the metadata after the index (udta) loses no frame: every frame is still there
    moov = data.index(b"moov")
    assert data.index(b"udta") > moov
    assert decode_video(data[: data.index(b"udta") + 8], "video")[0].shape[0] == 10


def test_truncated_faststart_mp4(tmp_path):
    data = _mp4(n=12, path=tmp_path / "fast.mp4")  # the index first: a cut loses frames, not the index
    with av.open(io.BytesIO(data)) as c:
        pos, size = max((p.pos, p.size) for p in c.demux(c.streams.video[0]) if p.size)
    # cut inside the last frame's data: the demuxer hands over a short (corrupt) packet
    _refused(InvalidSpecError, decode_video, data[: pos + size // 2], "video", param="video",
             words=["is damaged or truncated: frame 12 of 12 could not be read"])
    # cut exactly where the last frame starts: the demuxer just stops early; the header's count tells
    _refused(InvalidSpecError, decode_video, data[:pos], "video", param="video", last_n=2,
             words=["is truncated: its header lists 12 frames but the file holds only 11"])


def test_video_limits():
    data = _mp4()
    _refused(PayloadTooLarge, decode_video, data, "video", VideoLimits(max_bytes=1000), param="video",
             words=["at most 1000 bytes"])
    _refused(InvalidSpecError, decode_video, data, "video", VideoLimits(max_width=32), param="video",
             words=["64x48 pixels per frame", "at most 32x4096"])
    _refused(InvalidSpecError, probe_video, data, "video", VideoLimits(max_frames=5), param="video",
             words=["has 10 frames; at most 5"])
    _refused(InvalidSpecError, decode_video, data, "video", VideoLimits(max_duration_s=1.0), param="video",
             words=["is 1.2 s long; at most 1 s"])
    _refused(InvalidSpecError, decode_video, data, "video", VideoLimits(max_decoded_bytes=64 * 48 * 3 * 4),
             param="video", words=["too long at its size to decode whole"])
    # the last frames of the same video fit: only they are held
    assert decode_video(data, "video", VideoLimits(max_decoded_bytes=64 * 48 * 3 * 4), last_n=4)[0].shape[0] == 4


def test_defaults():
    assert ImageLimits() == ImageLimits(max_bytes=20 * 2**20, max_width=8192, max_height=8192, max_pixels=40_000_000)
    assert inputs.DEFAULT_VIDEO_LIMITS.max_bytes == 200 * 2**20
    assert ImageLimits().max_pixels < Image.MAX_IMAGE_PIXELS  # Pillow's bomb warning never fires first
