"""Voice-over request checks that run before any model work."""

from __future__ import annotations

import pytest

from serve.config import TTSConfig
from serve.errors import InvalidSpecError, UnknownVoice
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


def test_a_provider_the_tts_stage_cannot_speak_with_is_refused():
    """`available`: what the TTS stage can speak with (its catalog); ElevenLabs without a key is not."""
    from serve.errors import VoiceProviderNotConfigured

    available = {"piper": ["en_US-joe-medium"], "none": []}
    with pytest.raises(VoiceProviderNotConfigured) as info:
        validate_voiceover(VoiceoverSpec(text="hi", provider="elevenlabs"), TTSConfig(), available=available)
    assert info.value.param == "voiceover.provider" and info.value.status == 400
    assert "ELEVENLABS_API_KEY" in info.value.message
    with pytest.raises(VoiceProviderNotConfigured):  # the configured default, when it is elevenlabs
        validate_voiceover(VoiceoverSpec(text="hi"), TTSConfig(default_provider="elevenlabs"), available=available)
    # "auto" goes to piper then, as the stage does; its voice is checked as piper's
    assert validate_voiceover(VoiceoverSpec(text="hi"), TTSConfig(), available=available).provider is None
    with pytest.raises(UnknownVoice):
        validate_voiceover(VoiceoverSpec(text="hi", voice="George"), TTSConfig(), available=available,
                           known_voices=available)


def test_auto_with_elevenlabs_available_checks_its_voice_list():
    catalog = {"elevenlabs": ["JBFqnCBsd6RMkjVDRZzb", "George"], "piper": ["en_US-joe-medium"], "none": []}
    ok = VoiceoverSpec(text="hi", voice="George")
    assert validate_voiceover(ok, TTSConfig(), known_voices=catalog, available=catalog) == ok
    with pytest.raises(UnknownVoice) as info:
        validate_voiceover(VoiceoverSpec(text="hi", voice="Nobody"), TTSConfig(), known_voices=catalog,
                           available=catalog)
    assert info.value.param == "voiceover.voice"
    # a provider whose list is unknown right now (None): the voice is passed on
    unknown = {**catalog, "elevenlabs": None}
    assert validate_voiceover(VoiceoverSpec(text="hi", voice="Nobody"), TTSConfig(), known_voices=unknown,
                              available=unknown).voice == "Nobody"


async def test_job_service_checks_the_voiceover_at_submission(tmp_path):
    """JobService.submit refuses, before a job exists, a voice-over the TTS stage's catalog rules
    out; without a catalog (no TTS stage) it passes it on."""
    from serve.errors import VoiceProviderNotConfigured
    from serve.jobs.service import JobService

    class Generator:
        def __init__(self, catalog):
            self.catalog, self.calls = catalog, 0

        async def voice_catalog(self):
            self.calls += 1
            return self.catalog

    gen = Generator({"piper": ["en_US-joe-medium"], "none": []})
    service = JobService({"ingress": {"data_dir": str(tmp_path)}}, gen)
    with pytest.raises(VoiceProviderNotConfigured):
        await service.check_voiceover(VoiceoverSpec(text="hi", provider="elevenlabs"))
    await service.check_voiceover(VoiceoverSpec(text="hi", provider="piper"))
    assert gen.calls == 1  # cached
    await JobService({"ingress": {"data_dir": str(tmp_path)}}, Generator(None)).check_voiceover(
        VoiceoverSpec(text="hi", provider="elevenlabs"))
