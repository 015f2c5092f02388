"""The T2V/I2V denoising engine. Step-level continuous batching: jobs of the same shape join a
running denoising batch at the next step boundary and leave it as soon as they finish (or are
cancelled), each with its own schedule; its lockstep case is request-level batching
(`DenoiseLoop.run`: the jobs start together, share one schedule and leave together).

`ContinuousBatch` keeps one entry per job:

- its own UniPC scheduler (`DenoiseLoop.make_scheduler(flow_shift)`, `set_timesteps(steps)`), so
  its own `num_inference_steps`, `flow_shift`, timesteps and step index;
- its own noise (`initial_latents(seed, ...)`), prompt embeddings, guidance scale (guidance <= 1:
  no unconditional row at all), I2V condition and image embeddings, `is_cancelled` and `on_step`.

`step()` runs ONE denoising step of every active job: one transformer call over the concatenated
latents of all jobs with a per-row timestep tensor of shape (B,) (SkyReelsV2Transformer3DModel embeds
each row's timestep on its own: `temb` is (B, dim), and `scale_shift_table + temb` broadcasts per
row), and one more call for the unconditional rows of the jobs with guidance > 1 - or a single call
with both when `cfg_batch`. Then per job: the guidance mix and that job's `scheduler.step` on its own
slice. Every op of the transformer is per-sample (attention within a video, no attention mask, text
already padded to a fixed length), so a job's latents equal those of `DenoiseLoop.run([job], ...)`
up to the rounding of batched matmuls (CPU fp32: max |d| <= 1e-5, see
tests/test_continuous_batching.py).

What "the same shape" means (`step_batch_key`): width, height, num_frames; I2V or T2V; for I2V the
number of images (first, or first and last) and the image token shape; and the prompt embeddings'
(length, dim). The text encoder pads every prompt to `max_sequence_length` (512 in this codebase,
`text_encoding.encode_prompts`), so the length is per model; a job whose length differs is refused,
not padded.

Lockstep (`lockstep=True`) is request-level batching, what `DenoiseLoop.run` runs: every job joins
before the first step, all share one schedule (steps, guidance, shift: `lockstep_key`), so they
step together and leave together, and the step cache (`loop.step_cache`) is used: it is reset at
the first step and follows the rows that a cancel drops (`select`).

Not used here, by design:
- the step cache in a step-level (not lockstep) batch: its reuse decisions and residuals are per
  batch and per schedule, which a batch whose members sit at different steps does not have.
  Step-level batching and the step cache are exclusive - the caller picks one; the engine's
  forwards bypass the cache (`use_step_cache=False`) even if the loop has one.
- diffusion forcing (per-frame timesteps, windows): `serve.pipeline.diffusion_forcing`.

The step is `serve.pipeline.denoise_step`'s: the job's tensors
(`prepare_job`), its scheduler (`make_scheduler`), the guider (`ClassifierFreeGuidance`, per-row
guidance scales) over the loop's `TransformerForward`, so faults (`loop.fault`) are raised from the
same model call. An exception in
`step()` leaves every active job in the batch (nothing was changed for any of them before the model
calls); the caller fails them and calls `abort()` to empty the batch.

`loop.steps_run` grows by one per engine step (one per `step()` that ran the model), whatever the
number of jobs in it, as `DenoiseLoop.run` counts one per step of its batch.

Not thread-safe: `join`, `step` and `abort` must be called from one thread (or serialised by the
caller); `join` during a `step` raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from serve.pipeline.denoise_step import (
    ClassifierFreeGuidance, DenoiseJob, JobTensors, LoopSettings, ModelInput, drop_cancelled, is_i2v_batch,
    job_tokens, prepare_job,
)

__all__ = ["ContinuousBatch", "job_tokens", "lockstep_key", "shape_key", "step_batch_key"]


@dataclass(eq=False)
class _Running:
    """One job inside the continuous batch: its tensors, its scheduler and where it is."""

    job: DenoiseJob
    settings: LoopSettings
    scheduler: object
    timesteps: torch.Tensor
    tensors: JobTensors  # latents (1, C, T, h, w) fp32, embeddings, I2V condition and images
    index: int = 0  # steps done
    tokens: int = 0  # what it counts against the token budget

    @property
    def total(self) -> int:
        return len(self.timesteps)

    @property
    def t(self) -> torch.Tensor:
        return self.timesteps[self.index]


def step_batch_key(job: DenoiseJob, settings: LoopSettings) -> tuple:
    """What must be equal for two jobs to share a transformer call at one step (see the module doc):
    their tensors' shapes, not their schedules (`ResolvedSpec.request_batch_key` is the stricter key
    of request-level batching, where the jobs also share one schedule)."""
    prompt = tuple(np.shape(job.prompt_embeds)[1:])
    i2v = job.condition is not None
    images = tuple(np.shape(job.image_embeds)) if job.image_embeds is not None else None
    return (settings.width, settings.height, settings.num_frames, i2v, images, prompt)


shape_key = step_batch_key  # the former name


def lockstep_key(job: DenoiseJob, settings: LoopSettings) -> tuple:
    """What must be equal for two jobs to run in lockstep (request-level batching, one schedule):
    `step_batch_key` and the schedule (steps, guidance, shift) - `ResolvedSpec.request_batch_key`
    on the engine's side."""
    return (*step_batch_key(job, settings), settings.num_inference_steps, settings.guidance_scale,
            settings.flow_shift)


class ContinuousBatch:
    """A denoising batch that jobs of one shape join and leave between steps.

    `token_budget`: the most DiT tokens the active jobs may sum to (`job_tokens`: x2 with guidance;
    None: no bound); an empty batch takes any one job, however large, as request batching does.
    `max_size`: the most jobs at once. `cfg_batch`: the conditional and unconditional rows go
    through the transformer in one call (`LoopSettings.cfg_batch` of the joining jobs is ignored:
    the batch has one way of calling the model). `lockstep`: request-level batching (module doc):
    jobs of one schedule join before the first step, and the loop's step cache is used.
    `loop`: the `serve.pipeline.denoising.DenoiseLoop` it runs on (its transformer forward, scheduler
    config, device, dtype and step counter)."""

    def __init__(self, loop, token_budget: int | None, max_size: int, cfg_batch: bool = False,
                 lockstep: bool = False):
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.loop = loop
        self.token_budget = token_budget
        self.max_size = max_size
        self.cfg_batch = cfg_batch
        self.lockstep = lockstep
        self._running: list[_Running] = []
        self._key: tuple | None = None
        self._stepping = False
        self.steps_run = 0  # engine steps (model calls per step: 1 or 2)
        self.rows_run = 0  # transformer rows over all steps (a CFG job counts 2 per step)

    # -- membership ----------------------------------------------------------------------------
    @property
    def active(self) -> list[DenoiseJob]:
        return [r.job for r in self._running]

    @property
    def empty(self) -> bool:
        return not self._running

    @property
    def started(self) -> bool:
        """Whether a job of the batch has done a step already (one joining now joins mid-way)."""
        return any(r.index > 0 for r in self._running)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self._running)

    @property
    def key(self) -> tuple | None:
        """The shape of the running batch (None when empty)."""
        return self._key if self._running else None

    def refusal(self, job: DenoiseJob, settings: LoopSettings) -> str | None:
        """Why `job` cannot join now (None: it can)."""
        if self._running:
            if self._key_of(job, settings) != self._key:
                return ("a different shape or schedule from the lockstep batch" if self.lockstep
                        else "a different shape from the running batch")
            if self.lockstep and self.started:
                return "a lockstep batch takes its jobs before its first step"
            if len(self._running) >= self.max_size:
                return f"the batch is full ({self.max_size} jobs)"
            if self.token_budget is not None and self.tokens + job_tokens(settings) > self.token_budget:
                return f"over the token budget ({self.tokens} + {job_tokens(settings)} > {self.token_budget})"
        return None

    def can_join(self, job: DenoiseJob, settings: LoopSettings) -> bool:
        return self.refusal(job, settings) is None

    def join(self, job: DenoiseJob, settings: LoopSettings) -> None:
        """Adds `job` to the batch; it runs its first step at the next `step()`. Raises ValueError
        when it cannot join (`refusal`) or the transformer cannot run it (as `DenoiseLoop.run`)."""
        if self._stepping:
            raise RuntimeError("a job joins between steps, not during one")
        why = self.refusal(job, settings)
        if why is not None:
            raise ValueError(f"the job cannot join: {why}")
        loop = self.loop
        i2v = is_i2v_batch(loop.transformer.config, [job])
        tensors = prepare_job(loop.transformer.config, job, settings, i2v, loop.device, loop.dtype)
        scheduler = loop.make_scheduler(settings.flow_shift, settings.num_inference_steps)
        if not self._running:
            self._key = self._key_of(job, settings)
        self._running.append(_Running(job=job, settings=settings, scheduler=scheduler,
                                      timesteps=scheduler.timesteps, tensors=tensors, tokens=job_tokens(settings)))

    def _key_of(self, job: DenoiseJob, settings: LoopSettings) -> tuple:
        return lockstep_key(job, settings) if self.lockstep else step_batch_key(job, settings)

    def abort(self) -> list[DenoiseJob]:
        """Empties the batch (after a failed step): the jobs that were in it, without results."""
        jobs = [r.job for r in self._running]
        self._running = []
        self._key = None
        return jobs

    # -- stepping ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[DenoiseJob]:
        """One denoising step of every active job; returns the jobs that left the batch: cancelled
        ones (`cancelled=True`, checked before the step, no result) and the ones whose last step this
        was (`result`: fp32 numpy (1, C, T, H/8, W/8), as `DenoiseLoop.run`)."""
        if self._stepping:
            raise RuntimeError("step() is not re-entrant")
        self._stepping = True
        try:
            return self._step()
        finally:
            self._stepping = False

    @property
    def _step_cache(self):
        """The loop's step cache when this batch uses it (lockstep only), else None."""
        return self.loop.step_cache if self.lockstep else None

    def _step(self) -> list[DenoiseJob]:
        cache = self._step_cache
        if cache is not None and self._running and not self.started:
            cache.reset(num_steps=self._running[0].total)  # a lockstep batch's first step
        gone, kept = drop_cancelled(self._running, lambda r: r.job)
        left: list[DenoiseJob] = [r.job for r in gone]
        keep = [self._running[k] for k in kept]
        if gone and keep and cache is not None:
            cache.select(torch.tensor(kept, device=self.loop.device))  # the cache's rows follow the batch's
        self._running = keep
        if not keep:
            self._key = None
            return left

        noise_preds = self._predict(keep)
        for k, r in enumerate(keep):
            r.tensors.latents = r.scheduler.step(noise_preds[k:k + 1], r.t, r.tensors.latents, return_dict=False)[0]
            r.index += 1
        self.loop.steps_run += 1
        self.steps_run += 1
        for r in keep:
            r.job.on_step(r.index, r.total)

        still = []
        for r in keep:
            if r.index >= r.total:
                r.job.result = r.tensors.latents.float().cpu().numpy().copy()
                left.append(r.job)
            else:
                still.append(r)
        self._running = still
        if not still:
            self._key = None
        return left

    def _predict(self, running: list[_Running]) -> torch.Tensor:
        """The guided noise prediction of every job for its own timestep, (B, C, T, h, w)."""
        loop = self.loop
        i2v = running[0].tensors.condition is not None
        parts = [r.tensors for r in running]
        latents = torch.cat([torch.cat([p.latents, p.condition], dim=1) if i2v else p.latents for p in parts])
        inp = ModelInput(latents=latents.to(loop.dtype), timestep=torch.stack([r.t for r in running]),
                         image_embeds=torch.cat([p.images for p in parts]) if i2v else None)
        scales = [r.settings.guidance_scale for r in running]
        cond = torch.cat([p.cond for p in parts])
        guided = [p.uncond for p, g in zip(parts, scales) if g > 1.0]
        uncond = torch.cat(guided) if guided else None
        guider = ClassifierFreeGuidance(batch_cond_uncond=self.cfg_batch)
        noise_pred = guider(loop.forward, inp, cond, uncond, scales, use_step_cache=self._step_cache is not None)
        self.rows_run += len(running) + len(guided)
        return noise_pred
