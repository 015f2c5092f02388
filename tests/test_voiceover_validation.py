"""Voice-over request checks that run before any model work."""

from __future__ import annotations

import pytest

from serve.config import TTSConfig
from serve.errors import InvalidSpecError
from serve.contracts import VoiceoverSpec
from serve.pipeline.voiceover import resolve_provider, validate_voiceover


def check(tts: TTSConfig | None = None, **voiceover):
    return validate_voiceover(VoiceoverSpec(**voiceover), tts or TTSConfig())


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text(text):
    with pytest.raises(InvalidSpecError) as info:
        check(text=text)
    assert info.value.param == "voiceover.text" and info.value.status == 400


def test_text_over_the_limit():
    with pytest.raises(InvalidSpecError) as info:
        check(TTSConfig(max_text_chars=50), text="x" * 51)
    assert info.value.param == "voiceover.text" and "50" in info.value.message
    assert check(TTSConfig(max_text_chars=50), text="x" * 50).text == "x" * 50


def test_provider_not_enabled():
    with pytest.raises(InvalidSpecError) as info:
        check(TTSConfig(providers=["piper", "none"]), text="hi", provider="elevenlabs")
    assert info.value.param == "voiceover.provider"


def test_unknown_piper_voice():
    with pytest.raises(InvalidSpecError) as info:
        check(text="hi", provider="piper", voice="en_GB-alan-low")
    assert info.value.code == "tts_voice_not_found" and info.value.param == "voiceover.voice"
    assert check(text="hi", provider="piper", voice="en_US-joe-medium").voice == "en_US-joe-medium"


@pytest.mark.parametrize("voice", ["../../v1/user", "a/b", "id?x=1", "x" * 101, "%2e%2e"])
def test_voice_that_is_not_an_id(voice):
    with pytest.raises(InvalidSpecError) as info:
        check(text="hi", provider="elevenlabs", voice=voice)
    assert info.value.param == "voiceover.voice"


def test_elevenlabs_voice_checked_when_the_list_is_known():
    known = {"elevenlabs": ["JBFqnCBsd6RMkjVDRZzb", "George"]}
    vo = VoiceoverSpec(text="hi", provider="elevenlabs", voice="Nobody")
    assert validate_voiceover(vo, TTSConfig()) == vo  # unknown list: passed on as asked, the provider decides
    with pytest.raises(InvalidSpecError) as info:
        validate_voiceover(vo, TTSConfig(), known_voices=known)
    assert info.value.code == "tts_voice_not_found"
    ok = VoiceoverSpec(text="hi", provider="elevenlabs", voice="george")
    assert validate_voiceover(ok, TTSConfig(), known_voices=known).voice == "george"


def test_provider_choice():
    tts = TTSConfig()
    vo = VoiceoverSpec(text="hi")
    assert resolve_provider(vo, tts, {"ELEVENLABS_API_KEY": "sk-x"}) == "elevenlabs"
    assert resolve_provider(vo, tts, {}) == "piper"
    assert resolve_provider(VoiceoverSpec(text="hi", voice="en_US-joe-medium"), tts, {"ELEVENLABS_API_KEY": "k"}) \
        == "piper"
    assert resolve_provider(vo, TTSConfig(default_provider="none"), {"ELEVENLABS_API_KEY": "k"}) == "none"
    assert resolve_provider(VoiceoverSpec(text="hi", provider="piper"), tts, {"ELEVENLABS_API_KEY": "k"}) == "piper"


def test_an_explicit_default_is_filled_in():
    assert check(TTSConfig(default_provider="none"), text="hi").provider == "none"
    assert check(TTSConfig(default_provider="piper"), text="hi").provider == "piper"
    assert check(TTSConfig(), text="hi").provider is None  # "auto": the TTS stage decides
