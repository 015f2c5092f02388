"""Generator deployment: the generation graph, and the Python-handle entry point.

`GenerationSpec -> GenerationResult` (`generate`), or the same as a stream of ProgressEvents ending
with the result (`stream`, called with `handle.options(stream=True)`). No users, no database.

  TextEncoder.encode ──(DeploymentResponse, chained)──> Transformer.denoise (stream: steps)
      ──(ObjectRef of latents)──> VAEDecoder.decode_stream (chunks of frames)
      ──> H.264 encoded as the chunks arrive, + AAC from TTS (started first), mux
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.config import ModelConfig, TTSConfig
from serve.errors import CineVividError, GenerationCancelled, StageError, unwrap_error
from serve.generation import (
    GenerationResult, GenerationSpec, ProgressEvent, ResolvedSpec, StageTiming,
)
from serve.media import Mp4Writer, thumbnail_jpeg
from serve.validation import resolve_spec

logger = logging.getLogger(__name__)

# progress (0-100) given to each part of the graph
ENCODE_DONE, DENOISE_DONE, DECODE_DONE = 5.0, 90.0, 96.0


def _raise_typed(exc: BaseException, stage: str) -> None:
    err = unwrap_error(exc)
    if isinstance(err, CineVividError):
        raise err from None
    raise StageError(f"{type(exc).__name__}: {exc}", stage=stage) from exc


class _JobLog(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"[job {self.extra['job_id']}] {msg}", kwargs


@serve.deployment(name="Generator")
class Generator:
    def __init__(self, text_encoder: DeploymentHandle, transformer: DeploymentHandle, vae: DeploymentHandle,
                 tts: DeploymentHandle | None, model: dict, tts_config: dict | None = None,
                 app_name: str = "cinevivid"):
        self.text_encoder = text_encoder
        self.transformer = transformer
        self.vae = vae
        self.tts = tts
        self.model_cfg = ModelConfig.model_validate(model)
        self.tts_cfg = TTSConfig.model_validate(tts_config or {})
        self.app_name = app_name

    # -- validation ----------------------------------------------------------------------------
    def _resolve(self, spec) -> ResolvedSpec:
        if isinstance(spec, ResolvedSpec):
            return spec
        if not isinstance(spec, GenerationSpec):
            spec = GenerationSpec.model_validate(spec)
        return resolve_spec(spec, self.model_cfg, self.tts_cfg)

    async def check(self, spec) -> dict:
        """Validate a spec without any model work: the resolved spec, or InvalidSpecError."""
        return self._resolve(spec).model_dump(mode="json")

    # -- generation ----------------------------------------------------------------------------
    async def generate(self, spec, job_id: str = "-") -> GenerationResult:
        result = None
        async for event in self.stream(spec, job_id):
            if event.type == "result":
                result = event.result
        return result

    async def stream(self, spec, job_id: str = "-") -> AsyncIterator[ProgressEvent]:
        log = _JobLog(logger, {"job_id": job_id})
        resolved = self._resolve(spec)
        timings: list[StageTiming] = []
        started = time.time()
        tts_call = self._start_tts(resolved, job_id)
        denoise = decoding = writer = None
        try:
            yield ProgressEvent(type="stage", stage="text_encoder", status="started", progress=0.0)
            embeds = self.text_encoder.encode.remote(
                resolved.prompt, resolved.negative_prompt if resolved.do_cfg else None)
            denoise = self.transformer.options(stream=True).denoise.remote(
                embeds, resolved.model_dump(mode="json"), job_id)
            latents_ref = None
            denoise_started = None
            async for event in denoise:
                self._raise_if_tts_failed(tts_call)
                if event["type"] == "started":
                    # text encoding (and any wait for a batch slot) ends where denoising starts
                    denoise_started = time.time()
                    timings.append(StageTiming(stage="text_encoder", start=started, end=denoise_started))
                    yield ProgressEvent(type="stage", stage="text_encoder", status="finished",
                                        progress=ENCODE_DONE)
                    yield ProgressEvent(type="stage", stage="transformer", status="started",
                                        progress=ENCODE_DONE)
                elif event["type"] == "step":
                    step, total = event["step"], event["total_steps"]
                    yield ProgressEvent(type="step", stage="transformer", step=step, total_steps=total,
                                        progress=ENCODE_DONE + (DENOISE_DONE - ENCODE_DONE) * step / total)
                elif event["type"] == "latents":
                    latents_ref = event["ref"]
            denoise = None
            if latents_ref is None:
                raise GenerationCancelled("generation cancelled", stage="transformer")
            t_denoised = time.time()
            timings.append(StageTiming(stage="transformer", start=denoise_started or started, end=t_denoised))
            yield ProgressEvent(type="stage", stage="transformer", status="finished", progress=DENOISE_DONE)
            yield ProgressEvent(type="stage", stage="vae", status="started", progress=DENOISE_DONE)
            # The VAE streams its frames chunk by chunk; they are H.264-encoded as they arrive
            # (once the voice-over, if any, has told us its sample rate), so by the time the last
            # chunk is decoded the MP4 only needs flushing.
            chunks, float_chunks = [], []
            decoding = self.vae.options(stream=True).decode_stream.remote(latents_ref, resolved.return_frames)
            try:
                async for chunk in decoding:
                    chunks.append(chunk.frames)
                    if chunk.float_frames is not None:
                        float_chunks.append(chunk.float_frames)
                    if writer is None and (tts_call is None or tts_call.done()):
                        self._raise_if_tts_failed(tts_call)
                        writer = self._new_writer(chunk.frames, resolved.fps,
                                                  tts_call.result() if tts_call is not None else None)
                        await asyncio.to_thread(writer.add, np.concatenate(chunks))
                    elif writer is not None:
                        await asyncio.to_thread(writer.add, chunk.frames)
            except Exception as exc:  # noqa: BLE001
                _raise_typed(exc, "vae")
            decoding = None
            frames = np.concatenate(chunks)
            t_decoded = time.time()
            timings.append(StageTiming(stage="vae", start=t_denoised, end=t_decoded))
            yield ProgressEvent(type="stage", stage="vae", status="finished", progress=DECODE_DONE)

            audio = None
            if tts_call is not None:
                try:
                    audio = await tts_call
                except Exception as exc:  # noqa: BLE001
                    _raise_typed(exc, "tts")
                tts_call = None
                timings.append(StageTiming(stage="tts", start=audio.started_at, end=audio.finished_at))

            yield ProgressEvent(type="stage", stage="mux", status="started", progress=DECODE_DONE)
            if writer is None:  # the voice-over finished after the last frame
                writer = self._new_writer(frames, resolved.fps, audio)
                await asyncio.to_thread(writer.add, frames)
            mp4 = await asyncio.to_thread(writer.finish, audio.pcm if audio is not None else None)
            thumb = await asyncio.to_thread(thumbnail_jpeg, frames)
            t_muxed = time.time()
            timings.append(StageTiming(stage="mux", start=t_decoded, end=t_muxed))
            yield ProgressEvent(type="stage", stage="mux", status="finished", progress=100.0)
            result = GenerationResult(
                mp4=mp4, thumbnail_jpeg=thumb, spec=resolved, width=frames.shape[2], height=frames.shape[1],
                num_frames=frames.shape[0], fps=resolved.fps, duration_s=frames.shape[0] / resolved.fps,
                has_audio=audio is not None, timings=timings,
                frames=np.concatenate(float_chunks) if float_chunks else None,
                metadata={"seed": resolved.seed, "model": resolved.model, "total_s": t_muxed - started,
                          **({"voice": audio.voice, "tts_provider": audio.provider} if audio else {})},
            )
            log.info("generated %dx%d, %d frames in %.2fs", result.width, result.height, result.num_frames,
                     t_muxed - started)
            yield ProgressEvent(type="result", progress=100.0, result=result)
        except asyncio.CancelledError:
            log.info("generation cancelled by the caller")
            raise
        except CineVividError:
            raise
        except Exception as exc:  # noqa: BLE001
            _raise_typed(exc, "transformer" if denoise is not None else "generator")
        finally:
            if denoise is not None:
                denoise.cancel()
            if decoding is not None:
                decoding.cancel()
            if writer is not None:
                writer.close()  # no-op once finished
            if tts_call is not None:
                tts_call.cancel()

    def _start_tts(self, spec: ResolvedSpec, job_id: str):
        vo = spec.voiceover
        if vo is None or self.tts is None or vo.provider == "none":
            return None
        duration = spec.num_frames / spec.fps
        response = self.tts.synthesize.remote(vo.model_dump(mode="json"), duration, job_id)

        async def wait():
            try:
                return await response
            except asyncio.CancelledError:
                response.cancel()
                raise

        return asyncio.ensure_future(wait())

    @staticmethod
    def _raise_if_tts_failed(tts_call) -> None:
        """A failed voice-over fails the job now: the video work is not left running."""
        if tts_call is not None and tts_call.done() and tts_call.exception() is not None:
            _raise_typed(tts_call.exception(), "tts")

    @staticmethod
    def _new_writer(frames, fps: int, audio) -> Mp4Writer:
        """An MP4 writer for frames like these; with an AAC track when there is a voice-over."""
        return Mp4Writer(frames.shape[2], frames.shape[1], fps, audio.sample_rate if audio is not None else None)

    # -- service information -------------------------------------------------------------------
    async def health(self) -> dict:
        """Per-stage health from Serve's own replica health checks."""
        stages = {"TextEncoder": "text_encoder", "Transformer": "transformer", "VAEDecoder": "vae",
                  "TTS": "tts", "Generator": "generator"}
        out = {}
        try:
            status = await asyncio.to_thread(serve.status)
            app = status.applications.get(self.app_name)
            deployments = app.deployments if app else {}
            for name, stage in stages.items():
                d = deployments.get(name)
                if d is None:
                    continue
                healthy = str(d.status).endswith("HEALTHY") and not str(d.status).endswith("UNHEALTHY")
                out[stage] = {"status": "healthy" if healthy else "unhealthy",
                              "detail": f"{d.status}: {d.message}".strip(": ")}
        except Exception as exc:  # noqa: BLE001
            out["serve"] = {"status": "unhealthy", "detail": f"cannot read serve status: {exc}"}
        return out

    async def voices(self) -> list[dict]:
        if self.tts is None:
            return []
        return await self.tts.voices.remote()

    async def model_info(self) -> dict:
        from serve.model_cache import model_cache_stats

        return {"model": self.model_cfg.model_dump(mode="json"),
                "cache": await asyncio.to_thread(model_cache_stats, self.model_cfg)}
