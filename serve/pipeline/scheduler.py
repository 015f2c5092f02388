"""The Transformer's scheduler, in plain Python: tickets, admission, the turn loop over request
batches, step batches and diffusion-forcing slices, and the stats. No Serve and no Ray in here:
the object store (`put`) and event delivery (`emit`) are callables the deployment passes in, so
tests run it on the tiny model in milliseconds (tests/test_scheduler.py).

A ticket is one job as the deployment submitted it (`submit`). The scheduler tells the deployment
what happens to it through `emit(ticket, event)`, called on the event-loop thread or the denoising
thread (the deployment makes it thread-safe), in order:

- a "stage started" `ProgressEvent` when its denoising starts;
- one "step" `ProgressEvent` per denoising step (for DF: per transformer iteration over all windows);
- a DF job's `DenoisedLatents` per window (`put(latents)` inside);
- then exactly one end: `JobDone` (its latents' `put` ref; None for DF), or an exception
  (`GenerationCancelled` for a cancelled job, a `StageError` for a failure).

Each turn (`turn`) - levers received by `reconfigure` apply first (`LiveLevers.apply_pending`):

- request-level batching (the default): the first pending job and the later ones of its
  `request_batch_key`, within `batch_max_size` jobs and `batch_token_budget` tokens, run as one
  lockstep batch (`DenoiseLoop.run`, the engine's lockstep case) to its end; a DF job taken this
  way only starts;
- step-level batching (`levers.continuous_batching`, or while the step batch drains after it is
  switched off): waiting jobs join the `ContinuousBatch` first come first served (a DF job starts;
  the first job of another shape or adapter stops the admissions until the batch has drained),
  then ONE step of it runs;
- then one slice (`levers.df_yield_every`: a window or a step) of the running DF job whose turn it
  is (round-robin), so a short job waits at most about one slice behind a long video.

A cancel (`Ticket.cancel`, the caller's stream closed or the caller gone) takes effect at the next
step boundary; a job cancelled while it waits never starts. Model work runs through `offload`
(`asyncio.to_thread` by default), one piece at a time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import torch

from serve.config import LeversConfig
from serve.contracts import CALLER_GONE, CANCELLED, DenoisedLatents, ProgressEvent, PromptEmbeds, ResolvedSpec
from serve.errors import GenerationCancelled, StageError, StageOutOfMemory, StageUnavailable
from serve.pipeline.continuous import ContinuousBatch
from serve.pipeline.denoise_step import DenoiseJob, LoopSettings, job_tokens
from serve.pipeline.denoising import DenoiseLoop
from serve.pipeline.diffusion_forcing import DFJob, DFRun, DFSettings, DiffusionForcingLoop
from serve.pipeline.levers import LiveLevers
from serve.runtime.faults import chaos_pause

__all__ = ["CONDITIONING_INPUTS", "DenoiseScheduler", "JobDone", "Ticket"]

logger = logging.getLogger(__name__)
STAGE = "transformer"
# what a job may start from besides its prompt (numpy arrays): an I2V model's `image_embeds` and
# `condition`; a DF job's `condition_latents` (and `end_latents`)
CONDITIONING_INPUTS = frozenset({"image_embeds", "condition", "condition_latents", "end_latents"})


@dataclass
class JobDone:
    """A finished job's latents in the object store (`put`'s ref); None for a diffusion-forcing job,
    whose windows went out one by one."""

    ref: Any


@dataclass(eq=False)  # tickets are told apart by identity: comparing fields would compare numpy arrays
class Ticket:
    spec: ResolvedSpec
    embeds: PromptEmbeds
    job_id: str = "-"
    conditioning: dict = field(default_factory=dict)  # CONDITIONING_INPUTS given (None values dropped)
    stream: Any = None  # the deployment's side of the job (its event queue); opaque here
    cancelled: threading.Event = field(default_factory=threading.Event)
    steps_after_cancel: int = 0  # steps that finished after the caller cancelled (at most the one in flight)
    caller_died_at: float | None = None  # when the caller was found dead (its death time, epoch s)
    step_ends: list[float] = field(default_factory=list)  # wall time at the end of each step

    def __post_init__(self) -> None:
        self.conditioning = {k: v for k, v in self.conditioning.items() if v is not None}
        unknown = set(self.conditioning) - CONDITIONING_INPUTS
        if unknown:
            raise StageError(f"unknown conditioning inputs {sorted(unknown)}", stage=STAGE)

    def cancel(self, caller_died_at: float | None = None) -> None:
        """Stop this job at the next step boundary (or before it starts); `caller_died_at`: its
        caller is gone (the cancellation's reason)."""
        if caller_died_at is not None:
            self.caller_died_at = caller_died_at
        self.cancelled.set()

    def cancellation(self) -> dict:
        """The stats entry of this job's cancellation."""
        entry = {"job_id": self.job_id, "steps_after_cancel": self.steps_after_cancel,
                 "reason": CANCELLED if self.caller_died_at is None else CALLER_GONE}
        if self.caller_died_at is not None:
            # steps that ended after the caller died: the one in flight, plus any run before the
            # death was noticed (at most one check interval)
            entry["steps_after_caller_died"] = sum(t > self.caller_died_at for t in self.step_ends)
        return entry


@dataclass
class _DFRunning:
    """A started diffusion-forcing job between its slices."""

    ticket: Ticket
    job: DFJob
    settings: DFSettings
    run: DFRun | None = None  # made on the denoising thread at its first slice


async def _to_thread(fn: Callable, *args) -> Any:
    return await asyncio.to_thread(fn, *args)


class DenoiseScheduler:
    """Runs the submitted tickets on one transformer (`loop` for T2V/I2V, `df_loop` for diffusion
    forcing). `put(array) -> ref`: the object store; `emit(ticket, event)`: event delivery (module
    doc); `levers`: the stage's `LiveLevers` (the scheduler reads `levers.current` at each turn);
    `adapters`: the model's `AdapterCache` (LoRA) or None; `replica`: named in "started" events;
    `offload(fn, *args)`: runs model work off the event loop."""

    def __init__(self, loop: DenoiseLoop, df_loop: DiffusionForcingLoop, levers: LiveLevers, *,
                 put: Callable[[Any], Any], emit: Callable[[Ticket, Any], None], adapters=None,
                 replica: str | None = None, chaos_delay_s: float = 0.0,
                 offload: Callable[..., Awaitable[Any]] = _to_thread, clock: Callable[[], float] = time.time):
        self.loop = loop
        self.df_loop = df_loop
        self.live = levers
        self.put = put
        self.emit = emit
        self.adapters = adapters
        self.replica = replica
        self.chaos_delay_s = chaos_delay_s  # chaos testing only: a pause after each step
        self.offload = offload
        self.clock = clock
        self.fatal: str | None = None  # a CUDA error: the replica is unusable
        self._pending: list[Ticket] = []
        self._df_running: deque[_DFRunning] = deque()  # started DF jobs, in round-robin order
        self._wakeup = asyncio.Event()
        # step-level batching: the running batch, and each member's ticket
        lv = levers.current
        self.cbatch = ContinuousBatch(loop, lv.batch_token_budget, lv.batch_max_size, cfg_batch=lv.cfg_batch)
        self._cbatch_tickets: dict[int, Ticket] = {}  # id(DenoiseJob) -> its ticket
        self._cbatch_spec: ResolvedSpec | None = None  # the spec of the job that started the batch
        # stats
        self.batches_run: list[int] = []  # sizes of the batches actually run (a DF job counts 1)
        self.cancellations: deque[dict] = deque(maxlen=100)  # jobs cancelled mid-batch
        self.denoised: deque[str] = deque(maxlen=100)  # job ids whose denoising finished
        self.running = 0  # batches and DF jobs in progress (a DF job counts between its slices too)
        self.df_slices_run = 0  # DF slices (windows or steps) run
        self.df_interleaved = 0  # T2V batches (or steps) run while a DF job was part-way through
        self.continuous_joined = 0  # jobs that joined a running step batch mid-way (after its first step)
        self.continuous_max_active = 0
        self.adapter_jobs: dict[str, int] = {}  # jobs run per LoRA adapter

    @property
    def levers(self) -> LeversConfig:
        return self.live.current

    # -- the request side (event-loop thread) ---------------------------------------------------
    def submit(self, ticket: Ticket) -> None:
        """Queue a job; it starts at a later turn."""
        self._pending.append(ticket)
        self._wakeup.set()

    @property
    def idle(self) -> bool:
        return not self._pending and not self._df_running and self.cbatch.empty

    async def run_forever(self) -> None:
        while True:
            if self.idle:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self.turn()

    async def run_until_idle(self) -> None:
        """Turns until nothing is pending or running (tests, benchmarks)."""
        while not self.idle:
            await self.turn()

    # -- one turn --------------------------------------------------------------------------------
    async def turn(self) -> None:
        self.live.apply_pending()  # a batch boundary: levers changed by reconfigure() apply now
        if self.levers.continuous_batching or not self.cbatch.empty:
            self._admit_continuous()
            if not self.cbatch.empty:
                if self._df_running:
                    self.df_interleaved += 1
                await self._continuous_step()
        else:
            lv = self.levers
            if self._pending and lv.batch_max_size > 1 and lv.batch_wait_timeout_s > 0:
                await asyncio.sleep(lv.batch_wait_timeout_s)  # a gathering window: same-shape jobs join
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

    # -- admission -------------------------------------------------------------------------------
    def _take_batch(self) -> list[Ticket]:
        """Request-level batching: the first pending job and the later ones it can run in lockstep
        with, within the batch bounds (a DF job runs alone, in slices)."""
        self._pending = [t for t in self._pending if not t.cancelled.is_set()]
        if not self._pending:
            return []
        first = self._pending[0]
        if first.spec.is_diffusion_forcing:
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

    def _admit_continuous(self) -> None:
        """Waiting jobs join the step batch, first come first served: a DF job starts (it runs in its
        own slices); a job of the batch's shape within its bounds joins; the first that cannot stops
        the admissions, so the batch drains and that job starts the next one (no job waits behind
        later arrivals of another shape)."""
        cb, lv = self.cbatch, self.levers
        cb.token_budget, cb.max_size, cb.cfg_batch = lv.batch_token_budget, lv.batch_max_size, lv.cfg_batch
        if not lv.continuous_batching:
            return  # switched off: the running batch finishes, nothing joins it
        admitted: list[Ticket] = []
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
                self.emit(ticket, StageError(f"denoising refused: {exc}", stage=STAGE))
                admitted.append(ticket)
                continue
            self.continuous_joined += mid_way
            self._cbatch_tickets[id(job)] = ticket
            if len(cb.active) == 1:
                self._cbatch_spec = ticket.spec  # the batch's adapter (every member has the same)
            self.emit(ticket, self._started_event())
            admitted.append(ticket)
        if admitted:
            self._pending = [t for t in self._pending if t not in admitted]
        self.continuous_max_active = max(self.continuous_max_active, len(cb.active))

    # -- running ---------------------------------------------------------------------------------
    async def _run_batch(self, batch: list[Ticket]) -> None:
        """A request-level batch, to its end (the engine's lockstep case)."""
        spec = batch[0].spec
        jobs = [self._denoise_job(t) for t in batch]
        for ticket in batch:  # its embeddings have arrived and its denoising starts now
            self.emit(ticket, self._started_event())
        self.batches_run.append(len(batch))
        logger.info("denoising batch of %d: %s", len(batch), [t.job_id for t in batch])
        error: BaseException | None = None
        self.running += 1
        try:
            await self.offload(self._with_adapter, spec, self.loop.run, jobs, self._settings(spec))
        except GenerationCancelled:
            pass
        except Exception as exc:  # noqa: BLE001 - any model failure becomes a typed stage error
            error = self._model_error(exc, "denoising", self._where(spec, len(batch)))
        finally:
            self.running -= 1
        for ticket, job in zip(batch, jobs):
            self._deliver(ticket, job, error)

    async def _continuous_step(self) -> None:
        """One denoising step of every job in the step batch; the jobs that ended leave it."""
        cb = self.cbatch
        try:
            left = await self.offload(self._with_adapter, self._cbatch_spec, cb.step)
            error = None
        except Exception as exc:  # noqa: BLE001 - the step failed for every job in it
            left = cb.abort()
            where = self._where(self._cbatch_tickets[id(left[0])].spec, len(left)) if left else ""
            error = self._model_error(exc, "denoising", where)
        for job in left:
            self._deliver(self._cbatch_tickets.pop(id(job)), job, error)

    def _start_df(self, ticket: Ticket) -> None:
        """A diffusion-forcing job joins the running ones; the same events and end as a T2V job."""
        spec = ticket.spec

        def on_window(index: int, num_windows: int, latents) -> None:
            logger.info("[job %s] window %d/%d done (%d latent frames)", ticket.job_id, index + 1, num_windows,
                        latents.shape[2])
            self.emit(ticket, DenoisedLatents(ref=[self.put(latents)], window=index, num_windows=num_windows))

        job = DFJob(seed=spec.seed, prompt_embeds=ticket.embeds.prompt_embeds,
                    negative_prompt_embeds=ticket.embeds.negative_prompt_embeds,
                    is_cancelled=ticket.cancelled.is_set, on_step=self._on_step(ticket), on_window=on_window,
                    keep_result=False,
                    condition_latents=ticket.conditioning.get("condition_latents"),
                    end_latents=ticket.conditioning.get("end_latents"))
        settings = DFSettings.from_spec(spec, cfg_batch=self.levers.cfg_batch)
        self.emit(ticket, self._started_event())
        self.batches_run.append(1)
        logger.info("[job %s] diffusion forcing: %d frames in windows of %d", ticket.job_id, spec.num_frames,
                    spec.base_num_frames)
        self.running += 1
        self._df_running.append(_DFRunning(ticket=ticket, job=job, settings=settings))

    async def _advance_df(self, running: _DFRunning) -> bool:
        """Runs one slice of a DF job; True when it has more to run, False once it has ended
        (its end delivered)."""
        ticket, spec = running.ticket, running.ticket.spec

        def run_slice() -> bool:
            if running.run is None:
                running.run = self.df_loop.start(running.job, running.settings)
            running.run.advance(self.levers.df_yield_every)
            return running.run.finished

        error: BaseException | None = None
        try:
            finished = await self.offload(self._with_adapter, spec, run_slice)
            self.df_slices_run += 1
            if not finished:
                return True
        except GenerationCancelled as exc:
            error = exc
            self.cancellations.append(ticket.cancellation())
        except Exception as exc:  # noqa: BLE001 - any model failure becomes a typed stage error
            error = self._model_error(exc, "in diffusion forcing" if isinstance(exc, torch.OutOfMemoryError)
                                      else "diffusion forcing",
                                      f"at {spec.width}x{spec.height}, windows of {spec.base_num_frames} frames")
        self.running -= 1
        if error is not None:
            self.emit(ticket, error)
        else:
            self.denoised.append(ticket.job_id)
            self.emit(ticket, JobDone(None))  # its windows went out as they ended
        return False

    # -- a ticket as the engine sees it ------------------------------------------------------------
    def _on_step(self, ticket: Ticket) -> Callable[[int, int], None]:
        """The step callback of a ticket's job (called on the denoising thread): a "step" event, the
        step's end time, and the steps run after a cancel (at most the one in flight)."""

        def on_step(step: int, total: int) -> None:
            ticket.step_ends.append(self.clock())
            chaos_pause(self.chaos_delay_s)
            if ticket.cancelled.is_set():
                ticket.steps_after_cancel += 1
            self.emit(ticket, ProgressEvent(type="step", stage=STAGE, step=step, total_steps=total))

        return on_step

    def _denoise_job(self, ticket: Ticket) -> DenoiseJob:
        """The engine's view of a ticket: its inputs, cancel flag and step events."""
        return DenoiseJob(seed=ticket.spec.seed, prompt_embeds=ticket.embeds.prompt_embeds,
                          negative_prompt_embeds=ticket.embeds.negative_prompt_embeds,
                          is_cancelled=ticket.cancelled.is_set, on_step=self._on_step(ticket),
                          image_embeds=ticket.conditioning.get("image_embeds"),
                          condition=ticket.conditioning.get("condition"))

    def _settings(self, spec: ResolvedSpec) -> LoopSettings:
        return LoopSettings.from_spec(spec, cfg_batch=self.levers.cfg_batch)

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

    def _started_event(self) -> ProgressEvent:
        """A job's denoising starts (its embeddings have arrived), on this replica."""
        return ProgressEvent(type="stage", stage=STAGE, stage_status="started", replica=self.replica)

    def _deliver(self, ticket: Ticket, job: DenoiseJob, error: BaseException | None = None) -> None:
        """A job that left the engine: its latents, its error, or its cancellation."""
        if job.cancelled:  # dropped at a step boundary after its caller cancelled
            self.cancellations.append(ticket.cancellation())
        if error is not None:
            self.emit(ticket, error)
        elif job.cancelled or job.result is None:
            self.emit(ticket, GenerationCancelled("generation cancelled", stage=STAGE))
        else:
            self.denoised.append(ticket.job_id)
            if ticket.spec.lora is not None:
                self.adapter_jobs[ticket.spec.lora.name] = self.adapter_jobs.get(ticket.spec.lora.name, 0) + 1
            self.emit(ticket, JobDone(self.put(job.result)))

    def _model_error(self, exc: BaseException, task: str, where: str) -> StageError:
        """A model failure as the typed stage error the caller gets: "out of memory <task> <where>"
        (code out_of_memory) or "<task> failed: ..."; a CUDA error also marks the replica unusable."""
        if isinstance(exc, torch.OutOfMemoryError):
            logger.error("transformer OOM: %s", exc)
            return StageOutOfMemory(f"out of memory {task} {where}", stage=STAGE)
        logger.error("transformer failed (%s)", task, exc_info=exc)
        if getattr(exc, "replica_unusable", False):  # a device of a replica over several is gone
            self.fatal = str(exc)
            return StageUnavailable(f"the transformer replica lost a device while running this job ({exc})",
                                    stage=STAGE)
        if "CUDA error" in str(exc):
            self.fatal = str(exc)
        return StageError(f"{task} failed: {type(exc).__name__}: {exc}", stage=STAGE)

    @staticmethod
    def _where(spec: ResolvedSpec, jobs: int) -> str:
        return f"{jobs} job(s) at {spec.width}x{spec.height}, {spec.num_frames} frames"

    # -- observability -------------------------------------------------------------------------------
    def work_in_sight(self) -> tuple[list[Ticket], int]:
        """The work on this replica, for autoscaling: the tickets waiting, in the step batch and in
        DF jobs between slices, and the number of running request batches (their tickets are
        out of sight while the batch runs)."""
        tickets = [*self._pending, *(r.ticket for r in self._df_running), *self._cbatch_tickets.values()]
        batches = max(0, self.running - len(self._df_running) - (1 if self._cbatch_tickets else 0))
        return tickets, batches

    def stats(self) -> dict:
        cache, cb = self.loop.step_cache, self.cbatch
        return {"batches_run": list(self.batches_run), "pending": len(self._pending), "running": self.running,
                "steps_run": self.loop.steps_run + self.df_loop.steps_run, "cancellations": list(self.cancellations),
                "denoised": list(self.denoised),
                "df_running": len(self._df_running), "df_slices_run": self.df_slices_run,
                "df_interleaved": self.df_interleaved,
                "lora": dict(self.adapters.stats(), jobs=dict(self.adapter_jobs)) if self.adapters else None,
                "continuous": {"active": len(cb.active), "steps_run": cb.steps_run, "rows_run": cb.rows_run,
                               "joined_mid_batch": self.continuous_joined, "max_active": self.continuous_max_active},
                "step_cache": cache.stats() if cache is not None and hasattr(cache, "stats") else None}
