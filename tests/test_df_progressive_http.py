"""Progressive delivery of a long (diffusion-forcing) video over HTTP: while the job runs, the SSE
stream has a `window` event per finished window, GET /v1/videos/{id} shows the windows done, and
GET /v1/videos/{id}/content?variant=preview is a valid MP4 of the frames so far that grows window by
window; a plain download stays a 409 until the job completes, and the preview is then the video."""

from __future__ import annotations

import json

import httpx

from tests.http_fixtures import *  # noqa: F401,F403
from tests.http_fixtures import wait_for_status
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
    assert v["status"] == "completed" and v.get("windows_done") is None
    final = httpx.get(f"{url}/v1/videos/{vid}/content", headers=h).content
    assert httpx.get(f"{url}/v1/videos/{vid}/content", params={"variant": "preview"}, headers=h).content == final
    assert len(decode_rgb_frames(final)) == 53
    # the README's openai SDK example: the preview variant through extra_query
    import openai

    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=alice.api_key, max_retries=0, timeout=60)
    assert sdk.videos.download_content(vid, extra_query={"variant": "preview"}).content == final


def test_preview_of_a_queued_or_short_job_is_not_ready(http_env, alice):
    r = httpx.get(f"{http_env.url}/v1/videos/video_nope/content", params={"variant": "preview"},
                  headers=alice.headers)
    assert r.status_code == 404
    r = httpx.get(f"{http_env.url}/v1/videos/video_nope/content", params={"variant": "bogus"}, headers=alice.headers)
    assert r.status_code in (400, 404)
