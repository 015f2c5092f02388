"""The TTS deployment: text -> speech fitted to the video, for the Generator.

Built by the app builder as `TTS.options(**opts).bind(TTSConfig.model_dump(mode="json"))`.
The ElevenLabs key is read from this replica's environment (ELEVENLABS_API_KEY) only.
"""

from __future__ import annotations

import asyncio
import logging

from ray import serve

from serve.contracts import VoiceoverSpec
from serve.media.audio import SpeechAudio
from serve.media.tts.service import TTSService
from serve.runtime.replica import setup_replica_logging
from serve.stages import TTS as TTS_STAGE

logger = logging.getLogger(__name__)

__all__ = ["TTS", "SpeechAudio"]


@serve.deployment(name=TTS_STAGE.deployment)
class TTS:
    def __init__(self, tts_config: dict | None = None, chaos_delay_s: float = 0.0):
        setup_replica_logging()
        self.service = TTSService(tts_config or {})
        self.chaos_delay_s = chaos_delay_s  # chaos testing only: a pause before each synthesis

    async def synthesize(self, voiceover: VoiceoverSpec, duration_s: float, job_id: str = "-") -> SpeechAudio:
        """Speech for `voiceover` ({text, voice, provider, fit}) fitted to `duration_s` seconds.
        Raises TTSError (code says how) on failure. `job_id` only labels the log lines."""
        if self.chaos_delay_s:
            await asyncio.sleep(self.chaos_delay_s)
        return await self.service.synthesize(voiceover, duration_s, job_id)

    async def voices(self) -> list[dict]:
        """[{voice_id, name, provider}] for every enabled backend."""
        return await self.service.voices()

    async def catalog(self) -> dict[str, list[str] | None]:
        """{provider: voice ids and names, or None if unknown} of the providers that can speak."""
        return await self.service.catalog()

    async def check_health(self) -> None:
        await self.service.check_health()
