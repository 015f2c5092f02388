"""The interface every TTS backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
from pydantic import BaseModel


class VoiceInfo(BaseModel):
    """One voice a backend offers; what `GET /v1/voices` lists."""

    voice_id: str
    name: str
    provider: str


class Speech(BaseModel):
    """Raw speech from a backend, before it is fitted to the video."""

    model_config = {"arbitrary_types_allowed": True}

    pcm: np.ndarray  # float32 mono in [-1, 1]
    sample_rate: int
    voice: str


class TTSBackend(ABC):
    """A speech synthesiser. Implementations raise `serve.errors.TTSError` with a specific code
    and a message naming the backend and what it said; they never put a secret in one."""

    name: str

    @property
    @abstractmethod
    def default_voice(self) -> str: ...

    @abstractmethod
    async def synthesize(self, text: str, voice: str | None = None) -> Speech: ...

    @abstractmethod
    async def voices(self) -> list[VoiceInfo]: ...

    def known_voice_ids(self) -> set[str] | None:
        """Voice ids this backend knows without a network call, or None when it can't tell."""
        return None

    async def check_health(self) -> None:
        """Raise if the backend cannot serve. Must be cheap (no synthesis, no paid calls)."""

    async def aclose(self) -> None:
        """Release connections."""
