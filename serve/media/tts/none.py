"""The `none` backend: no voice-over (a video without an audio track)."""

from __future__ import annotations

from serve.errors import TTSInvalidRequest
from serve.media.tts.base import Speech, TTSBackend, VoiceInfo


class NoneBackend(TTSBackend):
    name = "none"

    @property
    def default_voice(self) -> str:
        return "none"

    async def synthesize(self, text: str, voice: str | None = None) -> Speech:
        # The Generator does not call the TTS stage for provider "none"; reaching here is a bug.
        raise TTSInvalidRequest("the 'none' TTS backend produces no audio", param="voiceover.provider")

    async def voices(self) -> list[VoiceInfo]:
        return []

    def known_voice_ids(self) -> set[str] | None:
        return set()
