"""Transformer deployment: the SkyReels-V2 DiT denoising loop.

`denoise(embeds, spec)` is a streaming method: a `ProgressEvent` "stage started" when the job's
batch starts (its embeddings have arrived), one "step" `ProgressEvent` per denoising step, then
`DenoisedLatents` holding the ObjectRef of the normalised fp32 latents in the object store, so the
caller hands them straight to the VAE without copying them through itself.

The stream stays open after `DenoisedLatents`, holding the latents, until the caller closes it
(the Generator does once the VAE has started decoding them), the caller is gone, or
`liveness.output_hold_s` passes: Ray counts no borrower for a ref nested in a streamed item, so
without a live ref here the object could be freed before the VAE fetches it. An idle replica holds
no output (`stats()["held_outputs"]`).

`caller=` (the caller's Ray actor id) lets the replica notice a caller that died: its job is
dropped at the next step boundary (or before it starts), as if it had cancelled.

Requests of the same shape (size, frames, steps, guidance, shift) that arrive together run as one
batch, bounded by `levers.batch_max_size` and a token budget. A caller that cancels its stream is
dropped from its batch at the next step boundary; nothing is decoded for it.

With `levers.continuous_batching` the batching is step-level instead (`serve.pipeline.continuous`):
a waiting job of the running batch's shape (size, frames; its own steps, guidance, shift and seed)
joins it at the next step boundary, within `batch_max_size` jobs and `batch_token_budget` tokens,
and leaves it as soon as its own schedule ends (or its caller cancels); admission is first come
first served, so a job of another shape stops the admissions until the batch has drained. Each
job's latents equal those of the job run alone (CPU fp32, within 1e-5). A running DF job gets one
slice between two steps of the continuous batch.

A diffusion-forcing job (long video, `spec.is_diffusion_forcing`) runs alone, window by window
(`serve.pipeline.diffusion_forcing`), with one "step" event per transformer iteration counted over
all its windows, and one `DenoisedLatents` per window (`window`, `num_windows`) holding the latents
that window adds, as soon as they are final (the loop keeps only the overlap the next window reads;
the windows' refs stay alive while the stream is open). It does not hold the
replica to its end: it runs in slices (`levers.df_yield_every`: a window or a step), and between two
slices the worker runs what else is waiting - one batch of pending jobs, then the next running DF
job's slice (round-robin) - so a short job submitted during a long one waits at most about one
slice. The DF job's state stays in its `DFRun` between slices, so its latents are exactly those of
an uninterrupted run.

All three (request batches, the continuous batch, DF slices) run the same denoising step
(`serve.pipeline.denoise_step`), so `levers.cfg_batch` (conditional and unconditional rows in one
transformer call) applies to each, DF included; `job_tokens` there is the one token cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
import types
from collections import deque
from dataclasses import dataclass, field

import ray
from ray import serve

from serve.config import LeversConfig, LivenessConfig, ModelConfig
from serve.pipeline.continuous import ContinuousBatch
from serve.pipeline.denoise_step import job_tokens
from serve.pipeline.denoising import DenoiseJob, DenoiseLoop, LoopSettings
from serve.pipeline.diffusion_forcing import DFJob, DFRun, DFSettings, DiffusionForcingLoop
from serve.runtime.autoscale import LOAD_METRIC, job_load
from serve.runtime.faults import chaos_pause
from serve.errors import GenerationCancelled, StageError, StageOutOfMemory
from serve.contracts import (
    CALLER_GONE, CANCELLED, DenoisedLatents, ProgressEvent, PromptEmbeds, ResolvedSpec,
)
from serve.pipeline.levers import PendingLevers, apply_levers, lever_state
from serve.pipeline.loading import resolve_subfolder, torch_device, torch_dtype
from serve.runtime.replica import CallerWatch, replica_id as _replica_id, setup_replica_logging
from serve.runtime.threads import apply_torch_threads

logger = logging.getLogger(__name__)
STAGE = "transformer"


@dataclass
class _Output:
    """A finished job's latents in the object store (handed from the batch to its stream); None for
    a diffusion-forcing job, whose windows went out one by one."""

    ref: ray.ObjectRef | None


@dataclass(eq=False)  # tickets are told apart by identity: comparing fields would compare numpy arrays
class _Ticket:
    spec: ResolvedSpec
    embeds: PromptEmbeds
    job_id: str
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    steps_after_cancel: int = 0  # steps that finished after the caller cancelled (at most the one in flight)
    released: asyncio.Event = field(default_factory=asyncio.Event)  # the caller is done with the output
    caller_died_at: float | None = None  # when the caller was found dead (its death time, epoch s)
    step_ends: list[float] = field(default_factory=list)  # wall time at the end of each step
    # what a job starts from besides its prompt (numpy arrays): an I2V model's `image_embeds` and
    # `condition`; a DF job's `condition_latents` (and `end_latents`)
    conditioning: dict = field(default_factory=dict)


@dataclass
class _DFRunning:
    """A started diffusion-forcing job between its slices."""

    ticket: _Ticket
    job: DFJob
    settings: DFSettings
    run: DFRun | None = None  # made on the worker thread at its first slice


@serve.deployment(name="Transformer")
class Transformer:
    def __init__(self, model: dict, levers: dict | None = None, fault: str | None = None,
                 liveness: dict | None = None, chaos_delay_s: float = 0.0, torch_threads: int | None = None):
        import torch

        setup_replica_logging()
        from diffusers import SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

        self.model_cfg = ModelConfig.model_validate(model)
        self.levers = LeversConfig.model_validate(levers or {})
        self.liveness = LivenessConfig.model_validate(liveness or {})
        self._callers = CallerWatch(self.liveness.caller_check_interval_s)
        self.device = torch_device(self.model_cfg)
        self.torch_threads = apply_torch_threads(torch_threads, self.device, STAGE)
        self._torch = torch
        self._pending_levers = PendingLevers(STAGE)  # from reconfigure(), applied between batches
        transformer = SkyReelsV2Transformer3DModel.from_pretrained(
            resolve_subfolder(self.model_cfg, "transformer"), torch_dtype=torch_dtype(self.model_cfg.dtype))
        transformer = transformer.to(self.device).eval()
        scheduler = UniPCMultistepScheduler.from_pretrained(resolve_subfolder(self.model_cfg, "scheduler"))
        apply_levers(transformer, None, self.levers)  # torch.compile when switched on
        self.loop = DenoiseLoop(transformer, scheduler.config, self.device, fault=fault)
        self._set_step_cache(self.levers)
        # LoRA adapters (model.lora): loaded into this transformer on first use, switched per batch on
        # the denoising thread; Serve's model multiplexing routes a request naming an adapter to a
        # replica that has it (`denoise` registers the adapter with the replica's multiplexer)
        self.adapters = None
        if self.model_cfg.lora.enabled:
            from serve.pipeline.lora import AdapterCache

            self.adapters = AdapterCache.from_config(transformer, self.model_cfg)
            # Serve's method form of `@serve.multiplexed`, applied here because the limit is the model's
            self._register_adapter = types.MethodType(serve.multiplexed(
                max_num_models_per_replica=self.model_cfg.lora.max_loaded)(type(self)._register_adapter), self)
        self.adapter_jobs: dict[str, int] = {}  # jobs run per adapter on this replica (observability)
        # long video: the same transformer, window by window (no step cache, no batching)
        self.df_loop = DiffusionForcingLoop(transformer, scheduler.config, self.device, fault=fault)
        self.chaos_delay_s = chaos_delay_s  # chaos testing only: a pause after each step
        self._pending: list[_Ticket] = []
        self._df_running: deque[_DFRunning] = deque()  # started DF jobs, in round-robin order
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._fatal: str | None = None
        self.held_outputs = 0  # finished outputs whose stream is still open (latents kept for the VAE)
        self.batches_run: list[int] = []  # sizes of the batches actually run
        self.cancellations: deque[dict] = deque(maxlen=100)  # jobs cancelled mid-batch, for stats()
        self.denoised: deque[str] = deque(maxlen=100)  # job ids whose denoising finished, for stats()
        self.running = 0  # batches and DF jobs in progress (a DF job counts between its slices too)
        self.df_slices_run = 0  # DF slices (windows or steps) run
        self.df_interleaved = 0  # T2V batches run while a DF job was part-way through (fair sharing)
        # step-level batching (levers.continuous_batching): the running batch, and each member's ticket
        self._cbatch = ContinuousBatch(self.loop, self.levers.batch_token_budget, self.levers.batch_max_size,
                                       cfg_batch=self.levers.cfg_batch)
        self._cbatch_tickets: dict[int, _Ticket] = {}  # id(DenoiseJob) -> its ticket
        self._cbatch_spec: ResolvedSpec | None = None  # the spec of the job that started the batch
        self.continuous_joined = 0  # jobs that joined a running continuous batch mid-way (after its first step)
        self.continuous_max_active = 0
        logger.info("transformer ready on %s (%s)", self.device, self.model_cfg.dtype)

    async def _register_adapter(self, adapter_id: str) -> str:
        """Serve's multiplexed loader (wrapped in `__init__`): checks that the model has the adapter; the
        weights load on the denoising thread, before the job's first step (`AdapterCache.activate`)."""
        if adapter_id not in self.adapters.adapters:
            # the request layer lists adapters_dir on each request (serve.pipeline.lora.adapter_catalog):
            # an adapter added there since this replica started is found by resolving again
            from serve.pipeline.lora import resolve_adapters

            try:
                found = await asyncio.to_thread(resolve_adapters, self.model_cfg)
            except ValueError as exc:
                raise StageError(f"LoRA adapter {adapter_id!r}: {exc}", stage=STAGE) from exc
            self.adapters.adapters = found  # one reference swap: the denoising thread reads it
        if adapter_id not in self.adapters.adapters:
            raise StageError(f"unknown LoRA adapter {adapter_id!r}", stage=STAGE)
        return adapter_id

    # -- live levers (Serve user_config) --------------------------------------------------------
    def reconfigure(self, user_config: dict | None) -> None:
        """Serve calls this at start and on each redeploy that changes the stage's `user_config`
        (its live levers, `serve.config.LIVE_LEVERS["transformer"]`). A bad value raises here and
        changes nothing; good values take effect at the next batch boundary (a batch in flight
        finishes with the levers it started with)."""
        new = self._pending_levers.receive(self.levers, user_config)
        logger.info("live levers received (in effect from the next batch): %s", new.live_for(STAGE))

    def _apply_pending_levers(self) -> None:
        """Called by the worker between batches (the denoising thread is idle): swap in the new levers."""
        levers = self._pending_levers.take(self.levers)
        if levers is None:
            return
        self.levers = levers
        self._set_step_cache(self.levers)
        logger.info("live levers in effect: %s", self.levers.live_for(STAGE))

    def _set_step_cache(self, levers: LeversConfig) -> None:
        """Create, retune or drop the DenoiseLoop's step cache (`serve.pipeline.step_cache.make_step_cache`;
        threshold 0: off). A change of backend or of cache-dit's knobs builds a new one."""
        from serve.pipeline.step_cache import make_step_cache

        cache = self.loop.step_cache
        kind = (levers.step_cache_backend, levers.cache_dit_fn, levers.cache_dit_bn, levers.cache_dit_taylorseer)
        if levers.step_cache_threshold <= 0:
            self.loop.step_cache = None
        elif (cache is not None and levers.step_cache_backend == "first_block"
              and getattr(self, "_step_cache_kind", None) == kind):
            cache.threshold = float(levers.step_cache_threshold)
        else:
            self.loop.step_cache = make_step_cache(levers)
        self._step_cache_kind = kind

    # -- request side --------------------------------------------------------------------------
    async def denoise(self, embeds: PromptEmbeds, spec: ResolvedSpec, job_id: str = "-",
                      caller: str | None = None, **conditioning):
        """`conditioning`: for a job that starts from an image or a video (see `_Ticket`)."""
        unknown = set(conditioning) - {"image_embeds", "condition", "condition_latents", "end_latents"}
        if unknown:
            raise StageError(f"unknown conditioning inputs {sorted(unknown)}", stage=STAGE)
        if spec.lora is not None:
            if self.adapters is None:
                raise StageError(f"model {self.model_cfg.name} has no LoRA adapters", stage=STAGE)
            await self._register_adapter(spec.lora.name)
        ticket = _Ticket(spec=spec, embeds=embeds, job_id=job_id,
                         conditioning={k: v for k, v in conditioning.items() if v is not None})
        unwatch = self._callers.watch(caller, functools.partial(self._caller_gone, ticket))
        self._ensure_worker()
        self._pending.append(ticket)
        self._wakeup.set()
        windows: list = []  # a DF job's window latents (refs), kept alive while this stream is open
        try:
            while True:
                event = await ticket.events.get()
                if isinstance(event, _Output):
                    break
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, DenoisedLatents):
                    windows.append(event.ref)
                yield event
            # Hold the latents (`event.ref`, or the windows') until the caller closes this stream, is
            # gone, or the hold times out; then the refs are dropped and the objects freed.
            self.held_outputs += 1
            try:
                if event.ref is not None:
                    yield DenoisedLatents(ref=[event.ref])
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(ticket.released.wait(), self.liveness.output_hold_s)
            finally:
                self.held_outputs -= 1
        finally:
            # Cancelled by the caller (or finished): a job still in a batch leaves it at the
            # next step boundary; one still pending is never started.
            unwatch()
            ticket.cancelled.set()

    def _caller_gone(self, ticket: _Ticket, died_at: float) -> None:
        """The caller of this job died: stop its denoising as a cancel does, end its stream."""
        logger.warning("job %s: its caller is gone; dropping it", ticket.job_id)
        ticket.caller_died_at = died_at
        ticket.cancelled.set()
        ticket.released.set()
        ticket.events.put_nowait(GenerationCancelled("the caller is gone", stage=STAGE))

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
        if first.spec.is_diffusion_forcing:  # a DF job runs alone (in slices: `_advance_df`)
            self._pending = self._pending[1:]
            return [first]
        key = first.spec.request_batch_key()
        batch, budget = [first], self.levers.batch_token_budget - job_tokens(first.spec)
        for ticket in self._pending[1:]:
            if len(batch) >= self.levers.batch_max_size:
                break
            cost = job_tokens(ticket.spec)
            if ticket.spec.request_batch_key() == key and cost <= budget:
                batch.append(ticket)
                budget -= cost
        self._pending = [t for t in self._pending if t not in batch]
        return batch

    async def _run_forever(self) -> None:
        # Each turn: one batch of the pending jobs (a DF job taken from them only starts), then one
        # slice of the running DF job whose turn it is. With `df_yield_every` "job" a slice is the
        # whole job, as if DF jobs were not sliced at all. With continuous batching a turn runs one
        # denoising step of the continuous batch (waiting jobs of its shape join it first).
        while True:
            if not self._pending and not self._df_running and self._cbatch.empty:
                self._wakeup.clear()
                await self._wakeup.wait()
            self._apply_pending_levers()  # a batch boundary: levers changed by reconfigure() apply now
            if self.levers.continuous_batching or not self._cbatch.empty:
                self._admit_continuous()
                if not self._cbatch.empty:
                    if self._df_running:
                        self.df_interleaved += 1
                    await self._continuous_step()
            else:
                if self._pending and self.levers.batch_max_size > 1 and self.levers.batch_wait_timeout_s > 0:
                    await asyncio.sleep(self.levers.batch_wait_timeout_s)  # let same-shape jobs gather
                batch = self._take_batch()
                if batch and batch[0].spec.is_diffusion_forcing:
                    self._start_df(batch[0])
                elif batch:
                    if self._df_running:
                        self.df_interleaved += 1
                    await self._run_batch(batch)
            if self._df_running:
                running = self._df_running.popleft()
                if await self._advance_df(running):
                    self._df_running.append(running)

    # -- shared by request-level and step-level batching ----------------------------------------
    def _on_step(self, ticket: _Ticket):
        """The step callback of a ticket's job (called on the denoising thread): a "step" event to
        its stream, the step's end time, and the steps run after a cancel (at most the one in flight)."""
        loop = asyncio.get_running_loop()

        def on_step(step: int, total: int) -> None:
            ticket.step_ends.append(time.time())
            chaos_pause(self.chaos_delay_s)
            if ticket.cancelled.is_set():
                ticket.steps_after_cancel += 1
            loop.call_soon_threadsafe(ticket.events.put_nowait, ProgressEvent(
                type="step", stage=STAGE, step=step, total_steps=total))

        return on_step

    def _denoise_job(self, ticket: _Ticket) -> DenoiseJob:
        """The loop's view of a ticket: its inputs, cancel flag and step events."""
        return DenoiseJob(seed=ticket.spec.seed, prompt_embeds=ticket.embeds.prompt_embeds,
                          negative_prompt_embeds=ticket.embeds.negative_prompt_embeds,
                          is_cancelled=ticket.cancelled.is_set, on_step=self._on_step(ticket),
                          image_embeds=ticket.conditioning.get("image_embeds"),
                          condition=ticket.conditioning.get("condition"))

    def _with_adapter(self, spec: ResolvedSpec | None, fn, *args):
        """On the denoising thread: switch the transformer to the spec's LoRA adapter (loading it on
        first use), or to no adapter, then run `fn`. A batch only ever holds jobs of one adapter."""
        if self.adapters is not None:
            if spec is not None and spec.lora is not None:
                try:
                    self.adapters.activate(spec.lora.name, spec.lora.scale)
                except ValueError as exc:  # unknown, unresolvable or unloadable weights
                    raise StageError(f"LoRA adapter {spec.lora.name!r}: {exc}", stage=STAGE) from exc
            else:
                self.adapters.deactivate()
        return fn(*args)

    @staticmethod
    def _started_event() -> ProgressEvent:
        """A job's denoising starts (its embeddings have arrived), on this replica."""
        return ProgressEvent(type="stage", stage=STAGE, stage_status="started", replica=_replica_id())

    def _settings(self, spec: ResolvedSpec) -> LoopSettings:
        return LoopSettings.from_spec(spec, cfg_batch=self.levers.cfg_batch)

    def _model_error(self, exc: BaseException, task: str, where: str) -> StageError:
        """A model failure as the typed stage error the caller gets: "out of memory <task> <where>"
        (code out_of_memory) or "<task> failed: ..."; a CUDA error also marks the replica unhealthy."""
        if isinstance(exc, self._torch.OutOfMemoryError):
            logger.error("transformer OOM: %s", exc)
            return StageOutOfMemory(f"out of memory {task} {where}", stage=STAGE)
        logger.error("transformer failed (%s)", task, exc_info=exc)
        if "CUDA error" in str(exc):
            self._fatal = str(exc)
        return StageError(f"{task} failed: {type(exc).__name__}: {exc}", stage=STAGE)

    @staticmethod
    def _where(spec: ResolvedSpec, jobs: int) -> str:
        return f"{jobs} job(s) at {spec.width}x{spec.height}, {spec.num_frames} frames"

    def _deliver(self, ticket: _Ticket, job: DenoiseJob, error: BaseException | None = None) -> None:
        """A job that left the loop: its latents, its error, or its cancellation to its stream."""
        if job.cancelled:  # dropped from the loop at a step boundary after its caller cancelled
            self.cancellations.append(self._cancellation(ticket))
        if error is not None:
            ticket.events.put_nowait(error)
        elif job.cancelled or job.result is None:
            ticket.events.put_nowait(GenerationCancelled("generation cancelled", stage=STAGE))
        else:
            self.denoised.append(ticket.job_id)
            if ticket.spec.lora is not None:
                self.adapter_jobs[ticket.spec.lora.name] = self.adapter_jobs.get(ticket.spec.lora.name, 0) + 1
            ticket.events.put_nowait(_Output(ray.put(job.result)))

    async def _run_batch(self, batch: list[_Ticket]) -> None:
        spec = batch[0].spec
        jobs = [self._denoise_job(t) for t in batch]
        for ticket in batch:  # its embeddings have arrived and its denoising starts now
            ticket.events.put_nowait(self._started_event())
        self.batches_run.append(len(batch))
        logger.info("denoising batch of %d: %s", len(batch), [t.job_id for t in batch])
        error: BaseException | None = None
        self.running += 1
        try:
            await asyncio.to_thread(self._with_adapter, spec, self.loop.run, jobs, self._settings(spec))
        except GenerationCancelled:
            pass
        except Exception as exc:  # noqa: BLE001 - any model failure becomes a typed stage error
            error = self._model_error(exc, "denoising", self._where(spec, len(batch)))
        finally:
            self.running -= 1
        for ticket, job in zip(batch, jobs):
            self._deliver(ticket, job, error)

    # -- step-level (continuous) batching --------------------------------------------------------
    def _admit_continuous(self) -> None:
        """Waiting jobs join the continuous batch, first come first served: a DF job starts (it runs
        in its own slices); a job of the batch's shape within its bounds joins; the first that
        cannot stops the admissions, so the batch drains and that job starts the next one (no
        job waits behind later arrivals of another shape)."""
        cb = self._cbatch
        cb.token_budget, cb.max_size, cb.cfg_batch = (self.levers.batch_token_budget, self.levers.batch_max_size,
                                                      self.levers.cfg_batch)
        if not self.levers.continuous_batching:
            return  # switched off: the running batch finishes, nothing joins it
        admitted: list[_Ticket] = []
        for ticket in self._pending:
            if ticket.cancelled.is_set():
                admitted.append(ticket)  # dropped: never started
                continue
            if ticket.spec.is_diffusion_forcing:
                self._start_df(ticket)
                admitted.append(ticket)
                continue
            job, settings = self._denoise_job(ticket), self._settings(ticket.spec)
            if cb.refusal(job, settings) is not None or (
                    not cb.empty and ticket.spec.lora_key != self._cbatch_spec.lora_key):
                break  # another shape or another adapter: it starts the next batch
            mid_way = cb.started
            try:
                cb.join(job, settings)
            except ValueError as exc:  # inputs the transformer cannot run (checked by the engine)
                ticket.events.put_nowait(StageError(f"denoising refused: {exc}", stage=STAGE))
                admitted.append(ticket)
                continue
            self.continuous_joined += mid_way
            self._cbatch_tickets[id(job)] = ticket
            if len(cb.active) == 1:
                self._cbatch_spec = ticket.spec  # the batch's adapter (every member has the same)
            ticket.events.put_nowait(self._started_event())
            admitted.append(ticket)
        if admitted:
            self._pending = [t for t in self._pending if t not in admitted]
        self.continuous_max_active = max(self.continuous_max_active, len(cb.active))

    async def _continuous_step(self) -> None:
        """One denoising step of every job in the continuous batch; the jobs that ended leave it."""
        cb = self._cbatch
        try:
            left = await asyncio.to_thread(self._with_adapter, self._cbatch_spec, cb.step)
            error = None
        except Exception as exc:  # noqa: BLE001 - the step failed for every job in it
            left = cb.abort()
            where = self._where(self._cbatch_tickets[id(left[0])].spec, len(left)) if left else ""
            error = self._model_error(exc, "denoising", where)
        for job in left:
            self._deliver(self._cbatch_tickets.pop(id(job)), job, error)

    def _start_df(self, ticket: _Ticket) -> None:
        """A diffusion-forcing job joins the running ones; the same events and result as a T2V job."""
        loop = asyncio.get_running_loop()
        spec = ticket.spec

        def on_window(index: int, num_windows: int, latents) -> None:
            logger.info("[job %s] window %d/%d done (%d latent frames)", ticket.job_id, index + 1, num_windows,
                        latents.shape[2])
            out = DenoisedLatents(ref=[ray.put(latents)], window=index, num_windows=num_windows)
            loop.call_soon_threadsafe(ticket.events.put_nowait, out)

        job = DFJob(seed=spec.seed, prompt_embeds=ticket.embeds.prompt_embeds,
                    negative_prompt_embeds=ticket.embeds.negative_prompt_embeds,
                    is_cancelled=ticket.cancelled.is_set, on_step=self._on_step(ticket), on_window=on_window,
                    keep_result=False,
                    condition_latents=ticket.conditioning.get("condition_latents"),
                    end_latents=ticket.conditioning.get("end_latents"))
        settings = DFSettings.from_spec(spec, cfg_batch=self.levers.cfg_batch)
        ticket.events.put_nowait(self._started_event())
        self.batches_run.append(1)
        logger.info("[job %s] diffusion forcing: %d frames in windows of %d", ticket.job_id, spec.num_frames,
                    spec.base_num_frames)
        self.running += 1
        self._df_running.append(_DFRunning(ticket=ticket, job=job, settings=settings))

    async def _advance_df(self, running: _DFRunning) -> bool:
        """Runs one slice of a DF job; True when it has more to run, False once it has ended
        (its result, error or cancellation delivered)."""
        ticket, spec = running.ticket, running.ticket.spec

        def run_slice() -> bool:
            if running.run is None:
                running.run = self.df_loop.start(running.job, running.settings)
            running.run.advance(self.levers.df_yield_every)
            return running.run.finished

        error: BaseException | None = None
        try:
            finished = await asyncio.to_thread(self._with_adapter, spec, run_slice)
            self.df_slices_run += 1
            if not finished:
                return True
        except GenerationCancelled as exc:
            error = exc
            self.cancellations.append(self._cancellation(ticket))
        except Exception as exc:  # noqa: BLE001 - any model failure becomes a typed stage error
            error = self._model_error(exc, "in diffusion forcing" if isinstance(exc, self._torch.OutOfMemoryError)
                                      else "diffusion forcing",
                                      f"at {spec.width}x{spec.height}, windows of {spec.base_num_frames} frames")
        self.running -= 1
        if error is not None:
            ticket.events.put_nowait(error)
        else:
            self.denoised.append(ticket.job_id)
            ticket.events.put_nowait(_Output(None))  # its windows went out as they ended
        return False

    @staticmethod
    def _cancellation(ticket: _Ticket) -> dict:
        entry = {"job_id": ticket.job_id, "steps_after_cancel": ticket.steps_after_cancel,
                 "reason": CANCELLED if ticket.caller_died_at is None else CALLER_GONE}
        if ticket.caller_died_at is not None:
            # steps that ended after the caller died: the one in flight, plus any run before the
            # death was noticed (at most one check interval)
            entry["steps_after_caller_died"] = sum(t > ticket.caller_died_at for t in ticket.step_ends)
        return entry

    # -- observability -------------------------------------------------------------------------
    def stats(self) -> dict:
        cache = self.loop.step_cache
        return {"batches_run": list(self.batches_run), "pending": len(self._pending), "running": self.running,
                "steps_run": self.loop.steps_run + self.df_loop.steps_run, "cancellations": list(self.cancellations),
                "denoised": list(self.denoised), "held_outputs": self.held_outputs,
                "watched_callers": self._callers.watched,
                "df_running": len(self._df_running), "df_slices_run": self.df_slices_run,
                "df_interleaved": self.df_interleaved,
                "lora": dict(self.adapters.stats(), jobs=dict(self.adapter_jobs)) if self.adapters else None,
                "continuous": {"active": len(self._cbatch.active), "steps_run": self._cbatch.steps_run,
                               "rows_run": self._cbatch.rows_run, "joined_mid_batch": self.continuous_joined,
                               "max_active": self.continuous_max_active},
                "levers": {**lever_state(transformer=self.loop.transformer), **self.levers.live_for(STAGE)},
                "levers_pending": self._pending_levers.pending, "reconfigures": self._pending_levers.received,
                "torch_threads": self.torch_threads, "replica_id": _replica_id(),
                "step_cache": cache.stats() if cache is not None and hasattr(cache, "stats") else None}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics (`serve.runtime.autoscale.backlog_policy` reads them):
        this replica's waiting and running jobs in standard jobs (a job of the model's default shape
        weighs 1; a running request batch, whose tickets are out of sight here, counts 1)."""
        m = self.model_cfg
        default = (m.num_frames, m.height, m.width, m.num_inference_steps)
        tickets = [*self._pending, *(r.ticket for r in self._df_running), *self._cbatch_tickets.values()]
        load = sum(job_load(t.spec.num_frames, t.spec.height, t.spec.width, t.spec.num_inference_steps,
                            default=default) for t in tickets)
        batches = max(0, self.running - len(self._df_running) - (1 if self._cbatch_tickets else 0))
        return {LOAD_METRIC: float(load + batches)}

    def check_health(self) -> None:
        if self._fatal:
            raise RuntimeError(f"transformer device unusable: {self._fatal}")
