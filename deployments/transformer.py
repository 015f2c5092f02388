"""Transformer deployment: the SkyReels-V2 DiT denoising loop.

`denoise(embeds, spec)` is a streaming method: a `ProgressEvent` "stage started" when the job's
batch starts (its embeddings have arrived), one "step" `ProgressEvent` per denoising step, then
`DenoisedLatents` holding the ObjectRef of the normalised fp32 latents in the object store, so the
caller hands them straight to the VAE without copying them through itself.

Requests of the same shape (size, frames, steps, guidance, shift) that arrive together run as one
batch, bounded by `levers.batch_max_size` and a token budget. A caller that cancels its stream is
dropped from its batch at the next step boundary; nothing is decoded for it.

A diffusion-forcing job (long video, `spec.is_diffusion_forcing`) runs alone, window by window
(`serve.pipeline.diffusion_forcing`), with one "step" event per transformer iteration counted over
all its windows, and one `DenoisedLatents` per window (`window`, `num_windows`) holding the latents
that window adds, as soon as they are final; the loop keeps only the overlap the next window reads.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import ray
from ray import serve

from serve.config import LeversConfig, ModelConfig
from serve.pipeline.denoising import DenoiseJob, DenoiseLoop, LoopSettings
from serve.pipeline.diffusion_forcing import DFJob, DFSettings, DiffusionForcingLoop
from serve.errors import GenerationCancelled, StageError
from serve.contracts import DenoisedLatents, ProgressEvent, PromptEmbeds, ResolvedSpec, dit_tokens
from serve.pipeline.levers import apply_levers, lever_state
from serve.pipeline.loading import resolve_subfolder, torch_device, torch_dtype

logger = logging.getLogger(__name__)
STAGE = "transformer"
_DONE = object()
# The latents' ObjectRef travels inside a streamed event, and Ray does not count a borrower for a
# ref nested in a generator item: without a live ref here the object can be freed before the VAE
# fetches it. Each output is held this long (or until this many newer ones exist).
OUTPUT_HOLD_S = 600.0
OUTPUT_HOLD_MAX = 64


def job_tokens(spec: ResolvedSpec) -> int:
    """DiT sequence length of one job (x2 with guidance): what the token budget counts."""
    return dit_tokens(spec.num_frames, spec.height, spec.width) * (2 if spec.do_cfg else 1)


@dataclass
class _Ticket:
    spec: ResolvedSpec
    embeds: PromptEmbeds
    job_id: str
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    steps_after_cancel: int = 0  # steps that finished after the caller cancelled (at most the one in flight)


@serve.deployment(name="Transformer")
class Transformer:
    def __init__(self, model: dict, levers: dict | None = None, fault: str | None = None):
        import torch
        from diffusers import SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

        self.model_cfg = ModelConfig.model_validate(model)
        self.levers = LeversConfig.model_validate(levers or {})
        self.device = torch_device(self.model_cfg)
        self._torch = torch
        transformer = SkyReelsV2Transformer3DModel.from_pretrained(
            resolve_subfolder(self.model_cfg, "transformer"), torch_dtype=torch_dtype(self.model_cfg.dtype))
        transformer = transformer.to(self.device).eval()
        scheduler = UniPCMultistepScheduler.from_pretrained(resolve_subfolder(self.model_cfg, "scheduler"))
        step_cache = None
        if self.levers.step_cache_threshold > 0:
            from serve.pipeline.step_cache import StepCache

            step_cache = StepCache(threshold=self.levers.step_cache_threshold)
        apply_levers(transformer, None, self.levers)  # torch.compile when switched on
        self.loop = DenoiseLoop(transformer, scheduler.config, self.device, step_cache=step_cache, fault=fault)
        # long video: the same transformer, window by window (no step cache, no batching)
        self.df_loop = DiffusionForcingLoop(transformer, scheduler.config, self.device, fault=fault)
        self._pending: list[_Ticket] = []
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._fatal: str | None = None
        self._held_outputs: deque[tuple[float, ray.ObjectRef]] = deque()
        self.batches_run: list[int] = []  # sizes of the batches actually run
        self.cancellations: deque[dict] = deque(maxlen=100)  # jobs cancelled mid-batch, for stats()
        self.running = 0
        logger.info("transformer ready on %s (%s)", self.device, self.model_cfg.dtype)

    # -- request side --------------------------------------------------------------------------
    async def denoise(self, embeds: PromptEmbeds, spec: ResolvedSpec, job_id: str = "-"):
        ticket = _Ticket(spec=spec, embeds=embeds, job_id=job_id)
        self._ensure_worker()
        self._pending.append(ticket)
        self._wakeup.set()
        try:
            while True:
                event = await ticket.events.get()
                if event is _DONE:
                    return
                if isinstance(event, BaseException):
                    raise event
                yield event
        finally:
            # Cancelled by the caller (or finished): a job still in a batch leaves it at the
            # next step boundary; one still pending is never started.
            ticket.cancelled.set()

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._run_forever())

    # -- worker side ---------------------------------------------------------------------------
    def _take_batch(self) -> list[_Ticket]:
        self._pending = [t for t in self._pending if not t.cancelled.is_set()]
        if not self._pending:
            return []
        first = self._pending[0]
        if first.spec.is_diffusion_forcing:  # a DF job runs alone
            self._pending = self._pending[1:]
            return [first]
        key = first.spec.shape_key()
        batch, budget = [first], self.levers.batch_token_budget - job_tokens(first.spec)
        for ticket in self._pending[1:]:
            if len(batch) >= self.levers.batch_max_size:
                break
            cost = job_tokens(ticket.spec)
            if ticket.spec.shape_key() == key and cost <= budget:
                batch.append(ticket)
                budget -= cost
        self._pending = [t for t in self._pending if t not in batch]
        return batch

    async def _run_forever(self) -> None:
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.levers.batch_max_size > 1 and self.levers.batch_wait_timeout_s > 0:
                await asyncio.sleep(self.levers.batch_wait_timeout_s)  # let same-shape jobs gather
            batch = self._take_batch()
            if batch:
                await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Ticket]) -> None:
        loop = asyncio.get_running_loop()
        spec = batch[0].spec
        if spec.is_diffusion_forcing:
            return await self._run_df(batch[0])

        def step_callback(ticket: _Ticket):
            def on_step(step: int, total: int) -> None:
                if ticket.cancelled.is_set():
                    ticket.steps_after_cancel += 1
                loop.call_soon_threadsafe(ticket.events.put_nowait, ProgressEvent(
                    type="step", stage=STAGE, step=step, total_steps=total))
            return on_step

        jobs = [DenoiseJob(seed=t.spec.seed, prompt_embeds=t.embeds.prompt_embeds,
                           negative_prompt_embeds=t.embeds.negative_prompt_embeds,
                           is_cancelled=t.cancelled.is_set, on_step=step_callback(t)) for t in batch]
        settings = LoopSettings(width=spec.width, height=spec.height, num_frames=spec.num_frames,
                                num_inference_steps=spec.num_inference_steps,
                                guidance_scale=spec.guidance_scale, flow_shift=spec.flow_shift,
                                cfg_batch=self.levers.cfg_batch)
        for ticket in batch:  # its embeddings have arrived and its denoising starts now
            ticket.events.put_nowait(ProgressEvent(type="stage", stage=STAGE, stage_status="started"))
        self.batches_run.append(len(batch))
        logger.info("denoising batch of %d: %s", len(batch), [t.job_id for t in batch])
        error: BaseException | None = None
        self.running += 1
        try:
            await asyncio.to_thread(self.loop.run, jobs, settings)
        except GenerationCancelled:
            pass
        except self._torch.OutOfMemoryError as exc:
            error = StageError(f"out of memory denoising {len(batch)} job(s) at {spec.width}x{spec.height}, "
                               f"{spec.num_frames} frames", stage=STAGE, code="out_of_memory")
            logger.error("transformer OOM: %s", exc)
        except Exception as exc:  # noqa: BLE001 - any model failure becomes a typed stage error
            logger.exception("transformer failed")
            error = StageError(f"denoising failed: {type(exc).__name__}: {exc}", stage=STAGE)
            if "CUDA error" in str(exc):
                self._fatal = str(exc)
        finally:
            self.running -= 1
        for ticket, job in zip(batch, jobs):
            if job.cancelled:  # dropped from the loop at a step boundary after its caller cancelled
                self.cancellations.append({"job_id": ticket.job_id, "steps_after_cancel": ticket.steps_after_cancel})
            if error is not None:
                ticket.events.put_nowait(error)
            elif job.cancelled or job.result is None:
                ticket.events.put_nowait(GenerationCancelled("generation cancelled", stage=STAGE))
            else:
                ticket.events.put_nowait(DenoisedLatents(ref=[self._hold(ray.put(job.result))]))
                ticket.events.put_nowait(_DONE)

    async def _run_df(self, ticket: _Ticket) -> None:
        """One diffusion-forcing job, window by window: each window's final latents go out as it ends."""
        loop = asyncio.get_running_loop()
        spec = ticket.spec

        def on_step(step: int, total: int) -> None:
            loop.call_soon_threadsafe(ticket.events.put_nowait, ProgressEvent(
                type="step", stage=STAGE, step=step, total_steps=total))

        def on_window(index: int, num_windows: int, latents) -> None:
            logger.info("[job %s] window %d/%d done (%d latent frames)", ticket.job_id, index + 1, num_windows,
                        latents.shape[2])
            out = DenoisedLatents(ref=[self._hold(ray.put(latents))], window=index, num_windows=num_windows)
            loop.call_soon_threadsafe(ticket.events.put_nowait, out)

        job = DFJob(seed=spec.seed, prompt_embeds=ticket.embeds.prompt_embeds,
                    negative_prompt_embeds=ticket.embeds.negative_prompt_embeds,
                    is_cancelled=ticket.cancelled.is_set, on_step=on_step, on_window=on_window, keep_result=False)
        settings = DFSettings(width=spec.width, height=spec.height, num_frames=spec.num_frames,
                              num_inference_steps=spec.num_inference_steps, guidance_scale=spec.guidance_scale,
                              flow_shift=spec.flow_shift, fps=spec.fps, base_num_frames=spec.base_num_frames,
                              overlap_history=spec.overlap_history, ar_step=spec.ar_step,
                              causal_block_size=spec.causal_block_size,
                              addnoise_condition=spec.addnoise_condition)
        ticket.events.put_nowait(ProgressEvent(type="stage", stage=STAGE, stage_status="started"))
        self.batches_run.append(1)
        logger.info("[job %s] diffusion forcing: %d frames in windows of %d", ticket.job_id, spec.num_frames,
                    spec.base_num_frames)
        error: BaseException | None = None
        self.running += 1
        try:
            await asyncio.to_thread(self.df_loop.run, job, settings)
        except GenerationCancelled as exc:
            error = exc
            self.cancellations.append({"job_id": ticket.job_id, "steps_after_cancel": 0})
        except self._torch.OutOfMemoryError as exc:
            error = StageError(f"out of memory in diffusion forcing at {spec.width}x{spec.height}, windows of "
                               f"{spec.base_num_frames} frames", stage=STAGE, code="out_of_memory")
            logger.error("transformer OOM: %s", exc)
        except Exception as exc:  # noqa: BLE001 - any model failure becomes a typed stage error
            logger.exception("transformer failed (diffusion forcing)")
            error = StageError(f"diffusion forcing failed: {type(exc).__name__}: {exc}", stage=STAGE)
            if "CUDA error" in str(exc):
                self._fatal = str(exc)
        finally:
            self.running -= 1
        # after the windows' call_soon_threadsafe puts: the loop runs callbacks in order
        loop.call_soon_threadsafe(ticket.events.put_nowait, error if error is not None else _DONE)

    def _hold(self, ref: ray.ObjectRef) -> ray.ObjectRef:
        now = time.monotonic()
        self._held_outputs.append((now, ref))
        while self._held_outputs and (len(self._held_outputs) > OUTPUT_HOLD_MAX
                                      or now - self._held_outputs[0][0] > OUTPUT_HOLD_S):
            self._held_outputs.popleft()
        return ref

    # -- observability -------------------------------------------------------------------------
    def stats(self) -> dict:
        cache = self.loop.step_cache
        return {"batches_run": list(self.batches_run), "pending": len(self._pending), "running": self.running,
                "steps_run": self.loop.steps_run + self.df_loop.steps_run, "cancellations": list(self.cancellations), "levers": lever_state(transformer=self.loop.transformer),
                "step_cache": cache.stats() if cache is not None and hasattr(cache, "stats") else None}

    def check_health(self) -> None:
        if self._fatal:
            raise RuntimeError(f"transformer device unusable: {self._fatal}")
