"""The TTS service: the configured backends behind one interface, the provider choice, and
fitting speech to the video. Plain asyncio (no Ray), so it is tested directly; the `TTS`
deployment in deployments/tts.py is a thin wrapper around it."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from serve.media.audio import SpeechAudio, fit_audio
from serve.config import TTSConfig
from serve.errors import InvalidSpecError, TTSError, TTSInvalidRequest, TTSProviderUnavailable
from serve.contracts import VoiceoverSpec
from serve.media.tts.base import TTSBackend, VoiceInfo
from serve.config import ELEVENLABS_KEY_ENV
from serve.pipeline.voiceover import resolve_provider, validate_voiceover

logger = logging.getLogger(__name__)


class TTSService:
    def __init__(self, config: TTSConfig | Mapping[str, Any] | None = None, *,
                 environ: Mapping[str, str] | None = None):
        self.config = config if isinstance(config, TTSConfig) else TTSConfig.model_validate(config or {})
        self._environ = dict(environ if environ is not None else os.environ)
        self.backends: dict[str, TTSBackend] = {}
        cfg = self.config
        if "piper" in cfg.providers:
            from serve.media.tts.piper import PiperBackend

            self.backends["piper"] = PiperBackend(cfg.piper_voice, sample_rate=cfg.sample_rate,
                                                  num_threads=cfg.piper_num_threads)
        key = self._environ.get(ELEVENLABS_KEY_ENV, "").strip()
        if "elevenlabs" in cfg.providers and key:
            from serve.media.tts.elevenlabs import ElevenLabsBackend

            self.backends["elevenlabs"] = ElevenLabsBackend(
                key, base_url=cfg.elevenlabs_base_url, model=cfg.elevenlabs_model, voice=cfg.elevenlabs_voice,
                timeout_s=cfg.elevenlabs_timeout_s, max_retries=cfg.elevenlabs_max_retries,
                retry_backoff_s=cfg.elevenlabs_retry_backoff_s, max_retry_wait_s=cfg.elevenlabs_max_retry_wait_s,
                sample_rate=cfg.sample_rate, output_format=cfg.elevenlabs_output_format)
        if "none" in cfg.providers:
            from serve.media.tts.none import NoneBackend

            self.backends["none"] = NoneBackend()
        logger.info("TTS backends: %s (default %s)", sorted(self.backends), self.default_provider())

    def default_provider(self) -> str:
        return resolve_provider(VoiceoverSpec(text="-"), self.config, self._environ)

    def backend(self, provider: str) -> TTSBackend:
        backend = self.backends.get(provider)
        if backend is not None:
            return backend
        if provider == "elevenlabs" and "elevenlabs" in self.config.providers:
            raise TTSProviderUnavailable(f"elevenlabs: not available on this server: no API key is configured "
                                         f"({ELEVENLABS_KEY_ENV})", param="voiceover.provider")
        raise TTSInvalidRequest(f"voice-over provider {provider!r} is not enabled; enabled: {self.config.providers}",
                                status=400, param="voiceover.provider")

    async def synthesize(self, voiceover: VoiceoverSpec | Mapping[str, Any], duration_s: float,
                         job_id: str = "-") -> SpeechAudio:
        """Speak `voiceover.text` and fit it to a video of `duration_s` seconds."""
        started = time.time()
        vo = voiceover if isinstance(voiceover, VoiceoverSpec) else VoiceoverSpec.model_validate(voiceover)
        try:
            vo = validate_voiceover(vo, self.config)
        except InvalidSpecError as exc:  # report it as this stage's typed error
            code = exc.code if exc.code.startswith("tts_") else "tts_invalid_request"
            raise TTSError(exc.message, code=code, status=exc.status, param=exc.param) from None
        provider = resolve_provider(vo, self.config, self._environ)
        backend = self.backend(provider)
        try:
            speech = await backend.synthesize(vo.text.strip(), vo.voice)
            pcm, speech_s, trimmed = fit_audio(speech.pcm, speech.sample_rate, duration_s, fit=vo.fit,
                                               fade_s=self.config.fade_s, provider=provider)
        except TTSError as exc:
            logger.warning("[job %s] voice-over failed: %s", job_id, exc)
            raise
        finished = time.time()
        logger.info("[job %s] voice-over: %s voice %s, %.2fs of speech fitted to %.2fs%s in %.2fs", job_id,
                    provider, speech.voice, speech_s, duration_s, " (trimmed)" if trimmed else "",
                    finished - started)
        return SpeechAudio(pcm=pcm, sample_rate=speech.sample_rate, provider=provider, voice=speech.voice,
                           speech_s=speech_s, trimmed=trimmed, started_at=started, finished_at=finished)

    async def voices(self) -> list[dict]:
        """Voices of every enabled backend (`none` has none). A backend that cannot list its
        voices right now still shows its configured default voice."""
        out: list[VoiceInfo] = []
        for name, backend in self.backends.items():
            try:
                out.extend(await backend.voices())
            except TTSError as exc:
                logger.warning("voices: %s", exc)
                out.append(VoiceInfo(voice_id=backend.default_voice, name="default", provider=name))
        return [v.model_dump() for v in out]

    async def catalog(self) -> dict[str, list[str] | None]:
        """What the request layer checks a voice-over against at submission: provider -> its voice
        ids and names, for each provider that can speak on this replica (elevenlabs only with its
        key); None for one that cannot list its voices right now (the voice is then not checked)."""
        out: dict[str, list[str] | None] = {}
        for name, backend in self.backends.items():
            try:
                out[name] = sorted({v for info in await backend.voices() for v in (info.voice_id, info.name) if v})
            except TTSError as exc:
                logger.warning("voice catalog: %s", exc)
                out[name] = None
        return out

    async def check_health(self) -> None:
        for backend in self.backends.values():
            await backend.check_health()
