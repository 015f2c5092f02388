"""Voice-over through the HTTP API of the deployed app (Ingress -> jobs -> Generator -> TTS), with
ElevenLabs played by the fake server: the video object says it has audio, the MP4 carries AAC,
bad voice-overs are refused in the error envelope before any model work, and a TTS failure fails
the job with its code and message, never with the key."""

from __future__ import annotations

import io
import json
import time

import av
import httpx
import pytest

from fake_elevenlabs import QUOTA_EXCEEDED, TEST_API_KEY, FakeElevenLabs
from media_probe import probe_mp4
from conftest import tiny_app_args
from tests.http_fixtures import SMALL, HttpEnv, http_ingress_args, wait_for_status

APP = "vohttp"
KEY = TEST_API_KEY  # the session cluster's processes have it (conftest: session_cluster_key)


@pytest.fixture(scope="module")
def fake():
    with FakeElevenLabs(api_key=KEY) as server:
        yield server


@pytest.fixture(scope="module")
def env(ray_cluster, session_dir, fake) -> HttpEnv:
    from ray import serve

    from serve.app import build_app

    data_dir = session_dir / "vohttp-data"
    args = tiny_app_args(
        name=APP, with_ingress=True, ingress=http_ingress_args(data_dir),
        deployments={"ingress": SMALL},
        tts={"providers": ["elevenlabs", "piper", "none"], "elevenlabs_base_url": fake.url,
             "elevenlabs_retry_backoff_s": 0.05, "max_text_chars": 500})
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    url = f"{ray_cluster['http_url']}/{APP}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=10).json().get("status") == "healthy":
                break
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    yield HttpEnv(url, data_dir, f"sqlite+aiosqlite:///{data_dir / 'cinevivid.db'}")
    serve.delete(APP)


@pytest.fixture(scope="module")
def h(env) -> dict:
    return env.user().headers


SPEC = {"num_inference_steps": 2, "seed": 3}


def err(r: httpx.Response, status: int, param_prefix: str = "voiceover") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    assert set(e) >= {"code", "message", "param"}
    assert (e["param"] or "").startswith(param_prefix), e
    return e


def test_json_voiceover_yields_a_video_with_audio(env, h, fake):
    fake.reset()
    r = httpx.post(f"{env.url}/v1/videos", headers=h, timeout=30,
                   json={"prompt": "a fox", **SPEC, "voiceover": {"text": "A fox in the snow.", "fit": "trim"}})
    assert r.status_code == 200, r.text
    video = wait_for_status(env.url, h, r.json()["id"], {"completed", "failed"})
    assert video["status"] == "completed", video
    assert video["has_audio"] is True
    mp4 = httpx.get(f"{env.url}/v1/videos/{video['id']}/content", headers=h, timeout=30).content
    info = probe_mp4(mp4)
    [v], [a] = info["video"], info["audio"]
    assert v["codec"] == "h264" and a["codec"] == "aac"
    assert abs(a["duration_s"] - v["duration_s"]) <= 1 / video["fps"]
    [req] = fake.tts_requests()
    assert req.headers["xi-api-key"] == KEY and req.body["text"] == "A fox in the snow."
    assert KEY not in r.text and KEY not in json.dumps(video)


def test_form_voiceover_and_the_original_route(env, h):
    r = httpx.post(f"{env.url}/v1/videos", headers=h, timeout=30,
                   data={"prompt": "a lighthouse", "num_inference_steps": "2",
                         "voiceover[text]": "Hello.", "voiceover[provider]": "piper"})
    assert r.status_code == 200, r.text
    video = wait_for_status(env.url, h, r.json()["id"], {"completed", "failed"})
    assert video["status"] == "completed" and video["has_audio"] is True, video

    r = httpx.post(f"{env.url}/generate/text-to-video", headers=h, timeout=30,
                   json={"prompt": "a boat", **SPEC, "voiceover": {"text": "Ahoy.", "provider": "piper"}})
    assert r.status_code == 202, r.text
    task_id = r.json()["task_id"]
    deadline = time.monotonic() + 120
    while (task := httpx.get(f"{env.url}/tasks/{task_id}", headers=h, timeout=10).json())["status"] not in (
            "completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert task["status"] == "completed" and task["has_audio"] is True, task


def test_no_voiceover_no_audio(env, h):
    r = httpx.post(f"{env.url}/v1/videos", headers=h, timeout=30, json={"prompt": "silence", **SPEC})
    video = wait_for_status(env.url, h, r.json()["id"], {"completed", "failed"})
    assert video["status"] == "completed" and video["has_audio"] is False
    mp4 = httpx.get(f"{env.url}/v1/videos/{video['id']}/content", headers=h, timeout=30).content
    with av.open(io.BytesIO(mp4)) as c:
        assert len(c.streams.audio) == 0


@pytest.mark.parametrize("voiceover, status", [
    ({"text": ""}, 400),
    ({"text": "   "}, 400),
    ({"text": "x" * 501}, 400),  # max_text_chars
    ({"text": "hi", "provider": "espeak"}, 422),  # not a provider at all
    ({"text": "hi", "provider": "piper", "voice": "en_GB-nobody-low"}, 400),
    ({"text": "hi", "voice": "../../v1/user"}, 400),
    ({"text": "hi", "fit": "stretch"}, 422),
    # ElevenLabs' voice list is known (the fake's): a voice not in it is refused at submission
    ({"text": "hi", "provider": "elevenlabs", "voice": "Nobody At All"}, 400),
])
def test_bad_voiceover_is_refused_before_any_work(env, h, fake, voiceover, status):
    fake.reset()
    r = httpx.post(f"{env.url}/v1/videos", headers=h, timeout=30, json={"prompt": "x", **SPEC,
                                                                         "voiceover": voiceover})
    err(r, status)
    r = httpx.post(f"{env.url}/generate/text-to-video", headers=h, timeout=30,
                   json={"prompt": "x", **SPEC, "voiceover": voiceover})
    err(r, status)
    assert fake.tts_requests() == []


def _tts_failures(url: str, provider: str, code: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "cinevivid_tts_failures_total" and s.labels.get("provider") == provider
               and s.labels.get("code") == code)


def test_a_tts_failure_fails_the_job_with_its_code(env, h, fake):
    fake.reset()
    failures_before = _tts_failures(env.url, "elevenlabs", "tts_quota_exceeded")
    fake.fail_next(401, QUOTA_EXCEEDED)
    r = httpx.post(f"{env.url}/v1/videos", headers=h, timeout=30,
                   json={"prompt": "a storm", **SPEC, "voiceover": {"text": "Thunder.", "provider": "elevenlabs"}})
    video = wait_for_status(env.url, h, r.json()["id"], {"completed", "failed"})
    assert video["status"] == "failed", video
    assert video["error"]["code"] == "tts_quota_exceeded"
    assert video["error"]["message"].startswith("elevenlabs:") and "quota" in video["error"]["message"]
    assert video["has_audio"] is False
    assert KEY not in json.dumps(video)
    content = httpx.get(f"{env.url}/v1/videos/{video['id']}/content", headers=h, timeout=30)
    # a failed video has no content (no silent video was stored): the OpenAI answer, 409 not ready
    assert content.status_code == 409, content.text
    assert content.json()["error"]["code"] == "video_not_ready"
    # and /metrics counts it as a voice-over failure of that provider, with that code
    assert _tts_failures(env.url, "elevenlabs", "tts_quota_exceeded") == failures_before + 1


def test_voices_endpoint(env, h):
    r = httpx.get(f"{env.url}/v1/voices", headers=h, timeout=30)
    assert r.status_code == 200, r.text
    voices = r.json()["data"]
    assert {"voice_id": "en_US-joe-medium", "name": "Joe (en_US, medium)", "provider": "piper"} in voices
    assert {"voice_id": "JBFqnCBsd6RMkjVDRZzb", "name": "George", "provider": "elevenlabs"} in voices
    assert KEY not in r.text
