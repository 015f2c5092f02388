"""Voice-over request checks, done before any model work."""

from __future__ import annotations

from serve.config import TTSConfig
from serve.errors import InvalidSpecError
from serve.generation import VoiceoverSpec


def validate_voiceover(voiceover: VoiceoverSpec, tts: TTSConfig) -> VoiceoverSpec:
    text = voiceover.text.strip()
    if not text:
        raise InvalidSpecError("voiceover.text must not be empty", param="voiceover.text")
    if len(voiceover.text) > tts.max_text_chars:
        raise InvalidSpecError(
            f"voiceover.text is {len(voiceover.text)} characters; the limit is {tts.max_text_chars}",
            param="voiceover.text")
    if voiceover.provider is not None and voiceover.provider not in tts.providers:
        raise InvalidSpecError(
            f"unknown voice-over provider {voiceover.provider!r}; enabled: {tts.providers}",
            param="voiceover.provider")
    return voiceover
