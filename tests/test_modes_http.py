"""Image-to-video, video extension and several models in one app, over HTTP: `GET /v1/models`, the
official openai SDK's `videos.create(input_reference=...)` and `videos.extend(...)` unchanged, the
CLI's `generate --image` and `extend`, and every bad image or video answered with a 4xx in the
error envelope naming the field, with nothing left on disk."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import av
import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.http_fixtures import *  # noqa: F401,F403

warnings.filterwarnings("ignore", category=DeprecationWarning)


def _err(r: httpx.Response, status: int, param: str | None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"], err
    if code:
        assert err["code"] == code, err
    return err


def _png(w: int = 40, h: int = 24) -> bytes:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.uint8)[:, None, None]
    img = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.full((h, w, 1), 90, np.uint8)], axis=2)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _png_header(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels (its data is not there: nothing decodes that far)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))


def _gif_bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("P", (1, 1)).save(buf, format="GIF")
    data = bytearray(buf.getvalue())
    data[6:10] = struct.pack("<HH", 65535, 65535)  # a logical screen of 4 G pixels
    return bytes(data)


def _audio_only_mp4() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("aac", rate=22050)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 22050
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def _frames(mp4: bytes) -> tuple[int, tuple[int, int], bool]:
    with av.open(io.BytesIO(mp4)) as c:
        s = c.streams.video[0]
        n = sum(1 for _ in c.decode(video=0))
        return n, (s.codec_context.width, s.codec_context.height), bool(c.streams.audio)


def _leftovers(http_env) -> list[str]:
    inputs = http_env.data_dir / "inputs"
    return sorted(str(p.relative_to(inputs)) for p in inputs.rglob("*")) if inputs.exists() else []


@pytest.fixture
def sdk(http_env, alice) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{http_env.url}/v1", api_key=alice.api_key, max_retries=0, timeout=120)


def test_models_lists_each_model_with_its_modes(http_env, alice):
    r = httpx.get(f"{http_env.url}/v1/models", headers=alice.headers, timeout=30)
    assert r.status_code == 200, r.text
    models = {m["id"]: m for m in r.json()["data"]}
    assert models["cinevivid-tiny"]["modes"] == ["text-to-video", "long-video"]
    assert models["cinevivid-tiny"]["default"] and models["cinevivid-tiny"]["aliases"] == ["skyreels-v2-tiny"]
    assert models["cinevivid-tiny-i2v"]["modes"] == ["image-to-video"]
    assert models["cinevivid-tiny-df"]["modes"] == ["text-to-video", "image-to-video", "long-video", "extend"]


def test_sdk_image_to_video_then_extend(sdk, http_env, tmp_path):
    # a landscape picture, an open file as the SDK's docs show: the I2V model, fitted to 48x32 (its default size)
    (tmp_path / "pic.png").write_bytes(_png())
    with open(tmp_path / "pic.png", "rb") as picture:
        video = sdk.videos.create(prompt="the gradient comes alive", input_reference=picture,
                                  model="cinevivid-tiny-i2v", extra_body={"num_inference_steps": 2})
    assert video.model_extra["mode"] == "image-to-video"
    done = sdk.videos.poll(video.id, poll_interval_ms=50)
    assert done.status == "completed", done
    n, size, _ = _frames(sdk.videos.download_content(video.id).read())
    assert (n, size) == (9, (48, 32))

    # a portrait picture as a JSON data URL (the SDK only uploads files), no model named: the
    # first model that does image-to-video, its default size turned portrait
    import base64

    url = "data:image/png;base64," + base64.b64encode(_png(24, 40)).decode()
    r = httpx.post(f"{http_env.url}/v1/videos", headers={"Authorization": f"Bearer {sdk.api_key}"}, timeout=60,
                   json={"prompt": "tall", "input_reference": {"image_url": url}, "num_inference_steps": 1})
    assert r.status_code == 200, r.text
    portrait = sdk.videos.poll(r.json()["id"], poll_interval_ms=50)
    assert portrait.status == "completed" and portrait.model == "cinevivid-tiny-i2v" and portrait.size == "32x48"

    # the DF model starts from the image too, then the SDK extends that video
    first = sdk.videos.create_and_poll(prompt="a slow pan", input_reference=("pic.png", _png(), "image/png"),
                                       model="cinevivid-tiny-df", size="32x32",
                                       extra_body={"num_inference_steps": 2}, poll_interval_ms=50)
    assert first.status == "completed", first
    # by id: openai 3.57's `videos.extend(video={"id": ...})` raises in its own file extraction
    # before sending anything, so the SDK's generic `post` sends that same body
    from openai.types import Video

    longer = sdk.post("/videos/extensions", cast_to=Video,
                      body={"video": {"id": first.id}, "prompt": "the pan goes on", "seconds": "1"})
    assert longer.model_extra["extended_from_video_id"] == first.id
    longer = sdk.videos.poll(longer.id, poll_interval_ms=50)
    assert longer.status == "completed", longer
    mp4 = sdk.videos.download_content(longer.id).read()
    n, size, _ = _frames(mp4)
    assert size == (32, 32) and n == 9 + 8 == longer.model_extra["num_frames"]  # the source, then 1 s at 8 fps
    assert longer.seconds == f"{17 / 8:g}"
    # an uploaded MP4, through `videos.extend` itself: the 17-frame video, then 8 more
    again = sdk.videos.extend(video=("clip.mp4", mp4, "video/mp4"), prompt="further still", seconds="1")
    again = sdk.videos.poll(again.id, poll_interval_ms=50)
    assert again.status == "completed" and again.model_extra["extended_from_video_id"] is None
    assert _frames(sdk.videos.download_content(again.id).read())[0] == 25
    assert _leftovers(http_env) == []  # inputs go once their job ends


def test_cli_generate_image_and_extend(http_env, alice, tmp_path, monkeypatch, capsys):
    from serve.ops.cli import main

    monkeypatch.setenv("CINEVIVID_URL", http_env.url)
    monkeypatch.setenv("CINEVIVID_API_KEY", alice.api_key)
    (tmp_path / "pic.png").write_bytes(_png())
    out = tmp_path / "a.mp4"
    assert main(["generate", "from a picture", "--image", str(tmp_path / "pic.png"), "--model", "cinevivid-tiny-df",
                 "--size", "32x32", "--steps", "1", "-q", "-o", str(out)]) == 0
    vid = capsys.readouterr().out.strip().splitlines()[-1]
    assert _frames(out.read_bytes())[0] == 9
    assert main(["extend", vid, "and onwards", "--seconds", "1", "--steps", "1", "-q",
                 "-o", str(tmp_path / "b.mp4")]) == 0
    assert _frames((tmp_path / "b.mp4").read_bytes())[0] == 17


BAD_IMAGES = {
    "not an image": (b"hello, I am text", 400),
    "truncated": (_png()[:60], 400),
    "0x0": (_png_header(0, 0), 400),
    "20000x20000": (_png_header(20000, 20000), 400),
    "gif bomb": (_gif_bomb(), 400),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_images_are_refused_naming_the_field(http_env, alice, case):
    data, status = BAD_IMAGES[case]
    r = httpx.post(f"{http_env.url}/v1/videos", headers=alice.headers, timeout=30,
                   data={"prompt": "x", "model": "cinevivid-tiny-i2v"},
                   files={"input_reference": ("x.png", data, "image/png")})
    _err(r, status, "input_reference")
    assert _leftovers(http_env) == []


def test_bad_references_and_videos(http_env, alice, bob):
    url, h = http_env.url, alice.headers
    # a model without the mode: 400 naming model; file_id: no files API; last_frame alone
    _err(httpx.post(f"{url}/v1/videos", headers=h, timeout=30, data={"prompt": "x", "model": "cinevivid-tiny"},
                    files={"input_reference": ("p.png", _png(), "image/png")}), 400, "model")
    _err(httpx.post(f"{url}/v1/videos", headers=h, timeout=30,
                    json={"prompt": "x", "input_reference": {"file_id": "file_1"}}), 400, "input_reference")
    _err(httpx.post(f"{url}/v1/videos", headers=h, timeout=30,
                    json={"prompt": "x", "input_reference": {"image_url": "https://example.com/a.png"}}),
         400, "input_reference")
    _err(httpx.post(f"{url}/v1/videos", headers=h, timeout=30, data={"prompt": "x"},
                    files={"last_frame": ("p.png", _png(), "image/png")}), 400, "last_frame")
    # extensions: an MP4 with no video stream, not a video at all, another user's id, one still running
    ext = f"{url}/v1/videos/extensions"
    _err(httpx.post(ext, headers=h, timeout=30, data={"prompt": "x", "seconds": "1"},
                    files={"video": ("a.mp4", _audio_only_mp4(), "video/mp4")}), 400, "video")
    _err(httpx.post(ext, headers=h, timeout=30, data={"prompt": "x", "seconds": "1"},
                    files={"video": ("a.mp4", b"\x00" * 1000, "video/mp4")}), 400, "video")
    theirs = httpx.post(f"{url}/v1/videos", headers=bob.headers, timeout=30,
                        json={"prompt": "bob's", "model": "cinevivid-tiny-df", "num_inference_steps": 1}).json()
    _err(httpx.post(ext, headers=h, timeout=30, json={"prompt": "x", "seconds": "1", "video": {"id": theirs["id"]}}),
         404, "video")
    running = httpx.post(f"{url}/v1/videos", headers=h, timeout=30,
                         json={"prompt": "slow", "model": "cinevivid-tiny-df", "num_inference_steps": 30}).json()
    _err(httpx.post(ext, headers=h, timeout=30, json={"prompt": "x", "seconds": "1", "video": {"id": running["id"]}}),
         409, "video", "video_not_ready")
    httpx.delete(f"{url}/v1/videos/{running['id']}", headers=h, timeout=30)
    _err(httpx.post(ext, headers=h, timeout=30, json={"prompt": "x", "seconds": "1", "video": "nope"}), 404, "video")
    assert _leftovers(http_env) == []


def test_lora_adapters_listed_used_through_the_sdk_and_bad_names_refused(sdk, http_env, alice):
    models = {m["id"]: m for m in httpx.get(f"{http_env.url}/v1/models", headers=alice.headers, timeout=30).json()["data"]}
    assert [a["name"] for a in models["cinevivid-tiny"]["lora_adapters"]] == ["style-a", "style-b"]
    assert models["cinevivid-tiny-i2v"]["lora_adapters"] == []

    video = sdk.videos.create(prompt="a lantern festival", model="cinevivid-tiny",
                              extra_body={"num_inference_steps": 2, "lora": {"name": "style-b", "scale": 0.7}})
    done = sdk.videos.poll(video.id, poll_interval_ms=50)
    assert done.status == "completed", done
    assert _frames(sdk.videos.download_content(video.id).read())[0] == 9

    url, h = f"{http_env.url}/v1/videos", alice.headers
    err = _err(httpx.post(url, headers=h, json={"prompt": "x", "lora": {"name": "no-such-style"}}), 400, "lora")
    assert "style-a" in err["message"]  # it says which adapters there are
    _err(httpx.post(url, headers=h, json={"prompt": "x", "model": "cinevivid-tiny-df", "lora": {"name": "style-a"}}),
         400, "lora")  # the DF model has none
    # a malformed lora object fails the request's schema (422, as every body field does), naming the field
    _err(httpx.post(url, headers=h, json={"prompt": "x", "lora": {"name": "style-a", "scale": 99}}), 422,
         "lora.scale")
    _err(httpx.post(url, headers=h, json={"prompt": "x", "lora": {"scale": 1}}), 422, "lora.name")
    # a multipart form names the adapter in lora[name] / lora[scale] fields, as the SDK sends nested objects
    _err(httpx.post(url, headers=h, data={"prompt": "x", "lora[name]": "nope", "lora[scale]": "0.5"},
                    files={"input_reference": ("p.png", _png(), "image/png")}), 400, "lora")
