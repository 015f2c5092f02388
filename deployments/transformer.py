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

This deployment is a thin Serve shell over `serve.pipeline.scheduler.DenoiseScheduler` (tickets,
admission, the turn loop, DF slices, the scheduling stats: plain Python, tested without Serve). It
keeps what is Serve's or Ray's: the streams (one event queue per `denoise` call, fed through the
scheduler's `emit`), the held outputs (`ray.put` is the scheduler's `put`), the caller watch, LoRA
multiplexing (`_register_adapter`) and `reconfigure` (live levers, `serve.pipeline.levers.LiveLevers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import types

import ray
from ray import serve

from serve.config import LeversConfig, LivenessConfig, ModelConfig
from serve.contracts import DenoisedLatents, PromptEmbeds, ResolvedSpec
from serve.errors import GenerationCancelled, StageError
from serve.pipeline.denoise_step import job_tokens  # noqa: F401 - the one token cost (tests check it is this one)
from serve.pipeline.denoising import DenoiseLoop
from serve.pipeline.diffusion_forcing import DiffusionForcingLoop
from serve.pipeline.levers import LiveLevers, lever_state, load_transformer
from serve.runtime.deadlines import OverdueCalls, stage_deadline_s
from serve.runtime.autoscale import LOAD_METRIC, job_load
from serve.pipeline.loading import resolve_subfolder, torch_device
from serve.pipeline.scheduler import DenoiseScheduler, JobDone, Ticket
from serve.runtime.replica import CallerWatch, replica_id as _replica_id, setup_replica_logging
from serve.stages import TRANSFORMER
from serve.runtime.threads import apply_torch_threads

logger = logging.getLogger(__name__)
STAGE = "transformer"


class _Stream:
    """The deployment's side of one `denoise` call: its events, and whether its caller released the output."""

    def __init__(self):
        self.events: asyncio.Queue = asyncio.Queue()
        self.released = asyncio.Event()  # the caller is done with the output


def _request_id() -> str:
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id


class _ReleasedCallLog(logging.Filter):
    """A `denoise` call ends with its caller closing the stream once it holds the output: that is
    how the hold on the latents is released. Serve's access log calls every closed stream
    CANCELLED; for a call that had produced its output (`finished`, marked when the hold starts)
    the line says OK, so a CANCELLED line means a job was really cancelled before its output.
    Keyed by Serve's request id (the access log's `request_id`)."""

    MAX_PENDING = 4096

    def __init__(self):
        super().__init__()
        self._finished: dict[str, None] = {}

    @classmethod
    def install(cls) -> "_ReleasedCallLog":
        from ray.serve._private.constants import SERVE_LOGGER_NAME

        log = cls()
        logging.getLogger(SERVE_LOGGER_NAME).addFilter(log)
        return log

    def finished(self, request_id: str) -> None:
        if request_id:
            self._finished[request_id] = None
            while len(self._finished) > self.MAX_PENDING:
                self._finished.pop(next(iter(self._finished)))

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = getattr(record, "request_id", None)
        if request_id in self._finished and " CANCELLED " in (message := record.getMessage()):
            del self._finished[request_id]
            record.msg, record.args = message.replace(" CANCELLED ", " OK ", 1), ()
        return True


@serve.deployment(name=TRANSFORMER.deployment)
class Transformer:
    def __init__(self, model: dict, levers: dict | None = None, fault: str | None = None,
                 liveness: dict | None = None, chaos_delay_s: float = 0.0, torch_threads: int | None = None):
        setup_replica_logging()
        self._released_log = _ReleasedCallLog.install()
        from diffusers import UniPCMultistepScheduler

        self.model_cfg = ModelConfig.model_validate(model)
        levers_cfg = LeversConfig.model_validate(self._parallel_levers(levers or {}))
        self.liveness = LivenessConfig.model_validate(liveness or {})
        self._callers = CallerWatch(self.liveness.caller_check_interval_s)
        self._calls = OverdueCalls()  # check_health fails while one is past its deadline
        self.device = torch_device(self.model_cfg)
        self.torch_threads = apply_torch_threads(torch_threads, self.device, STAGE)
        # a replica over several devices (model.parallel): its workers start loading in the other
        # bundles of its placement group while it loads its own DiT (serve.pipeline.parallel)
        self.parallel = None
        if self.model_cfg.parallel.devices > 1:
            from serve.pipeline.parallel import ParallelGroup

            self.parallel = ParallelGroup(self.model_cfg.model_dump(mode="json"), levers_cfg.model_dump(mode="json"),
                                          torch_threads, self.device)
        # attention backend, fp8 and torch.compile as configured (LeverUnavailable where the hardware has none)
        transformer = load_transformer(self.model_cfg, levers_cfg, self.device,
                                       self.parallel.join if self.parallel else None)
        if self.parallel:
            transformer = self.parallel.wrap(transformer)
        scheduler = UniPCMultistepScheduler.from_pretrained(resolve_subfolder(self.model_cfg, "scheduler"))
        # T2V/I2V (request batches in lockstep, or step batches) and, on the same transformer, long video
        self.loop = DenoiseLoop(transformer, scheduler.config, self.device, fault=fault)
        self.loop.configure_step_cache(levers_cfg)
        self.df_loop = DiffusionForcingLoop(transformer, scheduler.config, self.device, fault=fault)
        # live levers from reconfigure(), applied by the scheduler between batches
        self.live = LiveLevers(STAGE, levers_cfg, apply=self.loop.configure_step_cache,
                               boundary="the next batch")
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
        self.scheduler = DenoiseScheduler(self.loop, self.df_loop, self.live, put=ray.put, emit=self._emit,
                                          adapters=self.adapters, replica=_replica_id(),
                                          chaos_delay_s=chaos_delay_s)
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._worker: asyncio.Task | None = None
        self.held_outputs = 0  # finished outputs whose stream is still open (latents kept for the VAE)
        logger.info("transformer ready on %s (%s)", self.device, self.model_cfg.dtype)

    async def _register_adapter(self, adapter_id: str) -> str:
        """Serve's multiplexed loader (wrapped in `__init__`): checks that the model has the adapter
        (`AdapterCache.find`, which looks in adapters_dir again for one added since); the weights
        load on the denoising thread, before the job's first step (`AdapterCache.activate`)."""
        from serve.pipeline.lora import UnknownAdapter

        try:
            if adapter_id not in self.adapters.adapters:  # resolving reads the disk: off the event loop
                await asyncio.to_thread(self.adapters.find, adapter_id)
        except UnknownAdapter as exc:
            raise StageError(str(exc), stage=STAGE) from exc
        except ValueError as exc:  # the config no longer resolves (a file gone from adapters_dir)
            raise StageError(f"LoRA adapter {adapter_id!r}: {exc}", stage=STAGE) from exc
        return adapter_id

    # -- live levers (Serve user_config) --------------------------------------------------------
    def reconfigure(self, user_config: dict | None) -> None:
        """Serve calls this at start and on each redeploy that changes the stage's `user_config`
        (its live levers, `serve.config.LIVE_LEVERS["transformer"]`). A bad value raises here and
        changes nothing; good values take effect at the next batch boundary (a batch in flight
        finishes with the levers it started with)."""
        self.live.receive(self._parallel_levers(user_config or {}))

    def _parallel_levers(self, levers: dict) -> dict:
        """The levers (the args' levers, or a user_config) as this replica runs them: on a replica over
        several devices, `cfg_batch` always with cfg parallel (its two groups split each cfg-batched
        forward), and no step cache (it decides on the whole sequence, which each rank holds a part of)."""
        if self.model_cfg.parallel.devices == 1:
            return levers
        if (levers.get("step_cache_threshold") or 0) > 0:
            raise ValueError(f"step_cache_threshold > 0: model {self.model_cfg.name} is split over "
                             f"{self.model_cfg.parallel.devices} devices (parallel), which the step cache cannot run")
        return {**levers, "cfg_batch": True} if self.model_cfg.parallel.cfg > 1 else levers

    @property
    def levers(self) -> LeversConfig:
        return self.live.current

    # -- request side --------------------------------------------------------------------------
    async def denoise(self, embeds: PromptEmbeds, spec: ResolvedSpec, job_id: str = "-",
                      caller: str | None = None, **conditioning):
        """`conditioning`: for a job that starts from an image or a video
        (`serve.pipeline.scheduler.CONDITIONING_INPUTS`)."""
        stream = _Stream()
        ticket = Ticket(spec=spec, embeds=embeds, job_id=job_id, conditioning=conditioning, stream=stream)
        if spec.lora is not None:
            if self.adapters is None:
                raise StageError(f"model {self.model_cfg.name} has no LoRA adapters", stage=STAGE)
            await self._register_adapter(spec.lora.name)
        unwatch = self._callers.watch(caller, functools.partial(self._caller_gone, ticket))
        self._ensure_worker()
        self.scheduler.submit(ticket)
        windows: list = []  # a DF job's window latents (refs), kept alive while this stream is open
        # the Generator's deadline for this call's work, kept here too from the batch's start (a
        # ticket waiting for a slot is not stuck work; serve.runtime.deadlines)
        call = None
        try:
            while True:
                event = await stream.events.get()
                if isinstance(event, JobDone):
                    break
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, DenoisedLatents):
                    windows.append(event.ref)
                elif event.type == "stage" and call is None:  # the batch started
                    call = self._calls.start(f"denoise of job {job_id}", self._deadline_s(spec.num_inference_steps))
                elif event.type == "step" and event.total_steps:
                    self._calls.extend_to(call, self._deadline_s(event.total_steps))
                yield event
            self._calls.end(call)  # done; holding the output is not work
            # Hold the latents (`event.ref`, or the windows') until the caller closes this stream, is
            # gone, or the hold times out; then the refs are dropped and the objects freed. The
            # caller closing the stream now is how it releases the hold: the call has finished.
            # Serve logs any closed stream CANCELLED (at once, before this generator hears of it);
            # this one's access-log line says OK (see _ReleasedCallLog).
            self._released_log.finished(_request_id())
            self.held_outputs += 1
            try:
                if event.ref is not None:
                    yield DenoisedLatents(ref=[event.ref])
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stream.released.wait(), self.liveness.output_hold_s)
            finally:
                self.held_outputs -= 1
        finally:
            # Cancelled by the caller (or finished): a job still in a batch leaves it at the
            # next step boundary; one still pending is never started.
            self._calls.end(call)
            unwatch()
            ticket.cancel()

    def _emit(self, ticket: Ticket, event) -> None:
        """The scheduler's event delivery (from the event loop or the denoising thread): to the
        ticket's stream, in order."""
        self._event_loop.call_soon_threadsafe(ticket.stream.events.put_nowait, event)

    def _deadline_s(self, steps: int) -> float:
        return stage_deadline_s(steps, self.liveness.stage_deadline_per_step_s, self.liveness.stage_deadline_floor_s)

    def _caller_gone(self, ticket: Ticket, died_at: float) -> None:
        """The caller of this job died: stop its denoising as a cancel does, end its stream."""
        logger.warning("job %s: its caller is gone; dropping it", ticket.job_id)
        ticket.cancel(caller_died_at=died_at)
        ticket.stream.released.set()
        ticket.stream.events.put_nowait(GenerationCancelled("the caller is gone", stage=STAGE))

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._event_loop = asyncio.get_running_loop()
            self._worker = self._event_loop.create_task(self.scheduler.run_forever())

    # -- observability -------------------------------------------------------------------------
    def stats(self) -> dict:
        return {**self.scheduler.stats(), "held_outputs": self.held_outputs,
                "watched_callers": self._callers.watched,
                "levers": {**lever_state(transformer=self.loop.transformer), **self.levers.live_for(STAGE)},
                **self.live.stats(), "torch_threads": self.torch_threads, "replica_id": _replica_id(),
                "parallel": {**self.model_cfg.parallel.model_dump(), "devices": self.model_cfg.parallel.devices}}

    async def parallel_stats(self) -> list[dict]:
        """A replica over several devices (model.parallel): what each rank ran, rank 0 first
        (`serve.pipeline.parallel.RankStats`); [] for a one-device replica."""
        if not self.parallel:
            return []
        return await asyncio.to_thread(self.loop.transformer.rank_stats)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics (`serve.runtime.autoscale.backlog_policy` reads them):
        this replica's waiting and running jobs in standard jobs (a job of the model's default shape
        weighs 1; a running request batch, whose tickets are out of sight here, counts 1)."""
        m = self.model_cfg
        default = (m.num_frames, m.height, m.width, m.num_inference_steps)
        tickets, batches = self.scheduler.work_in_sight()
        load = sum(job_load(t.spec.num_frames, t.spec.height, t.spec.width, t.spec.num_inference_steps,
                            default=default) for t in tickets)
        return {LOAD_METRIC: float(load + batches)}

    def check_health(self) -> None:
        if self.parallel and self.loop.transformer.broken:
            raise RuntimeError(f"transformer replica over {self.model_cfg.parallel.devices} devices: "
                               f"{self.loop.transformer.broken}")
        if self.scheduler.fatal:
            raise RuntimeError(f"transformer device unusable: {self.scheduler.fatal}")
        self._calls.check()  # a denoise stuck past its deadline: Serve replaces this replica
