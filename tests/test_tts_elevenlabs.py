"""The ElevenLabs backend through the official SDK against a fake ElevenLabs on 127.0.0.1:
the wire format it sends, every failure mapped to its error code, 429 retries, and the key
never leaking into an error or a log line. No Ray, fast."""

from __future__ import annotations

import logging
import pickle
import socket

import numpy as np
import pytest

from fake_elevenlabs import (INVALID_API_KEY, QUOTA_EXCEEDED, SERVER_ERROR, TOO_MANY_REQUESTS, FakeElevenLabs,
                             voice_not_found)
from serve.errors import TTSError
from serve.media.tts.elevenlabs import ElevenLabsBackend

KEY = "sk-test-5d1c0e7a9b3f4c2e8a6d"
GEORGE = "JBFqnCBsd6RMkjVDRZzb"


@pytest.fixture(scope="module")
def fake():
    with FakeElevenLabs(api_key=KEY) as server:
        yield server


@pytest.fixture
async def backend(fake):
    fake.reset()
    b = ElevenLabsBackend(KEY, base_url=fake.url, model="eleven_multilingual_v2", voice=GEORGE, timeout_s=5.0,
                          max_retries=2, retry_backoff_s=0.01, sample_rate=22050)
    yield b
    await b.aclose()


def assert_no_key(*things) -> None:
    for thing in things:
        assert KEY not in str(thing), f"the API key leaked into {thing!r}"
        assert KEY not in repr(thing)


def error_text(err: TTSError) -> list:
    return [err, err.message, err.to_dict(), pickle.dumps(err), err.args]


async def test_speaks_the_real_wire_format(fake, backend):
    text = "A lighthouse keeper watches the storm roll in."
    speech = await backend.synthesize(text)

    [req] = fake.tts_requests()
    assert req.method == "POST"
    assert req.path == f"/v1/text-to-speech/{GEORGE}"
    assert req.headers["xi-api-key"] == KEY
    assert req.query["output_format"] == "pcm_22050"
    assert req.body["text"] == text
    assert req.body["model_id"] == "eleven_multilingual_v2"
    assert fake.problems == []

    assert speech.sample_rate == 22050 and speech.voice == GEORGE
    assert speech.pcm.dtype == np.float32 and np.abs(speech.pcm).max() <= 1.0
    assert np.sqrt(np.mean(speech.pcm ** 2)) > 0.01  # not silence
    assert len(speech.pcm) / 22050 == pytest.approx(len(text) * fake.seconds_per_char, rel=0.01)


async def test_other_sample_rate_asks_for_that_pcm_format(fake):
    b = ElevenLabsBackend(KEY, base_url=fake.url, sample_rate=44100)
    try:
        fake.reset()
        speech = await b.synthesize("Hello.")
        assert fake.tts_requests()[0].query["output_format"] == "pcm_44100"
        assert speech.sample_rate == 44100
    finally:
        await b.aclose()


async def test_mp3_output_is_decoded(fake):
    b = ElevenLabsBackend(KEY, base_url=fake.url, sample_rate=22050, output_format="mp3_44100_128")
    try:
        fake.reset()
        text = "An mp3 answer, decoded with PyAV."
        speech = await b.synthesize(text)
        assert fake.tts_requests()[0].query["output_format"] == "mp3_44100_128"
        assert speech.sample_rate == 22050  # resampled from 44.1 kHz
        assert np.sqrt(np.mean(speech.pcm ** 2)) > 0.01
        assert len(speech.pcm) / 22050 == pytest.approx(len(text) * fake.seconds_per_char, abs=0.1)
    finally:
        await b.aclose()


async def test_lists_voices_and_accepts_a_voice_name(fake, backend):
    voices = await backend.voices()
    assert {(v.voice_id, v.name, v.provider) for v in voices} >= {(GEORGE, "George", "elevenlabs"),
                                                                  ("21m00Tcm4TlvDq8ikWAM", "Rachel", "elevenlabs")}
    [listing] = [r for r in fake.requests if r.path == "/v1/voices"]
    assert listing.headers["xi-api-key"] == KEY
    assert backend.known_voice_ids() >= {GEORGE, "21m00Tcm4TlvDq8ikWAM"}

    speech = await backend.synthesize("Hi there.", voice="rachel")
    assert speech.voice == "21m00Tcm4TlvDq8ikWAM"
    assert fake.tts_requests()[-1].path == "/v1/text-to-speech/21m00Tcm4TlvDq8ikWAM"


@pytest.mark.parametrize("status, body, code, said", [
    (401, INVALID_API_KEY, "tts_invalid_api_key", "Invalid API key"),
    (401, QUOTA_EXCEEDED, "tts_quota_exceeded", "exceeds your quota"),
    (400, voice_not_found(GEORGE), "tts_voice_not_found", "was not found"),
    (404, voice_not_found(GEORGE), "tts_voice_not_found", "was not found"),
    (422, {"detail": [{"loc": ["body", "text"], "msg": "String should have at most 5000 characters",
                       "type": "string_too_long"}]}, "tts_invalid_request", "at most 5000 characters"),
    (500, SERVER_ERROR, "tts_provider_error", "internal server error"),
    (503, "upstream connect error", "tts_provider_error", "HTTP 503"),
])
async def test_each_failure_has_its_error(fake, backend, status, body, code, said):
    fake.fail_next(status, body)
    with pytest.raises(TTSError) as info:
        await backend.synthesize("Hello.")
    err = info.value
    assert err.code == code
    assert err.message.startswith("elevenlabs: HTTP ")
    assert said in err.message
    assert len(fake.tts_requests()) == 1  # none of these is retried
    assert_no_key(*error_text(err))
    # it crosses process boundaries intact
    again = pickle.loads(pickle.dumps(err))
    assert (again.code, again.message, again.status) == (err.code, err.message, err.status)


async def test_unknown_voice_is_voice_not_found(fake, backend):
    with pytest.raises(TTSError) as info:
        await backend.synthesize("Hello.", voice="NoSuchVoice000000000")
    assert info.value.code == "tts_voice_not_found"
    assert info.value.param == "voiceover.voice"
    assert "NoSuchVoice000000000" in info.value.message


async def test_wrong_key_is_invalid_api_key_and_not_echoed(fake):
    wrong = "sk-wrong-0123456789abcdef"
    b = ElevenLabsBackend(wrong, base_url=fake.url)
    try:
        with pytest.raises(TTSError) as info:
            await b.synthesize("Hello.")
        assert info.value.code == "tts_invalid_api_key"
        for thing in error_text(info.value):
            assert wrong not in str(thing)
        assert wrong not in repr(b)
    finally:
        await b.aclose()


async def test_429_is_retried_then_succeeds(fake, backend):
    fake.fail_next(429, TOO_MANY_REQUESTS, times=2)
    speech = await backend.synthesize("Retry me.")
    assert len(fake.tts_requests()) == 3
    assert np.abs(speech.pcm).max() > 0.01


async def test_429_honours_retry_after(fake, backend):
    fake.fail_next(429, TOO_MANY_REQUESTS, headers={"Retry-After": "1"})
    await backend.synthesize("Wait for it.")
    first, second = fake.tts_requests()
    assert second.at - first.at >= 0.95  # waited what the server asked, not the 10 ms backoff


async def test_429_gives_up_after_bounded_retries(fake, backend):
    fake.fail_next(429, TOO_MANY_REQUESTS, times=10)
    with pytest.raises(TTSError) as info:
        await backend.synthesize("Never.")
    assert info.value.code == "tts_rate_limited"
    assert info.value.status == 429
    assert "too_many_concurrent_requests" in info.value.message
    assert len(fake.tts_requests()) == 3  # 1 + max_retries
    assert_no_key(*error_text(info.value))


async def test_429_with_a_retry_after_too_long_fails_at_once(fake, backend):
    fake.fail_next(429, TOO_MANY_REQUESTS, headers={"Retry-After": "3600"}, times=3)
    with pytest.raises(TTSError) as info:
        await backend.synthesize("Later.")
    assert info.value.code == "tts_rate_limited"
    assert "3600" in info.value.message
    assert len(fake.tts_requests()) == 1


async def test_timeout(fake):
    b = ElevenLabsBackend(KEY, base_url=fake.url, timeout_s=0.3)
    try:
        fake.reset()
        fake.fail_next(200, delay_s=2.0)
        with pytest.raises(TTSError) as info:
            await b.synthesize("Too slow.")
        assert info.value.code == "tts_timeout"
        assert info.value.message.startswith("elevenlabs:")
    finally:
        await b.aclose()


async def test_unreachable_server_is_a_provider_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    b = ElevenLabsBackend(KEY, base_url=f"http://127.0.0.1:{port}", timeout_s=2.0)
    try:
        with pytest.raises(TTSError) as info:
            await b.synthesize("Anyone?")
        assert info.value.code == "tts_provider_error"
        assert "could not reach" in info.value.message
        assert_no_key(*error_text(info.value))
    finally:
        await b.aclose()


async def test_no_log_line_contains_the_key(fake, backend, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, the SDK's and httpx's included
    for name in ("httpx", "httpcore", "elevenlabs", "serve"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        await backend.synthesize("Logged.")
        await backend.voices()
        fake.fail_next(429, TOO_MANY_REQUESTS)
        await backend.synthesize("Retried.")
        fake.fail_next(401, INVALID_API_KEY)
        with pytest.raises(TTSError):
            await backend.synthesize("Refused.")
    finally:
        for name in ("httpx", "httpcore", "elevenlabs", "serve"):
            logging.getLogger(name).setLevel(logging.NOTSET)
    assert caplog.records, "expected some log lines (the retry warning at least)"
    assert any("rate limited" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        assert KEY not in record.getMessage()
        assert KEY not in str(record.args)
    assert KEY not in caplog.text
