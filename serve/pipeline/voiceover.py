"""Voice-over request checks, done before any model work, and the provider choice they share
with the TTS stage. Light on purpose: no TTS library is imported here (the ingress runs it)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from serve.config import ELEVENLABS_KEY_ENV, TTSConfig
from serve.errors import InvalidSpecError, UnknownVoice, VoiceProviderNotConfigured
from serve.contracts import VoiceoverSpec

# Voice ids (ElevenLabs: 20 alphanumerics; piper: en_US-joe-medium) or display names. The id goes
# into a URL path, so nothing that could change the path: no "/", "?", "#", "%", "..".
_VOICE_RE = re.compile(r"^[A-Za-z0-9_\-. ']{1,100}$")


def piper_voice_id(tts: TTSConfig) -> str:
    """The voice id the piper backend serves, without loading it."""
    voice = tts.piper_voice
    return Path(voice).name.removesuffix(".onnx") if voice.endswith(".onnx") else voice


def elevenlabs_key_present(environ: Mapping[str, str] | None = None) -> bool:
    return bool((environ if environ is not None else os.environ).get(ELEVENLABS_KEY_ENV, "").strip())


def explicit_provider(voiceover: VoiceoverSpec, tts: TTSConfig) -> str | None:
    """The backend that will speak when the request or the config says so without looking at the
    environment: the requested one; else piper when the voice is piper's; else an explicit
    configured default. None when it is "auto" (decided by the TTS replica, which has the key)."""
    if voiceover.provider is not None:
        return voiceover.provider
    if voiceover.voice is not None and voiceover.voice == piper_voice_id(tts) and "piper" in tts.providers:
        return "piper"
    if tts.default_provider != "auto":
        return tts.default_provider
    return None


def resolve_provider(voiceover: VoiceoverSpec, tts: TTSConfig, environ: Mapping[str, str] | None = None) -> str:
    """The backend that will speak: `explicit_provider`, else "auto" = elevenlabs if its key is
    set in `environ` (default: this process' environment), otherwise piper."""
    provider = explicit_provider(voiceover, tts)
    if provider is not None:
        return provider
    if "elevenlabs" in tts.providers and elevenlabs_key_present(environ):
        return "elevenlabs"
    if "piper" in tts.providers:
        return "piper"
    return "elevenlabs" if "elevenlabs" in tts.providers else "none"


def validate_voiceover(voiceover: VoiceoverSpec, tts: TTSConfig, *,
                       known_voices: Mapping[str, Iterable[str] | None] | None = None,
                       available: Iterable[str] | None = None) -> VoiceoverSpec:
    """Check text, provider and voice. `known_voices` (provider -> voice ids and names, e.g. from
    the TTS stage's catalog; None for a provider whose list is unknown) lets an unknown ElevenLabs
    voice be refused here too; piper's voice is always known. `available`: the providers the TTS
    stage can speak with now (elevenlabs only with its key); a voice-over that would go to another
    is refused naming voiceover.provider, and "auto" is resolved as the stage will. Returns the
    spec with `provider` filled in when the configured default is explicit (so "none" skips the
    TTS stage); with "auto" the TTS stage resolves it."""
    text = voiceover.text.strip()
    if not text:
        raise InvalidSpecError("voiceover.text must not be empty", param="voiceover.text")
    if len(voiceover.text) > tts.max_text_chars:
        raise InvalidSpecError(
            f"voiceover.text is {len(voiceover.text)} characters; the limit is {tts.max_text_chars}",
            param="voiceover.text")
    if voiceover.provider is not None and voiceover.provider not in tts.providers:
        raise InvalidSpecError(
            f"voice-over provider {voiceover.provider!r} is not enabled on this server; enabled: {tts.providers}",
            param="voiceover.provider")
    if tts.default_provider != "auto" and voiceover.provider is None and tts.default_provider not in tts.providers:
        raise InvalidSpecError(
            f"the default voice-over provider {tts.default_provider!r} is not enabled; "
            f"choose one of {tts.providers}", param="voiceover.provider")
    provider = explicit_provider(voiceover, tts)
    if available is not None:
        available = set(available)
        # as the TTS stage resolves "auto": elevenlabs when it has the key, else piper
        provider = resolve_provider(voiceover, tts, {ELEVENLABS_KEY_ENV: "-"} if "elevenlabs" in available else {})
        if provider not in available:
            why = f" (no {ELEVENLABS_KEY_ENV} is set for the TTS stage)" if provider == "elevenlabs" else ""
            raise VoiceProviderNotConfigured(
                f"voice-over provider {provider!r} is not configured on this server{why}; "
                f"available: {sorted(available)}", param="voiceover.provider")
    voice = voiceover.voice
    if voice is not None:
        if not _VOICE_RE.match(voice) or ".." in voice or not voice.strip():
            raise UnknownVoice(f"voiceover.voice {voice!r} is not a valid voice id or name", param="voiceover.voice")
        known: set[str] | None = None
        if provider == "piper":
            known = {piper_voice_id(tts)}
        elif known_voices is not None and known_voices.get(provider) is not None:
            known = set(known_voices[provider]) | ({tts.elevenlabs_voice} if provider == "elevenlabs" else set())
            known |= {k.lower() for k in known}
        if known is not None and voice not in known and voice.lower() not in known:
            shown = sorted(known)[:20]
            raise UnknownVoice(f"voice {voice!r} is not a {provider} voice on this server; "
                               f"see GET /v1/voices (e.g. {shown})", param="voiceover.voice")
    if voiceover.provider is None and tts.default_provider != "auto":
        voiceover = voiceover.model_copy(update={"provider": tts.default_provider})
    return voiceover
