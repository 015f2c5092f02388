"""The `elevenlabs` backend: the official ElevenLabs SDK (async client).

The API key comes only from the environment (ELEVENLABS_API_KEY); it is never logged, never put
in an error, and every provider message is scrubbed of it before it goes anywhere. The SDK does
not retry `text_to_speech.convert`, so 429s are retried here a bounded number of times, honouring
Retry-After (or retry-after-ms), with exponential backoff otherwise.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import logging
import random
import time
from typing import Any

import httpx
import numpy as np

from serve.media.audio import pcm16_to_float, resample
from serve.config import ELEVENLABS_KEY_ENV
from serve.errors import (
    TTSError, TTSInvalidApiKey, TTSInvalidRequest, TTSProviderError, TTSQuotaExceeded, TTSRateLimited, TTSTimeout,
    TTSVoiceNotFound,
)
from serve.media.tts.base import Speech, TTSBackend, VoiceInfo

logger = logging.getLogger(__name__)

PCM_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
VOICES_TTL_S = 300.0


class ElevenLabsBackend(TTSBackend):
    name = "elevenlabs"

    def __init__(self, api_key: str, *, base_url: str = "https://api.elevenlabs.io",
                 model: str = "eleven_multilingual_v2", voice: str = "JBFqnCBsd6RMkjVDRZzb",
                 timeout_s: float = 60.0, max_retries: int = 3, retry_backoff_s: float = 0.5,
                 max_retry_wait_s: float = 20.0, sample_rate: int = 22050, output_format: str | None = None):
        if not api_key:
            raise ValueError(f"elevenlabs needs an API key ({ELEVENLABS_KEY_ENV})")
        from elevenlabs.client import AsyncElevenLabs

        self._key = api_key
        self._model = model
        self._voice = voice
        self._timeout_s = timeout_s
        self._max_retries = max_retries
        self._retry_backoff_s = retry_backoff_s
        self._max_retry_wait_s = max_retry_wait_s
        self._sample_rate = sample_rate
        self._output_format = output_format or (
            f"pcm_{sample_rate}" if sample_rate in PCM_RATES else "pcm_22050")
        self._http = httpx.AsyncClient(timeout=timeout_s, follow_redirects=True)
        self._client = AsyncElevenLabs(api_key=api_key, base_url=base_url.rstrip("/"), timeout=timeout_s,
                                       httpx_client=self._http)
        self._voices: list[VoiceInfo] | None = None
        self._voices_at = 0.0
        self.base_url = base_url

    def __repr__(self) -> str:  # never the key
        return f"ElevenLabsBackend(base_url={self.base_url!r}, model={self._model!r}, voice={self._voice!r})"

    @property
    def default_voice(self) -> str:
        return self._voice

    def known_voice_ids(self) -> set[str] | None:
        if self._voices is None:
            return None
        return {v.voice_id for v in self._voices} | {self._voice}

    # -- synthesis ---------------------------------------------------------------------------

    async def synthesize(self, text: str, voice: str | None = None) -> Speech:
        voice_id = self._resolve_voice(voice or self._voice)
        attempt = 0
        while True:
            try:
                data = await self._convert_once(voice_id, text)
                break
            except TTSError as exc:
                wait = exc.retry_after_s
                if not isinstance(exc, TTSRateLimited) or attempt >= self._max_retries:
                    if isinstance(exc, TTSRateLimited) and attempt:
                        exc.message = f"{exc.message} (gave up after {attempt + 1} attempts)"
                        exc.args = (exc.message,)
                    raise
                delay = wait if wait is not None else self._backoff(attempt)
                if delay > self._max_retry_wait_s:
                    exc.message = (f"{exc.message} (asked to retry after {delay:.0f}s, more than the "
                                   f"{self._max_retry_wait_s:.0f}s this server waits)")
                    exc.args = (exc.message,)
                    raise
                attempt += 1
                logger.warning("elevenlabs: rate limited (429) for voice %s; retry %d/%d in %.2fs",
                               voice_id, attempt, self._max_retries, delay)
                await asyncio.sleep(delay)
        pcm, rate = self._decode(data)
        if pcm.size == 0:
            raise TTSProviderError(f"elevenlabs: returned no audio for voice {voice_id!r}")
        return Speech(pcm=resample(pcm, rate, self._sample_rate), sample_rate=self._sample_rate, voice=voice_id)

    async def _convert_once(self, voice_id: str, text: str) -> bytes:
        from elevenlabs.core.api_error import ApiError

        try:
            async with asyncio.timeout(self._timeout_s):
                chunks = [chunk async for chunk in self._client.text_to_speech.convert(
                    voice_id, text=text, model_id=self._model, output_format=self._output_format,
                    request_options={"max_retries": 0})]
            return b"".join(chunks)
        except ApiError as exc:
            raise self._map_api_error(exc, voice_id) from None
        except (TimeoutError, httpx.TimeoutException):
            raise TTSTimeout(f"elevenlabs: no answer within {self._timeout_s:g}s (timeout)") from None
        except httpx.HTTPError as exc:
            raise TTSProviderError(f"elevenlabs: could not reach {self.base_url}: {type(exc).__name__}: "
                                   f"{self._scrub(str(exc))}") from None

    def _decode(self, data: bytes) -> tuple[np.ndarray, int]:
        fmt = self._output_format
        if fmt.startswith("pcm_"):
            return pcm16_to_float(data), int(fmt.split("_")[1])
        return _decode_with_pyav(data)

    def _backoff(self, attempt: int) -> float:
        return self._retry_backoff_s * (2 ** attempt) * (1 + 0.1 * random.random())

    # -- voices ------------------------------------------------------------------------------

    async def voices(self) -> list[VoiceInfo]:
        if self._voices is not None and time.monotonic() - self._voices_at < VOICES_TTL_S:
            return list(self._voices)
        from elevenlabs.core.api_error import ApiError

        try:
            async with asyncio.timeout(self._timeout_s):
                response = await self._client.voices.get_all(
                    request_options={"max_retries": self._max_retries})
        except ApiError as exc:
            raise self._map_api_error(exc, None) from None
        except (TimeoutError, httpx.TimeoutException):
            raise TTSTimeout(f"elevenlabs: listing voices took longer than {self._timeout_s:g}s (timeout)") from None
        except httpx.HTTPError as exc:
            raise TTSProviderError(f"elevenlabs: could not reach {self.base_url}: {type(exc).__name__}") from None
        self._voices = [VoiceInfo(voice_id=v.voice_id, name=v.name or v.voice_id, provider=self.name)
                        for v in response.voices]
        self._voices_at = time.monotonic()
        return list(self._voices)

    def _resolve_voice(self, voice: str) -> str:
        """A voice id, or a voice name when the voice list is cached (case-insensitive)."""
        if self._voices:
            if any(v.voice_id == voice for v in self._voices):
                return voice
            by_name = [v.voice_id for v in self._voices if v.name.lower() == voice.lower()]
            if len(by_name) == 1:
                return by_name[0]
        return voice

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- errors ------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "[REDACTED]") if self._key else text

    def _map_api_error(self, exc: Any, voice_id: str | None) -> TTSError:
        status = int(exc.status_code or 0)
        detail_status, detail_message = _detail(exc.body)
        said = self._scrub(detail_message or f"HTTP {status}")
        what = f"elevenlabs: HTTP {status}" + (f" {detail_status}" if detail_status else "") + f": {said}"
        headers = {k.lower(): v for k, v in (exc.headers or {}).items()}
        ds = (detail_status or "").lower()
        if status == 401 and "quota" in ds:
            return TTSQuotaExceeded(what)
        if status in (401, 403):
            return TTSInvalidApiKey(what)
        if status == 404 or (status == 400 and "voice" in ds):
            return TTSVoiceNotFound(f"{what} (voice {voice_id!r})" if voice_id else what, param="voiceover.voice")
        if status == 402 or "quota" in ds:
            return TTSQuotaExceeded(what)
        if status in (400, 422):
            return TTSInvalidRequest(what, param="voiceover")
        if status == 429:
            return TTSRateLimited(what, retry_after_s=_retry_after(headers))
        return TTSProviderError(what)


def _detail(body: Any) -> tuple[str | None, str | None]:
    """(status, message) from an ElevenLabs error body: {"detail": {"status", "message"}},
    {"detail": [{"msg", "loc"}]} (validation), {"detail": "..."} or plain text."""
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, dict):
        status = detail.get("status") or detail.get("code") or detail.get("type")
        message = detail.get("message") or detail.get("msg")
        return (str(status) if status else None), (str(message) if message else None)
    if isinstance(detail, list):
        msgs = []
        for item in detail[:5]:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                msgs.append(f"{loc}: {item.get('msg')}" if loc else str(item.get("msg")))
            else:
                msgs.append(str(item))
        return "validation_error", "; ".join(msgs)
    if isinstance(detail, str) and detail.strip():
        return None, detail.strip()[:500]
    return None, None


def _retry_after(headers: dict[str, str]) -> float | None:
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        if parsed is None:
            return None
        return max(0.0, parsed.timestamp() - time.time())


def _decode_with_pyav(data: bytes) -> tuple[np.ndarray, int]:
    """Decode mp3 (or any container PyAV reads) to float32 mono."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=stream.codec_context.sample_rate)
            pieces = []
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    pieces.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                pieces.append(out.to_ndarray().reshape(-1))
            rate = stream.codec_context.sample_rate
    except Exception as exc:
        raise TTSProviderError(f"elevenlabs: could not decode the audio it returned: {type(exc).__name__}") from None
    pcm = np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)
    return pcm, rate
