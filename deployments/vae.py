"""The VAE stage: `VAECodec`, deployed under the Serve name "VAEDecoder" (`serve.stages.VAE`).

It decodes — de-normalise latents (`latents * std + mean`), `vae.decode`, and post-process to
frames: uint8 (F, H, W, 3), plus the float32 [0, 1] frames when asked.

`decode_stream` yields a "stage started" `ProgressEvent`, then the frames chunk by chunk as the Wan
VAE decodes them (1 frame, then 4 per latent frame), so the Generator encodes the MP4 while the
rest is still decoding; `decode` returns them all at once. Both give exactly `vae.decode`'s frames.
A `decode_stream` whose caller (`caller=`, its Ray actor id) is gone stops after the chunk being
decoded, or before it starts.

`decode_part_stream(session, part, num_parts, latents)` decodes a video that arrives in parts (the
windows of a diffusion-forcing job) through a decode session kept on this replica: the Wan VAE's
causal cache carries over from part to part, so the frames are those of one decode of all the
latents, and memory does not grow with the video. The session is opened by part 0 and closed by
the last part; one left idle for `SESSION_IDLE_S` (its job went away) is dropped. Every part of a
session must reach the replica that holds it: true with one VAE replica (the default); with several,
a part that lands elsewhere fails with a clear error (sticky routing is not done yet).

It also encodes: `encode` (the frames of a video to extend) and `i2v_condition` (an I2V job's image
latents) run the VAE's encoder; hence the class name, while the Serve name stays the one users'
configs, dashboards and scripts already use."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time

import numpy as np
import ray
from ray import serve

from serve.config import LeversConfig, LivenessConfig, ModelConfig
from serve.contracts import DecodedFrames, ProgressEvent
from serve.runtime.faults import chaos_pause, inject_fault
from serve.pipeline.vae_decode import (
    CausalDecodeSession, is_tiled, iter_decode, to_float_frames, video_to_uint8,
)
from serve.errors import StageError, StageOutOfMemory
from serve.pipeline.levers import LiveLevers, apply_levers, lever_state
from serve.pipeline.loading import resolve_subfolder, torch_device, torch_dtype
from serve.runtime.replica import CallerWatch, replica_id, setup_replica_logging
from serve.runtime.deadlines import OverdueCalls
from serve.stages import VAE
from serve.runtime.threads import apply_torch_threads

logger = logging.getLogger(__name__)
STAGE = "vae"
SESSION_IDLE_S = 900.0  # a decode session (diffusion forcing) unused this long is dropped


@serve.deployment(name=VAE.deployment)
class VAECodec:
    def __init__(self, model: dict, levers: dict | None = None, fault: str | None = None,
                 liveness: dict | None = None, chaos_delay_s: float = 0.0, torch_threads: int | None = None):
        import torch
        from diffusers import AutoencoderKLWan

        setup_replica_logging()
        self.liveness = LivenessConfig.model_validate(liveness or {})
        self._callers = CallerWatch(self.liveness.caller_check_interval_s)
        self._calls = OverdueCalls()  # check_health fails while one is past its deadline
        self.model_cfg = ModelConfig.model_validate(model)
        levers_cfg = LeversConfig.model_validate(levers or {})
        # live levers from reconfigure(), applied before the next decode
        self.live = LiveLevers(STAGE, levers_cfg, apply=self._apply_tiling, boundary="the next decode")
        self.device = torch_device(self.model_cfg)
        self.torch_threads = apply_torch_threads(torch_threads, self.device, STAGE)
        self._torch = torch
        self.vae = AutoencoderKLWan.from_pretrained(
            resolve_subfolder(self.model_cfg, "vae"), torch_dtype=torch_dtype(self.model_cfg.vae_dtype)
        ).to(self.device).eval()
        apply_levers(None, self.vae, levers_cfg)  # VAE tiling when switched on
        self.fault = fault  # chaos testing only
        self.chaos_delay_s = chaos_delay_s  # chaos testing only: a pause before each decode
        self._lock = asyncio.Lock()  # one decode at a time per replica: decoding is memory-bound
        self.decodes = 0
        self._sessions: dict[str, tuple[CausalDecodeSession, float]] = {}
        self.threads_in_use: int | None = None
        self.tiled_decodes = 0
        logger.info("vae ready on %s (%s)", self.device, self.model_cfg.vae_dtype)

    def reconfigure(self, user_config: dict | None) -> None:
        """Live levers (Serve's `user_config`, `LIVE_LEVERS["vae"]`): VAE tiling and its tile size,
        in effect from the next decode (one in progress finishes as it started). A bad value raises,
        changing nothing."""
        self.live.receive(user_config)

    @property
    def levers(self) -> LeversConfig:
        return self.live.current

    def _apply_tiling(self, levers: LeversConfig) -> None:
        """Before a decode, under the decode lock (`LiveLevers.apply_pending`): switch tiling on/off
        or change the tile size."""
        if levers.vae_tiling:
            apply_levers(None, self.vae, levers)
        elif getattr(self.vae, "use_tiling", False):
            self.vae.disable_tiling()

    def _chunks(self, latents: np.ndarray, want_float: bool, stop: threading.Event | None = None):
        """DecodedFrames per decoded chunk (runs in a worker thread)."""
        self.live.apply_pending()
        self.threads_in_use = self._torch.get_num_threads()  # what torch uses in the thread that decodes
        if self.fault:
            inject_fault(self.fault)
        chaos_pause(self.chaos_delay_s)
        latents = self._torch.from_numpy(np.array(latents)).to(self.device)
        self.decodes += 1
        self.tiled_decodes += is_tiled(self.vae, latents)
        for video in iter_decode(self.vae, latents):
            if stop is not None and stop.is_set():
                return
            yield DecodedFrames(frames=video_to_uint8(video),
                                float_frames=to_float_frames(video) if want_float else None)

    def _part_chunks(self, session: CausalDecodeSession, latents: np.ndarray, want_float: bool,
                     stop: threading.Event | None = None):
        if self.fault:
            inject_fault(self.fault)
        latents = self._torch.from_numpy(np.array(latents)).to(self.device)
        for video in session.decode(latents):
            if stop is not None and stop.is_set():
                return
            yield DecodedFrames(frames=video_to_uint8(video),
                                float_frames=to_float_frames(video) if want_float else None)

    def _session(self, key: str, part: int) -> CausalDecodeSession:
        now = time.monotonic()
        for old in [k for k, (_, used) in self._sessions.items() if now - used > SESSION_IDLE_S]:
            self._sessions.pop(old)[0].close()
        if part == 0:
            if key in self._sessions:
                raise StageError(f"decode session {key!r} is already open", stage=STAGE)
            session = CausalDecodeSession(self.vae)
            self.decodes += 1
        else:
            found = self._sessions.get(key)
            if found is None or found[0].parts_done != part:
                raise StageError(f"decode session {key!r} has no part {part - 1} on this replica (expired, or "
                                 f"the replica restarted): the video cannot be continued", stage=STAGE)
            session = found[0]
        self._sessions[key] = (session, now)
        return session

    async def decode_part_stream(self, session_key: str, part: int, num_parts: int, latents,
                                 return_float: bool = False, caller: str | None = None,
                                 deadline_s: float | None = None):
        """Streaming: DecodedFrames chunks of part `part` (0-based) of `num_parts` of one video;
        the frames of all parts in order are those of `decode` of all the latents."""
        latents = await self._resolve(latents)
        async with self._lock:
            session = self._session(session_key, part)
            try:
                async for chunk in self._stream(lambda stop: self._part_chunks(session, latents, return_float, stop),
                                                latents, caller, deadline_s):
                    yield chunk
            except BaseException:
                self._sessions.pop(session_key, None)
                session.close()
                raise
            if part == num_parts - 1 or session.parts_done != part + 1:
                self._sessions.pop(session_key, None)
                session.close()

    async def _stream(self, chunks, latents, caller: str | None = None, deadline_s: float | None = None):
        """Run a chunk generator in a worker thread, yielding its chunks here as they come. A caller
        that closes the stream, or dies (`caller`, its Ray actor id), stops it after the chunk being
        decoded. `deadline_s`: the caller's deadline for the call (else the configured floor);
        check_health fails while the decode runs past it."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        done = object()

        def work() -> None:
            try:
                if stop.is_set():  # the caller went away before the decode started
                    return
                for chunk in chunks(stop):
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
            except Exception as exc:  # noqa: BLE001 - handed to the caller as a typed stage error
                loop.call_soon_threadsafe(queue.put_nowait, self._stage_error(exc, latents))
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        unwatch = self._callers.watch(caller, functools.partial(self._caller_gone, stop, queue, done))
        call = self._calls.start("decode", deadline_s or self.liveness.stage_deadline_floor_s)
        worker = loop.run_in_executor(None, work)
        try:
            while (item := await queue.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            unwatch()
            stop.set()  # the caller went away: stop after the chunk being decoded
            await asyncio.shield(worker)
            self._calls.end(call)

    def _decode(self, latents: np.ndarray, want_float: bool) -> DecodedFrames:
        parts = list(self._chunks(latents, want_float))
        return DecodedFrames(frames=np.concatenate([p.frames for p in parts]),
                             float_frames=np.concatenate([p.float_frames for p in parts]) if want_float else None)

    @staticmethod
    async def _resolve(latents):
        if isinstance(latents, list) and latents and isinstance(latents[0], ray.ObjectRef):
            latents = latents[0]
        if isinstance(latents, ray.ObjectRef):
            latents = await latents
        return latents

    def _stage_error(self, exc: BaseException, latents) -> StageError:
        if isinstance(exc, self._torch.OutOfMemoryError):
            return StageOutOfMemory(f"out of memory decoding latents {tuple(latents.shape)}", stage=STAGE)
        return StageError(f"decoding failed: {type(exc).__name__}: {exc}", stage=STAGE)

    async def decode(self, latents, return_float: bool = False) -> DecodedFrames:
        """`latents`: normalised fp32 (1, C, T, h, w) as numpy, or an ObjectRef to it."""
        latents = await self._resolve(latents)
        async with self._lock:
            try:
                return await asyncio.to_thread(self._decode, latents, return_float)
            except Exception as exc:
                raise self._stage_error(exc, latents) from exc

    async def decode_stream(self, latents, return_float: bool = False, caller: str | None = None,
                            deadline_s: float | None = None):
        """Streaming `decode` (call with `handle.options(stream=True)`): a "stage started"
        ProgressEvent, then DecodedFrames chunks in order; their concatenation is what `decode`
        returns."""
        latents = await self._resolve(latents)
        async with self._lock:
            yield ProgressEvent(type="stage", stage=STAGE, stage_status="started")
            async for chunk in self._stream(lambda stop: self._chunks(latents, return_float, stop), latents, caller,
                                            deadline_s):
                yield chunk

    # -- the other direction: conditioning latents ----------------------------------------------
    def _encode_frames(self, frames: np.ndarray) -> np.ndarray:
        from serve.pipeline.vae_encode import encode, to_model_input

        return encode(self.vae, to_model_input(frames)).cpu().numpy()

    async def encode(self, frames: np.ndarray) -> np.ndarray:
        """uint8 frames (F, H, W, 3) at the job's size -> normalised fp32 latents (1, C, (F-1)//4+1,
        H/8, W/8): an image (F = 1) as the first frame of a diffusion-forcing job, or the last
        frames of a video to extend."""
        async with self._lock:
            try:
                return await asyncio.to_thread(self._encode_frames, np.asarray(frames))
            except Exception as exc:
                raise StageError(f"encoding frames {tuple(np.shape(frames))} failed: {type(exc).__name__}: {exc}",
                                 stage=STAGE) from exc

    async def i2v_condition(self, image: np.ndarray, last_image: np.ndarray | None, num_frames: int) -> np.ndarray:
        """The conditioning an I2V model's Transformer takes beside its noise: the mask and the
        normalised latents of the image followed by blank frames (and `last_image` at the end), as
        `SkyReelsV2ImageToVideoPipeline.prepare_latents` makes them."""
        from serve.pipeline.image_conditioning import i2v_condition

        height, width = np.shape(image)[:2]
        async with self._lock:
            try:
                return await asyncio.to_thread(i2v_condition, self.vae, np.asarray(image), num_frames, height, width,
                                               None if last_image is None else np.asarray(last_image))
            except Exception as exc:
                raise StageError(f"encoding the reference image failed: {type(exc).__name__}: {exc}",
                                 stage=STAGE) from exc

    @staticmethod
    def _caller_gone(stop: threading.Event, queue: asyncio.Queue, done, died_at: float) -> None:
        logger.warning("a decode's caller is gone; stopping it")
        stop.set()
        queue.put_nowait(done)

    def stats(self) -> dict:
        """What is in effect in this replica (read from the loaded VAE) and what it has done."""
        return {"levers": lever_state(vae=self.vae), **self.live.stats(),
                "decodes": self.decodes, "tiled_decodes": self.tiled_decodes, "torch_threads": self.torch_threads,
                "torch_threads_in_use": self.threads_in_use, "replica_id": replica_id(),
                "decode_sessions": len(self._sessions)}

    def check_health(self) -> None:
        if self.vae is None:
            raise RuntimeError("vae not loaded")
        self._calls.check()  # a decode stuck past its deadline: Serve replaces this replica
