"""A fake ElevenLabs API on 127.0.0.1 that speaks the real wire format and checks what it gets.

    POST /v1/text-to-speech/{voice_id}?output_format=pcm_22050   xi-api-key: ...
         {"text": "...", "model_id": "..."}   -> streamed 16-bit LE mono PCM (or 4xx/5xx JSON)
    GET  /v1/voices                                               -> {"voices": [{voice_id, name, ...}]}

Errors look like ElevenLabs' own: {"detail": {"status": "...", "message": "..."}}, and 422 is a
FastAPI-style validation list. Tests program failures with `fail_next(...)` and read what was
received in `requests`. The "speech" is a deterministic voiced signal whose length grows with
the text (`seconds_per_char`).

    with FakeElevenLabs(api_key="sk-test") as fake:
        fake.url            # http://127.0.0.1:<free port>
        fake.fail_next(429, headers={"Retry-After": "1"}, times=2)
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

# The one key the test session uses for ELEVENLABS_API_KEY (tests never use a real one).
TEST_API_KEY = "sk-test-cinevivid-3b9e1f04c6d2a8e75f10"


def session_cluster_key() -> dict[str, str]:
    """The environment the session cluster is started with (tests/conftest.py), as a node's
    environment gives the key in production: every process of that cluster has TEST_API_KEY, and
    the apps that use ElevenLabs point `tts.elevenlabs_base_url` at a FakeElevenLabs. The pytest
    process itself keeps no key, so no stack it starts in a subprocess (`cinevivid up`) has one.
    (Not Ray's per-deployment runtime_env: Ray's runtime_env agent writes its env_vars to its log.)"""
    return {"ELEVENLABS_API_KEY": TEST_API_KEY}


PCM_RATES = {8000, 16000, 22050, 24000, 44100, 48000}
KNOWN_MODELS = {"eleven_multilingual_v2", "eleven_flash_v2_5", "eleven_turbo_v2_5", "eleven_v3"}
DEFAULT_VOICES = [
    {"voice_id": "JBFqnCBsd6RMkjVDRZzb", "name": "George"},
    {"voice_id": "21m00Tcm4TlvDq8ikWAM", "name": "Rachel"},
    {"voice_id": "EXAVITQu4vr4xnSDxMaL", "name": "Sarah"},
]

# Canned error bodies, as the real API sends them.
INVALID_API_KEY = {"detail": {"status": "invalid_api_key", "message": "Invalid API key"}}
QUOTA_EXCEEDED = {"detail": {"status": "quota_exceeded",
                             "message": "This request exceeds your quota of 10000. You have 12 credits "
                                        "remaining, while 240 credits are required for this request."}}
TOO_MANY_REQUESTS = {"detail": {"status": "too_many_concurrent_requests",
                                "message": "Too many concurrent requests for your subscription."}}
SERVER_ERROR = {"detail": {"status": "internal_error", "message": "An internal server error occurred."}}


def voice_not_found(voice_id: str) -> dict:
    return {"detail": {"status": "voice_not_found",
                       "message": f"A voice with the voice_id {voice_id} was not found."}}


@dataclass
class ReceivedRequest:
    method: str
    path: str
    voice_id: str | None
    headers: dict[str, str]
    query: dict[str, str]
    body: Any
    at: float  # time.monotonic()


@dataclass
class Failure:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # sleep before answering (a timeout test)


class FakeElevenLabs:
    def __init__(self, api_key: str = "sk-fake-elevenlabs-key", *, voices: list[dict] | None = None,
                 seconds_per_char: float = 0.06, chunk_bytes: int = 4096):
        self.api_key = api_key
        self.voices = [dict(v) for v in (voices or DEFAULT_VOICES)]
        self.seconds_per_char = seconds_per_char
        self.chunk_bytes = chunk_bytes
        self.requests: list[ReceivedRequest] = []
        self.problems: list[str] = []  # wire-format violations seen (a test asserts it stays empty)
        self._failures: list[Failure] = []
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        self.app = Starlette(routes=[
            Route("/v1/text-to-speech/{voice_id}", self._tts, methods=["POST"]),
            Route("/v1/voices", self._list_voices, methods=["GET"]),
        ])

    # -- programming it ----------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self.port is not None, "start() the fake first"
        return f"http://127.0.0.1:{self.port}"

    def fail_next(self, status: int, body: Any = None, *, headers: dict[str, str] | None = None,
                  times: int = 1, delay_s: float = 0.0) -> None:
        """The next `times` text-to-speech requests (after the key check) answer `status`."""
        with self._lock:
            self._failures.extend(Failure(status, body, dict(headers or {}), delay_s) for _ in range(times))

    def reset(self) -> None:
        with self._lock:
            self._failures.clear()
            self.requests.clear()
            self.problems.clear()

    def tts_requests(self) -> list[ReceivedRequest]:
        return [r for r in self.requests if r.path.startswith("/v1/text-to-speech/")]

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "FakeElevenLabs":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="fake-elevenlabs", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake ElevenLabs server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "FakeElevenLabs":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the API -----------------------------------------------------------------------------
    def _record(self, request: Request, body: Any, voice_id: str | None = None) -> ReceivedRequest:
        received = ReceivedRequest(method=request.method, path=request.url.path, voice_id=voice_id,
                                   headers={k.lower(): v for k, v in request.headers.items()},
                                   query=dict(request.query_params), body=body, at=time.monotonic())
        with self._lock:
            self.requests.append(received)
        return received

    def _auth_error(self, request: Request) -> Response | None:
        key = request.headers.get("xi-api-key")
        if key is None:
            with self._lock:
                self.problems.append(f"{request.url.path}: no xi-api-key header")
            return JSONResponse({"detail": {"status": "needs_authorization",
                                            "message": "Neither authorization header nor xi-api-key received"}},
                                status_code=401)
        if key != self.api_key:
            return JSONResponse(INVALID_API_KEY, status_code=401)
        return None

    async def _list_voices(self, request: Request) -> Response:
        self._record(request, None)
        if (error := self._auth_error(request)) is not None:
            return error
        return JSONResponse({"voices": [
            {"voice_id": v["voice_id"], "name": v["name"], "category": "premade",
             "labels": {"accent": "american"}, "description": None, "preview_url": None, "samples": None}
            for v in self.voices]})

    async def _tts(self, request: Request) -> Response:
        voice_id = request.path_params["voice_id"]
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        self._record(request, body, voice_id)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            self.problems.append(f"content-type {request.headers.get('content-type')!r}, not application/json")
        if (error := self._auth_error(request)) is not None:
            return error
        with self._lock:
            failure = self._failures.pop(0) if self._failures else None
        if failure is not None:
            if failure.delay_s:
                await asyncio.sleep(failure.delay_s)
            if failure.body is None and failure.status < 300:
                pass  # a delayed success
            else:
                return JSONResponse(failure.body if failure.body is not None else {"detail": "error"},
                                    status_code=failure.status, headers=failure.headers)
        # validate like the real API
        output_format = request.query_params.get("output_format", "mp3_44100_128")
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            return JSONResponse({"detail": [{"type": "missing", "loc": ["body", "text"], "msg": "Field required",
                                             "input": body}]}, status_code=422)
        if not body["text"].strip():
            return JSONResponse({"detail": {"status": "invalid_text", "message": "Text must not be empty."}},
                                status_code=400)
        model_id = body.get("model_id")
        if model_id is not None and model_id not in KNOWN_MODELS:
            return JSONResponse({"detail": {"status": "model_not_found",
                                            "message": f"A model with model ID {model_id} does not exist."}},
                                status_code=400)
        if voice_id not in {v["voice_id"] for v in self.voices}:
            return JSONResponse(voice_not_found(voice_id), status_code=404)
        parts = output_format.split("_")
        if not (len(parts) == 2 and parts[0] == "pcm" and parts[1].isdigit() and int(parts[1]) in PCM_RATES) and \
                not (len(parts) == 3 and parts[0] == "mp3" and parts[1] in ("22050", "44100")):
            return JSONResponse({"detail": [{"type": "enum", "loc": ["query", "output_format"],
                                             "msg": f"unsupported output_format {output_format!r}",
                                             "input": output_format}]}, status_code=422)
        rate = int(parts[1])
        pcm = speech_like_pcm16(body["text"], rate, self.seconds_per_char)
        media_type = "audio/pcm"
        if parts[0] == "mp3":
            pcm, media_type = encode_mp3(pcm, rate, int(parts[2])), "audio/mpeg"

        async def chunks():
            for start in range(0, len(pcm), self.chunk_bytes):
                yield pcm[start:start + self.chunk_bytes]

        return StreamingResponse(chunks(), media_type=media_type,
                                 headers={"request-id": f"fake-{len(self.requests)}"})


def speech_like_pcm16(text: str, rate: int, seconds_per_char: float) -> bytes:
    """A deterministic voiced signal, `seconds_per_char` per character, with syllable-like
    amplitude bumps: non-silent, and longer for longer text."""
    n = max(1, int(round(len(text) * seconds_per_char * rate)))
    t = np.arange(n) / rate
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = np.sin(phase) + 0.5 * np.sin(2 * phase) + 0.25 * np.sin(3 * phase)
    envelope = 0.5 * (1 - np.cos(2 * np.pi * np.minimum(t * 4.0 % 1.0, 1.0)))
    signal = 0.3 * voiced * envelope
    return (np.clip(signal, -1, 1) * 32767).astype("<i2").tobytes()


def encode_mp3(pcm16: bytes, rate: int, kbps: int) -> bytes:
    """16-bit mono PCM -> an MP3 file (what ElevenLabs' mp3_* formats return)."""
    import io

    import av

    samples = np.frombuffer(pcm16, dtype="<i2").reshape(1, -1)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp3") as container:
        stream = container.add_stream("libmp3lame", rate=rate)
        stream.layout = "mono"
        stream.bit_rate = kbps * 1000
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
