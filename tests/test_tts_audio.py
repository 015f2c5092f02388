"""Fitting speech to the video, and muxing it as AAC next to H.264 in one MP4."""

from __future__ import annotations

import numpy as np
import pytest

from serve.media.audio import AAC_FRAME_SAMPLES, fit_audio, pcm16_to_float, resample
from serve.errors import TTSError
from serve.media.mp4 import encode_mp4

from media_probe import probe_mp4

pytestmark = pytest.mark.fast  # the fast tier (make test)

RATE = 22050


def tone(seconds: float, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_short_speech_is_padded_with_silence():
    speech = tone(0.5)
    out, speech_s, trimmed = fit_audio(speech, RATE, 2.0)
    assert not trimmed and speech_s == pytest.approx(0.5, abs=1e-3)
    assert len(out) % AAC_FRAME_SAMPLES == 0
    assert abs(len(out) / RATE - 2.0) <= AAC_FRAME_SAMPLES / 2 / RATE
    assert np.array_equal(out[: len(speech)], speech)
    assert not out[len(speech):].any()


def test_long_speech_is_trimmed_with_a_fade():
    out, speech_s, trimmed = fit_audio(tone(3.0), RATE, 1.0, fade_s=0.05)
    assert trimmed and speech_s == pytest.approx(3.0, abs=1e-3)
    assert abs(len(out) / RATE - 1.0) <= AAC_FRAME_SAMPLES / 2 / RATE
    tail = out[-int(0.01 * RATE):]
    assert np.abs(tail).max() < 0.2 * 0.5  # faded out, not cut mid-wave
    assert np.abs(out[: len(out) // 2]).max() == pytest.approx(0.5, abs=1e-3)  # the rest untouched


def test_long_speech_is_refused_when_asked():
    with pytest.raises(TTSError) as info:
        fit_audio(tone(3.0), RATE, 1.0, fit="error", provider="piper")
    err = info.value
    assert err.code == "voiceover_too_long" and err.status == 422
    assert "piper" in err.message and "3.00s" in err.message and "1.00s" in err.message


def test_trailing_silence_does_not_count():
    speech = np.concatenate([tone(0.9), np.zeros(RATE, np.float32)])  # 0.9 s said, 1 s of silence
    out, speech_s, trimmed = fit_audio(speech, RATE, 1.0, fit="error")
    assert speech_s == pytest.approx(0.9, abs=1e-3) and not trimmed


def test_pcm16_and_resample():
    pcm = pcm16_to_float(np.array([0, 16384, -32768, 32767], dtype="<i2").tobytes())
    assert pcm.tolist() == pytest.approx([0.0, 0.5, -1.0, 32767 / 32768])
    up = resample(tone(1.0), RATE, 44100)
    assert len(up) == 44100


@pytest.mark.parametrize("fps, num_frames, rate", [(8, 9, 22050), (24, 49, 22050), (30, 61, 22050),
                                                   (16, 33, 44100), (12, 13, 24000)])
def test_mp4_has_h264_and_aac_of_the_same_length(fps, num_frames, rate):
    frames = np.random.default_rng(0).integers(0, 255, (num_frames, 32, 48, 3), dtype=np.uint8)
    duration = num_frames / fps
    audio, _, _ = fit_audio(tone(duration * 0.7, rate), rate, duration)
    info = probe_mp4(encode_mp4(frames, fps, audio, rate))
    [video], [aac] = info["video"], info["audio"]
    assert video["codec"] == "h264" and video["frames"] == num_frames
    assert aac["codec"] == "aac" and aac["sample_rate"] == rate
    assert abs(aac["duration_s"] - video["duration_s"]) <= 1 / fps
    assert abs(aac["duration_s"] - duration) <= 1 / fps


def test_encode_mp4_snaps_unfitted_audio_to_the_video():
    frames = np.zeros((25, 32, 32, 3), dtype=np.uint8)
    info = probe_mp4(encode_mp4(frames, 25, tone(3.0), RATE))  # 3 s of audio, 1 s of video
    assert abs(info["audio"][0]["duration_s"] - info["video"][0]["duration_s"]) <= 1 / 25
