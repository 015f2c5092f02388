"""Voice-over through the whole generation graph on Ray Serve (tiny model), with ElevenLabs
played by a fake server on 127.0.0.1 and piper speaking locally.

The TTS replica gets the key the way it does in production: from the environment its process
inherits. So it is set here, at import (collection, before the session's Ray cluster starts), to a
test key: a real key from a developer's shell is never used and never sent anywhere. (Passing it
in a deployment's runtime_env instead would put it in Ray's runtime_env_agent.log — the log scan
below catches exactly that.) Apps in this session that enable elevenlabs with default_provider
"auto" therefore choose elevenlabs; the ones here point it at the fake.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import av
import numpy as np
import pytest

from conftest import tiny_app_args
from fake_elevenlabs import (INVALID_API_KEY, QUOTA_EXCEEDED, SERVER_ERROR, TOO_MANY_REQUESTS, FakeElevenLabs,
                             TEST_API_KEY, voice_not_found)
from serve.errors import TTSError
from media_probe import probe_mp4
from serve.stages import GENERATOR, TTS

APP = "voiceover"
KEY = TEST_API_KEY  # the session cluster's processes have it (conftest: session_cluster_key)
GEORGE = "JBFqnCBsd6RMkjVDRZzb"
SMALL = dict(width=64, height=48, num_frames=9, fps=8, num_inference_steps=2, seed=7)


@pytest.fixture(scope="module")
def fake():
    with FakeElevenLabs(api_key=KEY) as server:
        yield server


@pytest.fixture(scope="module")
def app(ray_cluster, fake):
    from ray import serve

    from client.handle import GeneratorClient
    from serve.app import build_app

    import ray

    assert "ELEVENLABS_API_KEY" not in os.environ  # the cluster's processes have it, not pytest's
    args = tiny_app_args(
        name=APP,
        tts={"providers": ["elevenlabs", "piper", "none"], "elevenlabs_base_url": fake.url,
             "elevenlabs_max_retries": 2, "elevenlabs_retry_backoff_s": 0.05, "elevenlabs_timeout_s": 10.0})
    serve.run(build_app(args), name=APP, route_prefix=None)
    voices = serve.get_deployment_handle(TTS.deployment, app_name=APP).voices.remote().result()
    if not any(v["provider"] == "elevenlabs" for v in voices):
        pytest.fail("the TTS replica has no ELEVENLABS_API_KEY (conftest: session_cluster_key) "
                    f"(cluster at {ray.get_runtime_context().gcs_address})")
    yield GeneratorClient(APP)
    serve.delete(APP)


@pytest.fixture
def clean(fake):
    fake.reset()
    return fake


def decoded_audio(mp4: bytes) -> np.ndarray:
    with av.open(io.BytesIO(mp4)) as container:
        return np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])


def test_voiceover_through_elevenlabs_is_muxed_as_aac(app, clean):
    text = "A fox runs through the snow."
    result = app.generate({"prompt": "a red fox in snow", **SMALL, "voiceover": {"text": text}})

    assert result.has_audio
    assert result.metadata["tts_provider"] == "elevenlabs" and result.metadata["voice"] == GEORGE
    info = probe_mp4(result.mp4)
    [video], [audio] = info["video"], info["audio"]
    assert video["codec"] == "h264" and video["frames"] == SMALL["num_frames"]
    assert audio["codec"] == "aac"
    assert abs(audio["duration_s"] - video["duration_s"]) <= 1 / SMALL["fps"]
    assert abs(video["duration_s"] - result.duration_s) <= 1 / SMALL["fps"]
    pcm = decoded_audio(result.mp4)
    assert np.sqrt(np.mean(pcm ** 2)) > 0.01  # the speech is in there

    [req] = clean.tts_requests()
    assert req.path == f"/v1/text-to-speech/{GEORGE}"
    assert req.headers["xi-api-key"] == KEY
    assert req.query["output_format"] == "pcm_22050"
    assert req.body["text"] == text and req.body["model_id"] == "eleven_multilingual_v2"
    assert clean.problems == []


def test_piper_voiceover(app, clean):
    result = app.generate({"prompt": "a lighthouse", **SMALL,
                           "voiceover": {"text": "Hello.", "provider": "piper"}})
    assert result.has_audio and result.metadata["tts_provider"] == "piper"
    pcm = decoded_audio(result.mp4)
    assert np.sqrt(np.mean(pcm ** 2)) > 0.01
    assert clean.tts_requests() == []


def test_no_voiceover_and_provider_none_have_no_audio(app):
    for spec in ({}, {"voiceover": {"text": "Silent.", "provider": "none"}}):
        result = app.generate({"prompt": "a quiet field", **SMALL, **spec})
        assert not result.has_audio
        assert probe_mp4(result.mp4)["audio"] == []


def test_tts_runs_in_parallel_with_the_video_stages(app, clean):
    clean.fail_next(200, delay_s=1.5)  # a slow (successful) ElevenLabs answer
    result = app.generate({"prompt": "a waterfall", **SMALL, "num_inference_steps": 6,
                           "voiceover": {"text": "The water falls."}})
    tts, encoder, transformer = result.timing("tts"), result.timing("text_encoder"), result.timing("transformer")
    assert tts is not None and transformer is not None
    assert tts.start <= encoder.end  # started with the video work, not after it
    overlap = min(tts.end, transformer.end) - max(tts.start, transformer.start)
    assert overlap > 0, f"tts {tts} and transformer {transformer} do not overlap"


@pytest.mark.parametrize("status, body, headers, code", [
    (401, INVALID_API_KEY, None, "tts_invalid_api_key"),
    (401, QUOTA_EXCEEDED, None, "tts_quota_exceeded"),
    (404, voice_not_found(GEORGE), None, "tts_voice_not_found"),
    (400, voice_not_found(GEORGE), None, "tts_voice_not_found"),
    (422, {"detail": [{"loc": ["body", "text"], "msg": "bad text", "type": "value_error"}]}, None,
     "tts_invalid_request"),
    (429, TOO_MANY_REQUESTS, {"Retry-After": "0"}, "tts_rate_limited"),
    (500, SERVER_ERROR, None, "tts_provider_error"),
    (502, "<html>bad gateway</html>", None, "tts_provider_error"),
])
def test_each_elevenlabs_failure_fails_the_job_with_its_code(app, clean, status, body, headers, code):
    clean.fail_next(status, body, headers=headers, times=5)
    with pytest.raises(TTSError) as info:
        app.generate({"prompt": "a storm", **SMALL, "voiceover": {"text": "Thunder."}})
    err = info.value
    assert err.code == code
    assert err.message.startswith("elevenlabs:")
    assert KEY not in str(err) and KEY not in repr(err.to_dict())
    if code == "tts_rate_limited":
        assert len(clean.tts_requests()) == 3  # 1 + elevenlabs_max_retries


def test_429_is_retried_and_the_job_succeeds(app, clean):
    clean.fail_next(429, TOO_MANY_REQUESTS, headers={"Retry-After": "0"}, times=2)
    result = app.generate({"prompt": "a calm sea", **SMALL, "voiceover": {"text": "Calm."}})
    assert result.has_audio
    assert len(clean.tts_requests()) == 3


def test_a_tts_failure_stops_the_video_work(app, clean):
    clean.fail_next(401, QUOTA_EXCEEDED)
    steps = 40
    seen = []
    with pytest.raises(TTSError) as info:
        for event in app.stream({"prompt": "a long shot", **SMALL, "num_inference_steps": steps,
                                 "voiceover": {"text": "Out of credits."}}):
            if event.type == "step":
                seen.append(event.step)
            assert event.type != "result"
    assert info.value.code == "tts_quota_exceeded"
    assert len(seen) < steps  # the denoising loop was cut short, not run to the end


def test_too_long_voiceover_with_fit_error(app, clean):
    with pytest.raises(TTSError) as info:
        app.generate({"prompt": "a short clip", **SMALL,
                      "voiceover": {"text": "This is far too much to say in one second of video.", "fit": "error"}})
    assert info.value.code == "voiceover_too_long"
    result = app.generate({"prompt": "a short clip", **SMALL,
                           "voiceover": {"text": "This is far too much to say in one second of video."}})
    assert result.has_audio  # the default fit trims


def test_bad_voiceover_is_refused_before_model_work(app, clean):
    from serve.errors import InvalidSpecError

    for voiceover in ({"text": ""}, {"text": "x" * 10_000}, {"text": "hi", "provider": "piper", "voice": "bob"},
                      {"text": "hi", "voice": "../../v1/user"}):
        with pytest.raises(InvalidSpecError) as info:
            app.check({"prompt": "x", **SMALL, "voiceover": voiceover})
        assert info.value.param.startswith("voiceover")
    assert clean.tts_requests() == []


def test_voices_lists_both_backends(app):
    from ray import serve

    voices = serve.get_deployment_handle(GENERATOR.deployment, app_name=APP).voices.remote().result()
    assert {"voice_id": "en_US-joe-medium", "name": "Joe (en_US, medium)", "provider": "piper"} in voices
    assert {"voice_id": GEORGE, "name": "George", "provider": "elevenlabs"} in voices


def test_the_key_is_in_no_log_file(app, clean, caplog):
    """Run a success, a retry and a failure, then read every log Ray wrote in this session."""
    import ray

    caplog.set_level(logging.DEBUG)
    app.generate({"prompt": "logs", **SMALL, "voiceover": {"text": "Logged."}})
    clean.fail_next(429, TOO_MANY_REQUESTS, headers={"Retry-After": "0"})
    app.generate({"prompt": "logs", **SMALL, "voiceover": {"text": "Retried."}})
    clean.fail_next(401, INVALID_API_KEY)
    with pytest.raises(TTSError):
        app.generate({"prompt": "logs", **SMALL, "voiceover": {"text": "Refused."}})

    assert KEY not in caplog.text
    logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())
    files = [p for p in logs_dir.rglob("*") if p.is_file()]
    assert files
    leaked = [str(p) for p in files if KEY.encode() in p.read_bytes()]
    assert leaked == []
    # and the TTS replica did log about the work (so the scan looked at real lines)
    assert any(b"rate limited" in p.read_bytes() for p in files)
