"""VAEDecoder deployment: de-normalise latents (`latents * std + mean`), `vae.decode`, and
post-process to frames: uint8 (F, H, W, 3), plus the float32 [0, 1] frames when asked.

`decode_stream` yields a "stage started" `ProgressEvent`, then the frames chunk by chunk as the Wan
VAE decodes them (1 frame, then 4 per latent frame), so the Generator encodes the MP4 while the
rest is still decoding; `decode` returns them all at once. Both give exactly `vae.decode`'s frames.
A `decode_stream` whose caller (`caller=`, its Ray actor id) is gone stops after the chunk being
decoded, or before it starts."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading

import numpy as np
import ray
from ray import serve

from serve.config import LeversConfig, LivenessConfig, ModelConfig, validate_live_levers
from serve.contracts import DecodedFrames, ProgressEvent
from serve.pipeline.faults import chaos_pause, inject_fault
from serve.pipeline.vae_decode import is_tiled, iter_decode, to_float_frames, video_to_uint8
from serve.errors import StageError
from serve.pipeline.levers import apply_levers, lever_state
from serve.pipeline.loading import resolve_subfolder, torch_device, torch_dtype
from serve.pipeline.replica import CallerWatch, replica_id, setup_replica_logging
from serve.pipeline.threads import apply_torch_threads

logger = logging.getLogger(__name__)
STAGE = "vae"


@serve.deployment(name="VAEDecoder")
class VAEDecoder:
    def __init__(self, model: dict, levers: dict | None = None, fault: str | None = None,
                 liveness: dict | None = None, chaos_delay_s: float = 0.0, torch_threads: int | None = None):
        import torch
        from diffusers import AutoencoderKLWan

        setup_replica_logging()
        self._callers = CallerWatch(LivenessConfig.model_validate(liveness or {}).caller_check_interval_s)
        self.model_cfg = ModelConfig.model_validate(model)
        levers_cfg = LeversConfig.model_validate(levers or {})
        self.levers = levers_cfg
        self._next_levers: LeversConfig | None = None  # from reconfigure(), applied before the next decode
        self._levers_lock = threading.Lock()
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
        self.threads_in_use: int | None = None
        self.tiled_decodes = 0
        logger.info("vae ready on %s (%s)", self.device, self.model_cfg.vae_dtype)

    def reconfigure(self, user_config: dict | None) -> None:
        """Live levers (Serve's `user_config`, `LIVE_LEVERS["vae"]`): VAE tiling and its tile size,
        in effect from the next decode (one in progress finishes as it started). A bad value raises,
        changing nothing."""
        new = validate_live_levers(STAGE, self.levers.live_for(STAGE), user_config)
        with self._levers_lock:
            self._next_levers = new
        logger.info("live levers received (in effect from the next decode): %s", new.live_for(STAGE))

    def _apply_pending_levers(self) -> None:
        """Before a decode, under the decode lock: switch tiling on/off or change the tile size."""
        with self._levers_lock:
            new, self._next_levers = self._next_levers, None
        if new is None:
            return
        self.levers = self.levers.model_copy(update=new.live_for(STAGE))
        if self.levers.vae_tiling:
            apply_levers(None, self.vae, self.levers)
        elif getattr(self.vae, "use_tiling", False):
            self.vae.disable_tiling()
        logger.info("live levers in effect: %s", self.levers.live_for(STAGE))

    def _chunks(self, latents: np.ndarray, want_float: bool, stop: threading.Event | None = None):
        """DecodedFrames per decoded chunk (runs in a worker thread)."""
        self._apply_pending_levers()
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
            return StageError(f"out of memory decoding latents {tuple(latents.shape)}", stage=STAGE,
                              code="out_of_memory")
        return StageError(f"decoding failed: {type(exc).__name__}: {exc}", stage=STAGE)

    async def decode(self, latents, return_float: bool = False) -> DecodedFrames:
        """`latents`: normalised fp32 (1, C, T, h, w) as numpy, or an ObjectRef to it."""
        latents = await self._resolve(latents)
        async with self._lock:
            try:
                return await asyncio.to_thread(self._decode, latents, return_float)
            except Exception as exc:
                raise self._stage_error(exc, latents) from exc

    async def decode_stream(self, latents, return_float: bool = False, caller: str | None = None):
        """Streaming `decode` (call with `handle.options(stream=True)`): a "stage started"
        ProgressEvent, then DecodedFrames chunks in order; their concatenation is what `decode`
        returns."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        done = object()

        def work() -> None:
            if stop.is_set():  # the caller went away while this decode waited for the lock
                return
            try:
                for chunk in self._chunks(latents, return_float, stop):
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
            except Exception as exc:  # noqa: BLE001 - handed to the caller as a typed stage error
                loop.call_soon_threadsafe(queue.put_nowait, self._stage_error(exc, latents))
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        unwatch = self._callers.watch(caller, functools.partial(self._caller_gone, stop, queue, done))
        try:
            latents = await self._resolve(latents)
            async with self._lock:
                yield ProgressEvent(type="stage", stage=STAGE, stage_status="started")
                worker = loop.run_in_executor(None, work)
                try:
                    while (item := await queue.get()) is not done:
                        if isinstance(item, BaseException):
                            raise item
                        yield item
                finally:
                    stop.set()  # the caller went away: stop after the chunk being decoded
                    await asyncio.shield(worker)
        finally:
            unwatch()

    @staticmethod
    def _caller_gone(stop: threading.Event, queue: asyncio.Queue, done, died_at: float) -> None:
        logger.warning("a decode's caller is gone; stopping it")
        stop.set()
        queue.put_nowait(done)

    def stats(self) -> dict:
        """What is in effect in this replica (read from the loaded VAE) and what it has done."""
        return {"levers": lever_state(vae=self.vae), "levers_pending": self._next_levers is not None,
                "decodes": self.decodes, "tiled_decodes": self.tiled_decodes, "torch_threads": self.torch_threads,
                "torch_threads_in_use": self.threads_in_use, "replica_id": replica_id()}

    def check_health(self) -> None:
        if self.vae is None:
            raise RuntimeError("vae not loaded")
