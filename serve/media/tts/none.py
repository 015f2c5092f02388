"""The `none` backend: no voice-over (a video without an audio track)."""

from __future__ import annotations

from serve.errors import TTSError
from serve.media.tts.base import Speech, TTSBackend, VoiceInfo


class NoneBackend(TTSBackend):
    name = "none"

    @property
    def default_voice(self) -> str:
        return "none"

    async def synthesize(self, text: str, voice: str | None = None) -> Speech:
        # The Generator does not call the TTS stage for provider "none"; reaching here is a bug.
        raise TTSError("the 'none' TTS backend produces no audio", code="tts_invalid_request", status=422,
                       param="voiceover.provider")

    async def voices(self) -> list[VoiceInfo]:
        return []

    def known_voice_ids(self) -> set[str] | None:
        return set()
