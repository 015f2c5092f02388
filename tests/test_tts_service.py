"""The TTS service (what the TTS deployment runs): provider choice, fitting, voices, errors."""

from __future__ import annotations

import numpy as np
import pytest

from fake_elevenlabs import QUOTA_EXCEEDED, FakeElevenLabs
from serve.media.audio import AAC_FRAME_SAMPLES
from serve.errors import TTSError
from serve.media.tts.service import TTSService

KEY = "sk-test-service-7e3a91c2f0"


@pytest.fixture(scope="module")
def fake():
    with FakeElevenLabs(api_key=KEY, seconds_per_char=0.05) as server:
        yield server


def config(fake, **kw) -> dict:
    return {"elevenlabs_base_url": fake.url, "elevenlabs_retry_backoff_s": 0.01, **kw}


@pytest.fixture
async def with_key(fake):
    fake.reset()
    service = TTSService(config(fake), environ={"ELEVENLABS_API_KEY": KEY})
    yield service
    for backend in service.backends.values():
        await backend.aclose()


async def test_auto_is_elevenlabs_with_a_key_and_piper_without(fake, with_key):
    assert with_key.default_provider() == "elevenlabs"
    audio = await with_key.synthesize({"text": "Hello from the fake."}, 2.0)
    assert (audio.provider, audio.voice) == ("elevenlabs", "JBFqnCBsd6RMkjVDRZzb")
    assert len(fake.tts_requests()) == 1

    without = TTSService(config(fake), environ={})
    assert without.default_provider() == "piper" and "elevenlabs" not in without.backends
    audio = await without.synthesize({"text": "Hello from piper."}, 2.0)
    assert (audio.provider, audio.voice) == ("piper", "en_US-joe-medium")


async def test_fitted_to_the_video_with_timestamps(with_key):
    audio = await with_key.synthesize({"text": "Short."}, 2.0)  # 0.3 s of speech in a 2 s video
    assert audio.sample_rate == 22050 and audio.pcm.dtype == np.float32
    assert len(audio.pcm) % AAC_FRAME_SAMPLES == 0
    assert abs(audio.duration_s - 2.0) <= AAC_FRAME_SAMPLES / 2 / 22050
    assert audio.speech_s == pytest.approx(0.3, abs=0.05) and not audio.trimmed
    assert audio.started_at <= audio.finished_at
    assert not audio.pcm[int(0.5 * 22050):].any()  # padded with silence

    long = await with_key.synthesize({"text": "A much longer line than the video can hold. " * 2}, 1.0)
    assert long.trimmed and long.speech_s > 4.0 and abs(long.duration_s - 1.0) < 0.03


async def test_fit_error_refuses_a_long_voiceover(with_key):
    with pytest.raises(TTSError) as info:
        await with_key.synthesize({"text": "Far too long for one second of video.", "fit": "error"}, 1.0)
    assert info.value.code == "voiceover_too_long"
    assert "elevenlabs" in info.value.message


async def test_per_request_provider_and_voice(with_key):
    audio = await with_key.synthesize({"text": "Piper please.", "provider": "piper"}, 2.0)
    assert audio.provider == "piper"
    audio = await with_key.synthesize({"text": "Rachel please.", "voice": "21m00Tcm4TlvDq8ikWAM"}, 2.0)
    assert (audio.provider, audio.voice) == ("elevenlabs", "21m00Tcm4TlvDq8ikWAM")
    audio = await with_key.synthesize({"text": "Joe please.", "voice": "en_US-joe-medium"}, 2.0)
    assert audio.provider == "piper"


async def test_provider_errors_come_back_typed(fake, with_key):
    fake.fail_next(401, QUOTA_EXCEEDED)
    with pytest.raises(TTSError) as info:
        await with_key.synthesize({"text": "Out of credits."}, 2.0)
    assert info.value.code == "tts_quota_exceeded"
    assert info.value.message.startswith("elevenlabs: HTTP 401 quota_exceeded:")
    assert KEY not in str(info.value)


async def test_elevenlabs_without_a_key(fake):
    service = TTSService(config(fake), environ={})
    with pytest.raises(TTSError) as info:
        await service.synthesize({"text": "Hi.", "provider": "elevenlabs"}, 1.0)
    assert info.value.code == "tts_provider_unavailable"
    assert "ELEVENLABS_API_KEY" in info.value.message


async def test_bad_requests_are_refused_before_synthesis(fake, with_key):
    for voiceover, code in [({"text": "  "}, "tts_invalid_request"),
                            ({"text": "x" * 5000}, "tts_invalid_request"),
                            ({"text": "hi", "provider": "piper", "voice": "nobody"}, "tts_voice_not_found")]:
        with pytest.raises(TTSError) as info:
            await with_key.synthesize(voiceover, 1.0)
        assert info.value.code == code
    assert fake.tts_requests() == []


async def test_voices_of_all_backends(fake, with_key):
    voices = await with_key.voices()
    assert {"voice_id": "en_US-joe-medium", "name": "Joe (en_US, medium)", "provider": "piper"} in voices
    assert {"voice_id": "JBFqnCBsd6RMkjVDRZzb", "name": "George", "provider": "elevenlabs"} in voices
    assert all(set(v) == {"voice_id", "name", "provider"} for v in voices)
    assert with_key.backends["elevenlabs"].known_voice_ids() >= {"JBFqnCBsd6RMkjVDRZzb"}


async def test_voices_when_elevenlabs_is_down(fake):
    service = TTSService(config(fake), environ={"ELEVENLABS_API_KEY": "sk-wrong"})
    try:
        voices = await service.voices()
        assert {"voice_id": "JBFqnCBsd6RMkjVDRZzb", "name": "default", "provider": "elevenlabs"} in voices
        assert any(v["provider"] == "piper" for v in voices)
    finally:
        for backend in service.backends.values():
            await backend.aclose()
