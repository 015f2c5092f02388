"""Progressive delivery of a long (diffusion-forcing) video over HTTP: while the job runs, the SSE
stream has a `window` event per finished window, GET /v1/videos/{id} shows the windows done, and
GET /v1/videos/{id}/content?variant=preview is a valid MP4 of the frames so far that grows window by
window; a plain download stays a 409 until the job completes, and the preview is then the video."""

from __future__ import annotations

import json

import httpx

from tests.http_fixtures import *  # noqa: F401,F403
from tests.http_fixtures import local_service, make_local_user, wait_for_status, wait_local
from tests.media_probe import decode_rgb_frames, probe_mp4

# 6 windows of 4 latent frames, each adding 2 (8 frames): 53 frames at 8 fps
DF_JOB = {"prompt": "a long walk along the shore", "size": "64x64", "num_frames": 53, "fps": 8, "seed": 11,
          "num_inference_steps": 8, "base_num_frames": 13, "overlap_history": 5}


def test_preview_of_a_running_long_video_grows_window_by_window(http_env, alice):
    url, h = http_env.url, alice.headers
    r = httpx.post(f"{url}/v1/videos", json=DF_JOB, headers=h)
    assert r.status_code == 200, r.text
    vid = r.json()["id"]
    previews, windows = [], []  # (status, frames decoded) of each preview fetched on a `window` event
    with httpx.Client(base_url=url, headers=h, timeout=60) as c, \
            c.stream("GET", f"/v1/videos/{vid}/events") as events:
        kind = None
        for line in events.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: ") and kind == "window":
                windows.append(json.loads(line[len("data: "):]))
                p = c.get(f"/v1/videos/{vid}/content", params={"variant": "preview"})
                assert p.status_code == 200, p.text
                assert p.headers["content-type"] == "video/mp4"
                status = p.headers.get("x-video-status", "completed")
                if status == "in_progress":
                    assert probe_mp4(p.content)["video"][0]["codec"] == "h264"
                    # (the job goes on meanwhile: these hold while it is still running)
                    view = c.get(f"/v1/videos/{vid}").json()
                    if view["status"] == "in_progress":
                        assert view["windows_total"] == 6 and view["windows_done"] >= windows[-1]["window"] + 1
                    plain = c.get(f"/v1/videos/{vid}/content")
                    if plain.status_code != 200:  # a plain client still gets the OpenAI semantics
                        assert plain.status_code == 409 and plain.json()["error"]["code"] == "video_not_ready"
                previews.append((status, len(decode_rgb_frames(p.content)), int(p.headers.get("x-windows-done", 6))))
            elif line.startswith("data: ") and kind == "status" and json.loads(line[6:]).get("status") == "completed":
                break

    assert [(w["window"], w["num_windows"]) for w in windows] == [(k, 6) for k in range(6)]
    assert [w["playable_s"] for w in windows] == [(13 + 8 * k) / 8 for k in range(6)]
    running = [(frames, done) for status, frames, done in previews if status == "in_progress"]
    assert len(running) >= 2, previews  # watched at least twice while it was still being made
    for frames, done in running:  # each preview holds exactly the windows done when it was read
        assert frames == 13 + 8 * (done - 1)
    assert [f for f, _ in running] == sorted(f for f, _ in running) and running[0][0] < running[-1][0] <= 53

    v = wait_for_status(url, h, vid, {"completed", "failed"})
    # a finished long video reports its windows (all done), its whole length and its mode
    assert v["status"] == "completed" and v["windows_done"] == v["windows_total"] == 6, v
    assert v["mode"] == "long-video" and v["playable_seconds"] == 53 / 8, v
    final = httpx.get(f"{url}/v1/videos/{vid}/content", headers=h).content
    assert httpx.get(f"{url}/v1/videos/{vid}/content", params={"variant": "preview"}, headers=h).content == final
    assert len(decode_rgb_frames(final)) == 53
    # docs/long-video.md's openai SDK example: the preview variant through extra_query
    import openai

    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=alice.api_key, max_retries=0, timeout=60)
    assert sdk.videos.download_content(vid, extra_query={"variant": "preview"}).content == final


def _error(r, status: int, code: str, param: str | None) -> dict:
    """The error envelope {"error": {"code", "message", "param"}} with this status, code and param."""
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    assert set(e) == {"code", "message", "param"} and e["message"], e
    assert (e["code"], e["param"]) == (code, param), e
    return e


# a short (one-window, no diffusion forcing) job kept running long enough to look at it; cancelled
SHORT_RUNNING = {"prompt": "a slow one", "size": "128x128", "num_frames": 33, "num_inference_steps": 100}


async def test_preview_of_a_queued_or_short_job_is_not_ready(http_env, tmp_path):
    """One job at a time: a short job runs (it will never have a preview: one window), the long one
    waits in the queue. Neither has a playable part: 409 video_not_ready, for the preview as for the
    plain download; a variant that does not exist is a 400 naming `variant`; an unknown id a 404."""
    async with local_service(tmp_path, dispatcher={"max_concurrent_jobs": 1}) as (service, c):
        h = await make_local_user(service)
        short = (await c.post("/v1/videos", json=SHORT_RUNNING, headers=h)).json()["id"]
        await wait_local(c, h, short, {"in_progress"})
        r = await c.post("/v1/videos", json=DF_JOB, headers=h)
        assert r.status_code == 200, r.text
        long = r.json()["id"]
        try:
            assert (await c.get(f"/v1/videos/{long}", headers=h)).json()["status"] == "queued"
            for vid, status in ((long, "queued"), (short, "in_progress")):
                e = _error(await c.get(f"/v1/videos/{vid}/content", params={"variant": "preview"}, headers=h),
                           409, "video_not_ready", None)
                assert f"is {status} and has no playable part yet" in e["message"], e
                _error(await c.get(f"/v1/videos/{vid}/content", headers=h), 409, "video_not_ready", None)
                e = _error(await c.get(f"/v1/videos/{vid}/content", params={"variant": "bogus"}, headers=h),
                           400, "invalid_request", "variant")
                assert "'bogus'" in e["message"] and "'preview'" in e["message"], e
            # (nothing above moved the queue: the long job still waits)
            assert (await c.get(f"/v1/videos/{long}", headers=h)).json()["status"] == "queued"
        finally:
            for vid in (long, short):
                await c.post(f"/v1/videos/{vid}/cancel", headers=h)
            await wait_local(c, h, short, {"failed", "completed"})
        # an id that is not one of the caller's videos: 404, whatever the variant
        for variant in ("preview", "bogus"):
            _error(await c.get("/v1/videos/video_nope/content", params={"variant": variant}, headers=h),
                   404, "not_found", "video_id")
