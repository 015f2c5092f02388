"""Diffusion forcing over HTTP: POST /v1/videos takes the DF fields (JSON and multipart form), a
bad one is a 400 in the error envelope naming it, and a long video comes back whole."""

from __future__ import annotations

import io

import av

from tests.http_fixtures import *  # noqa: F401,F403
from tests.http_fixtures import local_service, make_local_user, wait_local


def _err(r, status, code, param) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    assert (e["code"], e["param"]) == (code, param), e
    return e


def _form(**fields) -> dict:
    """multipart/form-data fields (as the openai SDK sends them)"""
    return {name: (None, value) for name, value in fields.items()}


async def test_bad_df_fields_are_400s_naming_the_field(http_env, tmp_path):
    async with local_service(tmp_path) as (service, c):
        h = await make_local_user(service)
        e = _err(await c.post("/v1/videos", json={"prompt": "x", "causal_block_size": 2}, headers=h),
                 400, "invalid_request", "causal_block_size")
        assert "latent frames" in e["message"]
        _err(await c.post("/v1/videos", files=_form(prompt="x", overlap_history="18"), headers=h),
             400, "invalid_request", "overlap_history")
        _err(await c.post("/v1/videos", json={"prompt": "x", "base_num_frames": 69}, headers=h),
             400, "invalid_request", "base_num_frames")
        _err(await c.post("/v1/videos", json={"prompt": "x", "addnoise_condition": 100}, headers=h),
             400, "invalid_request", "addnoise_condition")
        _err(await c.post("/generate/text-to-video", json={"prompt": "x", "ar_step": -1}, headers=h),
             400, "invalid_request", "ar_step")
        _err(await c.post("/v1/videos", json={"prompt": "x", "ar_step": True}, headers=h),
             422, "validation_error", "ar_step")
        assert (await c.get("/v1/videos", headers=h)).json()["data"] == []  # nothing was queued


async def test_long_video_over_http(http_env, tmp_path):
    async with local_service(tmp_path) as (service, c):
        h = await make_local_user(service)
        r = await c.post("/v1/videos", files=_form(prompt="a long walk", size="32x32", num_frames="29",
                                                   num_inference_steps="2", base_num_frames="13", overlap_history="5",
                                                   ar_step="2", causal_block_size="2"), headers=h)
        assert r.status_code == 200, r.text
        v = await wait_local(c, h, r.json()["id"], {"completed", "failed"})
        assert v["status"] == "completed", v
        assert (v["num_frames"], v["size"]) == (29, "32x32")
        content = await c.get(f"/v1/videos/{v['id']}/content", headers=h)
        assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    # what a player gets: the MP4 decoded with PyAV has the frames, size and rate the API reported
    with av.open(io.BytesIO(content.content)) as mp4:
        (stream,) = mp4.streams.video
        assert not mp4.streams.audio
        decoded = list(mp4.decode(stream))
        assert stream.average_rate == v["fps"]
    assert len(decoded) == v["num_frames"]
    assert {(f.width, f.height) for f in decoded} == {tuple(int(n) for n in v["size"].split("x"))}
    assert abs(float(v["seconds"]) - v["num_frames"] / v["fps"]) < 1e-4  # ("seconds": 6 significant digits)
