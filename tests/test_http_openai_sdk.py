"""The official `openai` SDK, unchanged, against the deployed app with a CineVivid API key."""

from __future__ import annotations

import io
import warnings

import av
import httpx
import openai
import pytest

from tests.http_fixtures import *  # noqa: F401,F403

pytestmark = pytest.mark.fast  # the fast tier (make test)

warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture
def sdk(http_env, alice) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{http_env.url}/v1", api_key=alice.api_key, max_retries=0, timeout=60)


def _frames(mp4: bytes) -> int:
    with av.open(io.BytesIO(mp4)) as c:
        return sum(1 for _ in c.decode(video=0))


def test_create_and_poll_retrieve_download(sdk):
    video = sdk.videos.create_and_poll(prompt="a red fox running through snow", poll_interval_ms=50)
    assert video.status == "completed", video
    assert video.object == "video" and video.progress == 100
    assert video.model == "cinevivid-tiny" and video.size == "64x64"
    got = sdk.videos.retrieve(video.id)
    assert got.id == video.id and got.status == "completed" and got.completed_at >= got.created_at
    content = sdk.videos.download_content(video.id)
    mp4 = content.read()
    assert mp4[4:8] == b"ftyp"
    assert _frames(mp4) == 9
    thumb = sdk.videos.download_content(video.id, variant="thumbnail").read()
    assert thumb[:2] == b"\xff\xd8"


def test_create_with_seconds_size_and_extensions(sdk):
    video = sdk.videos.create(prompt="waves", seconds="1", size="32x48",
                              extra_body={"seed": 7, "num_inference_steps": 2, "negative_prompt": "blur"})
    assert video.size == "32x48"
    assert video.model_extra["seed"] == 7 and video.model_extra["num_inference_steps"] == 2
    assert video.model_extra["num_frames"] == 9  # 1 s at 8 fps -> 4k+1 frames
    done = sdk.videos.poll(video.id, poll_interval_ms=50)
    assert done.status == "completed"
    mp4 = sdk.videos.download_content(video.id).read()
    with av.open(io.BytesIO(mp4)) as c:
        s = c.streams.video[0]
        assert (s.codec_context.width, s.codec_context.height) == (32, 48)


def test_list_paginates_across_pages(sdk):
    ids = [sdk.videos.create(prompt=f"clip {i}", extra_body={"num_inference_steps": 1}).id for i in range(5)]
    page = sdk.videos.list(limit=2, order="asc")
    assert [v.id for v in page.data] == ids[:2] and page.has_more
    seen = [v.id for v in sdk.videos.list(limit=2, order="asc")]  # auto-pagination across pages
    assert seen == ids
    desc = [v.id for v in sdk.videos.list(limit=3)]
    assert desc == ids[::-1]
    raw = sdk.videos.with_raw_response.list(limit=2, order="asc", after=ids[3]).http_response.json()
    assert [v["id"] for v in raw["data"]] == ids[4:] and raw["has_more"] is False
    assert raw["first_id"] == ids[4] and raw["last_id"] == ids[4]


def test_remix_keeps_settings_and_seed(sdk):
    src = sdk.videos.create_and_poll(prompt="a lighthouse at dusk", extra_body={"seed": 1234, "fps": 12},
                                     poll_interval_ms=50)
    remix = sdk.videos.remix(src.id, prompt="a lighthouse at dawn")
    assert remix.remixed_from_video_id == src.id
    assert remix.prompt == "a lighthouse at dawn"
    assert remix.model_extra["seed"] == 1234 and remix.model_extra["fps"] == 12
    assert remix.size == src.size and remix.seconds == src.seconds
    assert sdk.videos.poll(remix.id, poll_interval_ms=50).status == "completed"


def test_delete_removes_record_and_files(sdk, http_env, alice):
    video = sdk.videos.create_and_poll(prompt="to be deleted", poll_interval_ms=50)
    files = sorted(p.name for p in (http_env.data_dir / "videos").glob(f"{video.id}.*"))
    assert files == [f"{video.id}.jpg", f"{video.id}.mp4"]
    deleted = sdk.videos.delete(video.id)
    assert deleted.deleted and deleted.id == video.id and deleted.object == "video.deleted"
    assert not list((http_env.data_dir / "videos").glob(f"{video.id}*"))
    with pytest.raises(openai.NotFoundError) as exc:
        sdk.videos.retrieve(video.id)
    assert exc.value.body["code"] == "not_found"


def test_sdk_errors_carry_the_envelope(sdk):
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.videos.create(prompt="x", size="4000x4000")
    assert exc.value.body["param"] == "size"
    with pytest.raises(openai.NotFoundError) as exc:
        sdk.videos.create(prompt="x", model="sora-2")
    assert exc.value.body["code"] == "model_not_found"


def test_range_request_on_mp4(sdk, http_env, alice):
    video = sdk.videos.create_and_poll(prompt="range", poll_interval_ms=50)
    full = httpx.get(f"{http_env.url}/v1/videos/{video.id}/content", headers=alice.headers).content
    r = httpx.get(f"{http_env.url}/v1/videos/{video.id}/content", headers={**alice.headers, "Range": "bytes=10-99"})
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes 10-99/{len(full)}"
    assert r.content == full[10:100]
