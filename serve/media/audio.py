"""Voice-over audio: the speech the TTS stage returns, and fitting it to the video's length.

Everything here is plain numpy on float32 mono PCM in [-1, 1]; no codecs, no network.
The fitted length is aligned to whole AAC frames (1024 samples) so that what a player decodes
(AAC pads the last frame) and what the container says agree with the video within one frame.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from serve.errors import TTSError, VoiceoverTooLong

AAC_FRAME_SAMPLES = 1024
DEFAULT_FADE_S = 0.05
SILENCE_THRESHOLD = 1e-3  # ~ -60 dBFS: what counts as trailing silence


class SpeechAudio(BaseModel):
    """TTS -> Generator: speech already fitted to the video's duration."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    pcm: np.ndarray  # float32 mono in [-1, 1], fitted (padded/trimmed) to the video
    sample_rate: int
    provider: str
    voice: str
    speech_s: float  # length of the speech before fitting (trailing silence not counted)
    trimmed: bool = False  # the speech was longer than the video and was cut with a fade
    started_at: float  # time.time() when synthesis started
    finished_at: float  # time.time() when the fitted audio was ready

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / self.sample_rate


def pcm16_to_float(data: bytes) -> np.ndarray:
    """Signed 16-bit little-endian mono PCM (ElevenLabs' `pcm_*` formats) -> float32 in [-1, 1]."""
    if len(data) % 2:
        data = data[:-1]
    return (np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0).clip(-1.0, 1.0)


def resample(pcm: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Linear-interpolation resampling; good enough for speech at these rates."""
    if from_rate == to_rate or len(pcm) == 0:
        return pcm.astype(np.float32, copy=False)
    n_out = max(1, int(round(len(pcm) * to_rate / from_rate)))
    t_out = np.arange(n_out, dtype=np.float64) * (from_rate / to_rate)
    return np.interp(t_out, np.arange(len(pcm), dtype=np.float64), pcm).astype(np.float32)


def strip_trailing_silence(pcm: np.ndarray, threshold: float = SILENCE_THRESHOLD) -> np.ndarray:
    loud = np.flatnonzero(np.abs(pcm) > threshold)
    return pcm[: int(loud[-1]) + 1] if loud.size else pcm[:0]


def target_samples(duration_s: float, sample_rate: int, align: int = AAC_FRAME_SAMPLES) -> int:
    """Samples that cover `duration_s`, rounded to the nearest whole AAC frame (at least one)."""
    exact = duration_s * sample_rate
    if align <= 1:
        return max(1, int(round(exact)))
    return max(align, int(round(exact / align)) * align)


def fade_out(pcm: np.ndarray, fade_samples: int) -> np.ndarray:
    out = np.array(pcm, dtype=np.float32, copy=True)
    n = min(fade_samples, len(out))
    if n > 0:
        out[-n:] *= np.linspace(1.0, 0.0, n, dtype=np.float32)
    return out


def fit_audio(pcm: np.ndarray, sample_rate: int, duration_s: float, *,
              fit: Literal["trim", "error"] = "trim", fade_s: float = DEFAULT_FADE_S,
              align: int = AAC_FRAME_SAMPLES, provider: str = "tts") -> tuple[np.ndarray, float, bool]:
    """Fit speech to a video of `duration_s` seconds.

    Trailing silence is dropped first. Shorter speech is padded with silence; longer speech is
    trimmed with a `fade_s` fade-out (fit="trim") or refused with TTSError voiceover_too_long
    (fit="error"). Returns (fitted pcm, speech seconds, trimmed?).
    """
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    speech = strip_trailing_silence(np.clip(np.asarray(pcm, dtype=np.float32).reshape(-1), -1.0, 1.0))
    speech_s = len(speech) / sample_rate
    n = target_samples(duration_s, sample_rate, align)
    if fit == "error" and speech_s > duration_s:
        raise VoiceoverTooLong(
            f"the voice-over ({provider}) lasts {speech_s:.2f}s but the video lasts {duration_s:.2f}s; "
            "shorten the text, lengthen the video, or set voiceover.fit to \"trim\"", param="voiceover.text")
    if len(speech) > n:  # longer than the video (or than its AAC-aligned length: < 1 frame)
        fade = max(1, min(int(round(fade_s * sample_rate)), n // 4 or 1))
        return fade_out(speech[:n], fade), speech_s, True
    out = np.zeros(n, dtype=np.float32)
    out[: len(speech)] = speech
    return out, speech_s, False


def fit_samples(pcm: np.ndarray | None, n: int) -> np.ndarray:
    """Exactly `n` samples: cut, or padded with silence (None: `n` of silence)."""
    pcm = np.zeros(0, np.float32) if pcm is None else np.asarray(pcm, np.float32).reshape(-1)
    return pcm[:n] if len(pcm) >= n else np.concatenate([pcm, np.zeros(n - len(pcm), np.float32)])
