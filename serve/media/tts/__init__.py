"""TTS backends behind one interface (`TTSBackend`): elevenlabs, piper, none; and `TTSService`,
which picks one per request and fits the speech to the video."""

from serve.media.tts.base import Speech, TTSBackend, VoiceInfo

__all__ = ["Speech", "TTSBackend", "VoiceInfo"]
