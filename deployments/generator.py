"""Generator deployment: the generation graph, and the Python-handle entry point.

`GenerationSpec -> GenerationResult` (`generate`), or the same as a stream of ProgressEvents ending
with the result (`stream`, called with `handle.options(stream=True)`). No users, no database.

  TextEncoder.encode ──(DeploymentResponse, chained)──> Transformer.denoise (stream: steps)
      ──(ObjectRef of latents)──> VAECodec.decode_stream (Serve name VAEDecoder; chunks of frames)
      ──> H.264 encoded as the chunks arrive, + AAC from TTS (started first), mux

Every stage call carries `caller=` (this replica's Ray actor id), so a stage drops the work of a
Generator that died; `stream(..., caller=)` does the same for the Generator's own caller (the
Ingress's dispatcher): a dead caller's generation is cancelled, its stage calls with it. The
Transformer keeps the latents until this replica closes the denoise stream, once the VAE has
started decoding them.

A diffusion-forcing job is delivered progressively: the Transformer streams each window's final
latents, the VAE decodes them as they come (one decode session per job: its causal cache carries
over), the frames go into the final MP4 and into a fragmented-MP4 preview, and after each window a
"window" event carries the new preview bytes (and the frames, when the spec asks for frames). No
frames are kept beyond the thumbnail's (and the float frames when `return_frames`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import numpy as np
from ray import serve
from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle

from serve.config import LivenessConfig, ModelConfig, TTSConfig
from serve.contracts import (
    DecodedFrames, DenoisedLatents, GenerationInputs, GenerationResult, GenerationSpec, ProgressEvent, ResolvedSpec,
    StageTiming,
)
from serve.errors import (
    CineVividError, GenerationCancelled, StageBusy, StageError, StageUnavailable, busy, replica_stopped,
    unwrap_error,
)
from serve.media.fmp4 import FragmentedPreview
from serve.media.mp4 import Mp4Writer, thumbnail_jpeg
from serve.runtime.deadlines import Deadline, stage_deadline_s
from serve.runtime.replica import CallerWatch, caller_id, setup_replica_logging
from serve.stages import GENERATOR, INGRESS, model_of_deployment, stage_of_deployment
from serve.media.prepare import prepare_job

logger = logging.getLogger(__name__)
# Ray Serve's router leaves each stage call's response (an ObjectRef: e.g. the prompt embeddings)
# in a reference cycle after the call; Python collects such cycles only when enough new objects are
# allocated, which an idle replica never does, so an idle Generator kept the embeddings of its last
# ~10 jobs alive (`ray memory`: "actor call | send_request_python", gone after gc.collect()). A full
# collection this long after the last generation ends frees them.
IDLE_GC_DELAY_S = 1.0

# progress (0-100) at the end of each part of the graph
ENCODE_DONE, DENOISE_DONE, DECODE_DONE = 5.0, 90.0, 96.0


def _stage_of(deployment: str) -> str | None:
    """The stage name of a Serve deployment name (every model's "Transformer-<model>" is the transformer)."""
    stage = stage_of_deployment(deployment)
    return stage.name if stage is not None else None


def _raise_typed(exc: BaseException, stage: str, job_id: str = "-") -> None:
    """Re-raise a stage call's failure as a typed error. A replica that stopped mid-call becomes a
    short StageUnavailable naming the stage (the job service retries those); Ray's own text
    (process ids, addresses, actor ids) goes to the log with the job id, never to the user."""
    err = unwrap_error(exc)
    if isinstance(err, CineVividError):
        raise err from None
    if busy(exc):
        raise StageBusy(f"the {stage} stage is at capacity (its queue, max_queued_requests, is full)",
                        stage=stage) from None
    if (stop := replica_stopped(exc)) is not None:
        # Ray's text names the replica that died (a chained call's upstream stage, e.g. the
        # TextEncoder whose embeddings the Transformer was waiting for)
        died = re.search(r"ServeReplica:[^:\s]+:(\w+)", str(stop))
        stage = (_stage_of(died.group(1)) or stage) if died else stage
        logger.warning("[job %s] the %s replica stopped during its call: %r", job_id, stage, exc)
        raise StageUnavailable(f"the {stage} replica stopped while running this job", stage=stage) from None
    if isinstance(exc, RayError):
        logger.error("[job %s] the %s call failed: %r", job_id, stage, exc)
        raise StageError(f"the {stage} stage failed ({type(exc).__name__})", stage=stage) from None
    raise StageError(f"{type(exc).__name__}: {exc}", stage=stage) from exc


class _JobLog(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"[job {self.extra['job_id']}] {msg}", kwargs


@dataclass
class _Run:
    """One generation in flight: its spec, the calls it has open, and what it has produced."""

    spec: ResolvedSpec
    job_id: str
    inputs: GenerationInputs | None = None  # the image(s), or the video to extend
    started: float = field(default_factory=time.time)
    timings: list[StageTiming] = field(default_factory=list)
    tts_call: asyncio.Future | None = None
    open_calls: list = field(default_factory=list)  # stage streams to cancel if the run ends early
    writer: Mp4Writer | None = None
    latents: DenoisedLatents | None = None
    denoise_call: object | None = None  # the open denoise stream: the Transformer holds the latents until it closes
    frames: np.ndarray | None = None
    float_frames: np.ndarray | None = None
    audio: object | None = None  # the TTS stage's fitted speech
    mp4: bytes = b""
    thumbnail: bytes = b""
    # diffusion forcing, delivered window by window
    preview: FragmentedPreview | None = None
    session_key: str = ""
    frames_done: int = 0
    skip_frames: int = 0  # extend: decoded frames still to drop (they re-make the source's end)
    progress: float = 0.0  # of the last step event
    deadline_s: float = 0.0  # of each stage call (serve.runtime.deadlines), from the job's steps
    thumbnail_frame: np.ndarray | None = None
    float_chunks: list = field(default_factory=list)

    def mark(self, stage: str, start: float) -> float:
        end = time.time()
        self.timings.append(StageTiming(stage=stage, start=start, end=end))
        return end


@serve.deployment(name=GENERATOR.deployment)
class Generator:
    def __init__(self, text_encoder: DeploymentHandle, transformers: dict[str, DeploymentHandle] | DeploymentHandle,
                 vae: DeploymentHandle, tts: DeploymentHandle | None, models: list[dict] | dict,
                 tts_config: dict | None = None, app_name: str = "cinevivid", liveness: dict | None = None,
                 image_encoder: DeploymentHandle | None = None):
        """`transformers`: each model's Transformer by model name (one handle: the one model's);
        `models`: the set's ModelConfigs, the default first."""
        setup_replica_logging()
        self.me = caller_id()  # passed to the stages with each call
        self.liveness = LivenessConfig.model_validate(liveness or {})
        self._callers = CallerWatch(self.liveness.caller_check_interval_s)
        self.models = [ModelConfig.model_validate(m) for m in (models if isinstance(models, list) else [models])]
        self.model_cfg = self.models[0]
        self.text_encoder = text_encoder
        self.transformers = transformers if isinstance(transformers, dict) else {self.model_cfg.name: transformers}
        self.vae = vae
        self.tts = tts
        self.image_encoder = image_encoder
        self.tts_cfg = TTSConfig.model_validate(tts_config or {})
        self.app_name = app_name
        self.active = 0  # generations in flight
        self.idle_collections = 0

    # -- validation ----------------------------------------------------------------------------
    def _prepare(self, spec, inputs=None) -> tuple[ResolvedSpec, GenerationInputs | None]:
        """A ResolvedSpec (the job service validated it at submission, and prepared its inputs) is
        used as is; anything else is validated here, once, its image fitted (`prepare_job`)."""
        if isinstance(inputs, dict):
            inputs = GenerationInputs.model_validate(inputs)
        if isinstance(spec, ResolvedSpec):
            return spec, inputs
        if not isinstance(spec, GenerationSpec):
            spec = GenerationSpec.model_validate(spec)
        return prepare_job(spec, inputs, self.models, self.tts_cfg)

    async def check(self, spec, inputs=None) -> dict:
        """Validate a spec (and its image or video) without any model work: the resolved spec, or
        InvalidSpecError."""
        return (await asyncio.to_thread(self._prepare, spec, inputs))[0].model_dump(mode="json")

    # -- generation ----------------------------------------------------------------------------
    async def generate(self, spec, job_id: str = "-", caller: str | None = None,
                       inputs: GenerationInputs | dict | None = None) -> GenerationResult:
        result = None
        async for event in self.stream(spec, job_id, caller, inputs):
            if event.type == "result":
                result = event.result
        return result

    async def stream(self, spec, job_id: str = "-", caller: str | None = None,
                     inputs: GenerationInputs | dict | None = None) -> AsyncIterator[ProgressEvent]:
        """The generation's progress events, then the result. `caller`: the caller's Ray actor id;
        if that actor dies, the generation is cancelled (within `liveness.caller_check_interval_s`).
        `inputs`: what an image-to-video job or an extension starts from."""
        log = _JobLog(logger, {"job_id": job_id})
        # 1. Resolve the spec (once; a ResolvedSpec from the job service is used as is)
        resolved, inputs = await asyncio.to_thread(self._prepare, spec, inputs)
        run = _Run(spec=resolved, job_id=job_id, inputs=inputs, deadline_s=self._deadline_s(resolved.num_inference_steps))
        unwatch = self._callers.watch(caller, functools.partial(self._caller_gone, asyncio.current_task(), log))
        self.active += 1
        try:
            # 2. Start the voice-over: it runs in parallel with the video stages
            run.tts_call = self._start_tts(run)
            # 3. Encode the prompt and 4. denoise: the embeddings go straight to the Transformer
            async for event in self._encode_and_denoise(run):
                yield event
            # 5. Decode the latents and encode the MP4 as the frames arrive; mux the voice-over
            async for event in self._decode_and_mux(run):
                yield event
            # 6. The result
            result = self._result(run)
            log.info("generated %dx%d, %d frames in %.2fs", result.width, result.height, result.num_frames,
                     result.metadata["total_s"])
            yield ProgressEvent(type="result", progress=100.0, result=result)
        except asyncio.CancelledError:
            log.info("generation cancelled by the caller")
            raise
        except CineVividError:
            raise
        except Exception as exc:  # noqa: BLE001
            _raise_typed(exc, "generator", job_id)
        finally:
            unwatch()
            self.active -= 1
            if self.active == 0:
                asyncio.get_running_loop().call_later(IDLE_GC_DELAY_S, self._collect_if_idle)
            for call in run.open_calls:
                # cancelling a call that Serve never assigned (refused: BackPressureError) raises its
                # error again; it must not replace the typed error this generation ends with
                with contextlib.suppress(Exception):
                    call.cancel()
            if run.writer is not None:
                run.writer.close()  # no-op once finished
            if run.preview is not None:
                run.preview.close()
            if run.tts_call is not None:
                run.tts_call.cancel()

    def _deadline_s(self, steps: int) -> float:
        return stage_deadline_s(steps, self.liveness.stage_deadline_per_step_s, self.liveness.stage_deadline_floor_s)

    @staticmethod
    def _overdue(stage: str, run: _Run) -> StageUnavailable:
        """A stage call past its deadline: its replica is treated like a dead one (the job service
        retries the job; the replica's check_health fails while the call is overdue)."""
        logger.warning("[job %s] the %s call missed its deadline (%.1f s); treating its replica as dead",
                       run.job_id, stage, run.deadline_s)
        return StageUnavailable(f"the {stage} replica did not answer within its deadline", stage=stage)

    async def _within(self, stream, deadline: Deadline, stage: str, run: _Run) -> AsyncIterator:
        """The items of a stage's stream, each awaited no longer than what is left of `deadline`
        (which the caller may restart or extend as items arrive); past it, StageUnavailable."""
        items = stream.__aiter__()
        while True:
            try:
                async with asyncio.timeout(max(0.0, deadline.remaining())):
                    item = await items.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise self._overdue(stage, run) from None
            yield item

    def _collect_if_idle(self) -> None:
        if self.active == 0:
            gc.collect()
            self.idle_collections += 1

    @staticmethod
    def _caller_gone(task: asyncio.Task | None, log, died_at: float) -> None:
        """The caller of this generation died: cancel it (its `finally` cancels the stage calls)."""
        log.warning("the caller is gone; cancelling the generation")
        if task is not None:
            task.cancel()

    async def _encode_and_denoise(self, run: _Run) -> AsyncIterator[ProgressEvent]:
        spec = run.spec
        yield ProgressEvent(type="stage", stage="text_encoder", stage_status="started", progress=0.0)
        embeds = self.text_encoder.encode.remote(spec.prompt, spec.negative_prompt if spec.do_cfg else None)
        conditioning = await self._conditioning(run)
        transformer = self.transformers[spec.model]
        if spec.lora is not None:  # Serve routes it to a replica that holds the adapter, if one does
            transformer = transformer.options(multiplexed_model_id=spec.lora.name)
        denoise = transformer.options(stream=True).denoise.remote(
            embeds, spec, run.job_id, caller=self.me, **conditioning)
        del conditioning
        del embeds  # (the denoise call holds the embeddings' ref while it needs it)
        run.open_calls.append(denoise)
        denoise_started = run.started
        deadline = Deadline(run.deadline_s)
        try:
            async for item in self._within(denoise, deadline, "transformer", run):
                self._raise_if_tts_failed(run.tts_call, run.job_id)
                if isinstance(item, DenoisedLatents) and item.window is not None:  # diffusion forcing
                    async for event in self._deliver_window(run, item):
                        yield event
                    if item.window == item.num_windows - 1:
                        # every window is decoded; the stream holds their latents until it is closed
                        run.denoise_call = denoise
                        break
                elif isinstance(item, DenoisedLatents):
                    # the last item; the stream stays open, holding the latents, until the VAE has them
                    run.latents, run.denoise_call = item, denoise
                    break
                elif item.type == "stage":  # the Transformer started this job's batch
                    deadline.restart()  # the wait for a batch slot had one deadline, the denoising has one
                    # text encoding (and any wait for a batch slot) ends where denoising starts
                    denoise_started = run.mark("text_encoder", run.started)
                    yield ProgressEvent(type="stage", stage="text_encoder", stage_status="finished",
                                        progress=ENCODE_DONE)
                    yield item.model_copy(update={"progress": ENCODE_DONE})
                elif item.type == "step":
                    if item.total_steps:  # every window's steps, for a long video
                        run.deadline_s = max(run.deadline_s, self._deadline_s(item.total_steps))
                        deadline.extend_to(run.deadline_s)
                    share = (DENOISE_DONE - ENCODE_DONE) * item.step / item.total_steps
                    run.progress = ENCODE_DONE + share
                    yield item.model_copy(update={"progress": run.progress})
        except CineVividError:
            raise
        except Exception as exc:  # noqa: BLE001
            _raise_typed(exc, "transformer", run.job_id)
        if run.latents is None and run.preview is None:
            raise GenerationCancelled("generation cancelled", stage="transformer")
        run.mark("transformer", denoise_started)
        yield ProgressEvent(type="stage", stage="transformer", stage_status="finished", progress=DENOISE_DONE)

    async def _conditioning(self, run: _Run) -> dict:
        """The Transformer's inputs besides the prompt for a job that starts from an image or a
        video, as stage calls it resolves itself (they run while the prompt is encoded):
        - I2V model: the CLIP image embeddings (ImageEncoder) and the mask + image latents (VAE);
        - DF model, image: the image's latent frame (and the last image's) as the first window's prefix;
        - DF model, extend: the latents of the source's last `overlap_history` frames."""
        spec, inputs = run.spec, run.inputs
        if spec.mode == "text-to-video":
            return {}
        model = next(m for m in self.models if m.name == spec.model)
        if spec.mode == "image-to-video" and model.pipeline == "i2v":
            if self.image_encoder is None:
                raise StageError("this app has no image encoder for I2V models", stage="image_encoder")
            return {"image_embeds": self.image_encoder.encode.remote(inputs.image),
                    "condition": self.vae.i2v_condition.remote(inputs.image, inputs.last_image, spec.num_frames)}
        if spec.mode == "image-to-video":
            out = {"condition_latents": self.vae.encode.remote(inputs.image[None])}
            if inputs.last_image is not None:
                out["end_latents"] = self.vae.encode.remote(inputs.last_image[None])
            return out
        from serve.media.inputs import decode_video

        frames, _ = await asyncio.to_thread(decode_video, inputs.video_mp4, "video", last_n=spec.overlap_history)
        return {"condition_latents": self.vae.encode.remote(frames)}

    async def _write_source(self, run: _Run) -> None:
        """Extend: the video extended goes first into the MP4 and the preview, frame for frame
        (re-encoded), and its sound, if any, under it."""
        from serve.media.inputs import iter_video_frames

        def write() -> None:
            for frames in iter_video_frames(run.inputs.video_mp4, "video"):
                middle = run.spec.output_frames // 2 - run.frames_done
                if 0 <= middle < len(frames):
                    run.thumbnail_frame = frames[middle].copy()
                run.writer.add(frames)
                run.preview.add(frames, False)
                run.frames_done += len(frames)
        await asyncio.to_thread(write)
        run.skip_frames = run.spec.overlap_history  # the first window re-makes the source's last frames

    async def _deliver_window(self, run: _Run, latents: DenoisedLatents) -> AsyncIterator[ProgressEvent]:
        """One diffusion-forcing window: decode its latents (the job's VAE session carries the causal
        cache over), encode the frames into the final MP4 and the preview, then a "window" event."""
        spec = run.spec
        if latents.window == 0:
            run.session_key = f"{run.job_id}:{uuid.uuid4().hex[:12]}"
            # a fragmented MP4 cannot gain an audio track later: the voice-over comes first
            await self._await_tts(run)
            if spec.mode == "extend":
                run.audio = await asyncio.to_thread(self._extension_audio, run)
                self._open_outputs(run, spec.width, spec.height)
                await self._write_source(run)
        decoding = self.vae.options(stream=True).decode_part_stream.remote(
            run.session_key, latents.window, latents.num_windows, latents.ref, spec.return_frames, caller=self.me,
            deadline_s=run.deadline_s)
        run.open_calls.append(decoding)
        window_frames: list[np.ndarray] = []
        try:
            async for chunk in self._within(decoding, Deadline(run.deadline_s), "vae", run):
                frames, float_frames = chunk.frames, chunk.float_frames
                if run.skip_frames:  # extend: frames that re-make the end of the source
                    n = min(run.skip_frames, len(frames))
                    run.skip_frames -= n
                    frames, float_frames = frames[n:], None if float_frames is None else float_frames[n:]
                    if not len(frames):
                        continue
                if run.writer is None:
                    self._open_outputs(run, frames.shape[2], frames.shape[1])
                middle = spec.output_frames // 2 - run.frames_done
                if 0 <= middle < len(frames):
                    run.thumbnail_frame = frames[middle].copy()
                await asyncio.to_thread(run.writer.add, frames)
                await asyncio.to_thread(run.preview.add, frames, not window_frames)
                run.frames_done += len(frames)
                if spec.return_frames:
                    window_frames.append(frames)
                    run.float_chunks.append(float_frames)
                else:
                    window_frames.append(frames[:0])  # only marks that the window has begun
        except CineVividError:
            raise
        except Exception as exc:  # noqa: BLE001
            _raise_typed(exc, "vae", run.job_id)
        run.open_calls.remove(decoding)
        fragment = await asyncio.to_thread(run.preview.cut)
        yield ProgressEvent(type="window", stage="vae", window=latents.window, num_windows=latents.num_windows,
                            playable_s=round(run.preview.playable_s, 3), fragment=fragment, progress=run.progress,
                            frames=np.concatenate(window_frames) if spec.return_frames else None)

    def _open_outputs(self, run: _Run, width: int, height: int) -> None:
        """The final MP4's writer and the preview, with the audio track if there is one."""
        spec, audio = run.spec, run.audio
        run.writer = Mp4Writer(width, height, spec.fps, audio.sample_rate if audio is not None else None)
        run.preview = FragmentedPreview(width, height, spec.fps, total_frames=spec.output_frames,
                                        audio=audio.pcm if audio is not None else None,
                                        audio_rate=audio.sample_rate if audio is not None else None)

    def _extension_audio(self, run: _Run):
        """Extend: the source's sound (if any) under the source, the voice-over (if any) under the new
        segment; None when neither has sound."""
        from serve.media.audio import SpeechAudio, fit_samples
        from serve.media.inputs import decode_audio_track

        spec, voice = run.spec, run.audio
        rate = voice.sample_rate if voice is not None else self.tts_cfg.sample_rate
        source = decode_audio_track(run.inputs.video_mp4, rate)
        if source is None and voice is None:
            return None
        pcm = np.concatenate([fit_samples(source, round(spec.source_num_frames / spec.fps * rate)),
                              fit_samples(voice.pcm if voice is not None else None,
                                          round(spec.added_frames / spec.fps * rate))])
        if voice is not None:
            return voice.model_copy(update={"pcm": pcm})
        now = time.time()
        return SpeechAudio(pcm=pcm, sample_rate=rate, provider="source", voice="-", speech_s=0.0,
                           started_at=now, finished_at=now)

    async def _await_tts(self, run: _Run) -> None:
        """The voice-over (if any, and not awaited yet) into `run.audio`, with its timing."""
        if run.tts_call is not None:
            remaining = run.deadline_s - (time.time() - run.started)  # the TTS call started with the job
            try:
                run.audio = await asyncio.wait_for(asyncio.shield(run.tts_call), max(0.0, remaining))
            except asyncio.TimeoutError:
                raise self._overdue("tts", run) from None
            except Exception as exc:  # noqa: BLE001
                _raise_typed(exc, "tts", run.job_id)
            run.tts_call = None
            run.timings.append(StageTiming(stage="tts", start=run.audio.started_at, end=run.audio.finished_at))

    async def _finish_progressive(self, run: _Run) -> AsyncIterator[ProgressEvent]:
        """Diffusion forcing: every window is decoded and encoded; close the MP4 (with the audio)."""
        t_denoised = time.time()
        self._release_latents(run)  # every window's latents are decoded: the Transformer may drop them
        run.float_frames = np.concatenate(run.float_chunks) if run.float_chunks else None
        run.float_chunks = []
        t_decoded = run.mark("vae", t_denoised)
        yield ProgressEvent(type="stage", stage="vae", stage_status="finished", progress=DECODE_DONE)
        yield ProgressEvent(type="stage", stage="mux", stage_status="started", progress=DECODE_DONE)
        run.mp4 = await asyncio.to_thread(run.writer.finish, run.audio.pcm if run.audio is not None else None)
        run.thumbnail = await asyncio.to_thread(thumbnail_jpeg, run.thumbnail_frame[None])
        run.mark("mux", t_decoded)
        yield ProgressEvent(type="stage", stage="mux", stage_status="finished", progress=100.0)

    async def _decode_and_mux(self, run: _Run) -> AsyncIterator[ProgressEvent]:
        spec = run.spec
        if run.preview is not None:
            async for event in self._finish_progressive(run):
                yield event
            return
        t_denoised = time.time()
        # The VAE streams its frames chunk by chunk; they are H.264-encoded as they arrive (once the
        # voice-over, if any, has told us its sample rate), so when the last chunk is decoded the
        # MP4 only needs flushing.
        chunks: list[np.ndarray] = []
        float_chunks: list[np.ndarray] = []
        decoding = self.vae.options(stream=True).decode_stream.remote(run.latents.ref, spec.return_frames,
                                                                        caller=self.me, deadline_s=run.deadline_s)
        run.open_calls.append(decoding)
        try:
            async for item in self._within(decoding, Deadline(run.deadline_s), "vae", run):
                if isinstance(item, ProgressEvent):  # the VAE started decoding this job
                    self._release_latents(run)  # it has fetched them: the Transformer may drop them
                    yield item.model_copy(update={"progress": DENOISE_DONE})
                    continue
                await self._encode_chunk(run, item, chunks)
                if item.float_frames is not None:
                    float_chunks.append(item.float_frames)
        except CineVividError:
            raise
        except Exception as exc:  # noqa: BLE001
            _raise_typed(exc, "vae", run.job_id)
        run.open_calls.remove(decoding)
        run.frames = np.concatenate(chunks)
        run.float_frames = np.concatenate(float_chunks) if float_chunks else None
        t_decoded = run.mark("vae", t_denoised)
        yield ProgressEvent(type="stage", stage="vae", stage_status="finished", progress=DECODE_DONE)

        await self._await_tts(run)
        yield ProgressEvent(type="stage", stage="mux", stage_status="started", progress=DECODE_DONE)
        if run.writer is None:  # the voice-over finished after the last frame
            run.writer = self._new_writer(run.frames, spec.fps, run.audio)
            await asyncio.to_thread(run.writer.add, run.frames)
        run.mp4 = await asyncio.to_thread(run.writer.finish, run.audio.pcm if run.audio is not None else None)
        run.thumbnail = await asyncio.to_thread(thumbnail_jpeg, run.frames)
        run.mark("mux", t_decoded)
        yield ProgressEvent(type="stage", stage="mux", stage_status="finished", progress=100.0)

    @staticmethod
    def _release_latents(run: _Run) -> None:
        """Close the denoise stream: the Transformer drops its hold on the latents."""
        if run.denoise_call is not None:
            run.denoise_call.cancel()
            run.open_calls.remove(run.denoise_call)
            run.denoise_call = None

    async def _encode_chunk(self, run: _Run, chunk: DecodedFrames, chunks: list[np.ndarray]) -> None:
        """H.264-encode a chunk of frames now if the writer can exist (the voice-over's sample rate
        is known, or there is none); otherwise keep it for later."""
        chunks.append(chunk.frames)
        if run.writer is not None:
            await asyncio.to_thread(run.writer.add, chunk.frames)
        elif run.tts_call is None or run.tts_call.done():
            self._raise_if_tts_failed(run.tts_call, run.job_id)
            audio = run.tts_call.result() if run.tts_call is not None else None
            run.writer = self._new_writer(chunk.frames, run.spec.fps, audio)
            await asyncio.to_thread(run.writer.add, np.concatenate(chunks))

    @staticmethod
    def _result(run: _Run) -> GenerationResult:
        spec, audio = run.spec, run.audio
        if run.frames is not None:
            num_frames, height, width = run.frames.shape[:3]
        else:  # delivered window by window: the frames are not kept
            num_frames, (height, width) = run.frames_done, run.thumbnail_frame.shape[:2]
        return GenerationResult(
            mp4=run.mp4, thumbnail_jpeg=run.thumbnail, spec=spec, width=width, height=height,
            num_frames=num_frames, fps=spec.fps, duration_s=num_frames / spec.fps,
            has_audio=audio is not None, timings=run.timings, frames=run.float_frames,
            metadata={"seed": spec.seed, "model": spec.model, "total_s": run.timings[-1].end - run.started,
                      **({"voice": audio.voice, "tts_provider": audio.provider} if audio else {})},
        )

    def _start_tts(self, run: _Run) -> asyncio.Future | None:
        vo = run.spec.voiceover
        if vo is None or self.tts is None or vo.provider == "none":
            return None
        response = self.tts.synthesize.remote(vo, run.spec.added_frames / run.spec.fps, run.job_id)

        async def wait():
            try:
                return await response
            except asyncio.CancelledError:
                response.cancel()
                raise

        return asyncio.ensure_future(wait())

    @staticmethod
    def _raise_if_tts_failed(tts_call, job_id: str = "-") -> None:
        """A failed voice-over fails the job now: the video work is not left running."""
        if tts_call is not None and tts_call.done() and tts_call.exception() is not None:
            _raise_typed(tts_call.exception(), "tts", job_id)

    @staticmethod
    def _new_writer(frames, fps: int, audio) -> Mp4Writer:
        """An MP4 writer for frames like these; with an AAC track when there is a voice-over."""
        return Mp4Writer(frames.shape[2], frames.shape[1], fps, audio.sample_rate if audio is not None else None)

    # -- service information -------------------------------------------------------------------
    async def health(self) -> dict:
        """Per-stage health from Serve's own replica health checks."""
        out = {}
        try:
            status = await asyncio.to_thread(serve.status)
            app = status.applications.get(self.app_name)
            deployments = app.deployments if app else {}
            for name, d in deployments.items():
                stage = _stage_of(name)
                if stage is None or name == INGRESS.deployment:
                    continue
                if (model := model_of_deployment(name)) is not None:  # another model's Transformer
                    stage = f"{stage}:{model}"
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

    async def voice_catalog(self) -> dict | None:
        """The TTS stage's providers that can speak and their voices (None: no TTS stage)."""
        if self.tts is None:
            return None
        return await self.tts.catalog.remote()

    async def model_info(self) -> dict:
        from serve.pipeline.hub_cache import model_cache_stats

        return {"model": self.model_cfg.model_dump(mode="json"),
                "models": [m.model_dump(mode="json") for m in self.models],
                "cache": await asyncio.to_thread(model_cache_stats, self.model_cfg)}
