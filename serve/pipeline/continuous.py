"""Step-level continuous batching: jobs of the same shape join a running denoising batch at the next
step boundary and leave it as soon as they finish (or are cancelled), each with its own schedule.

`DenoiseLoop.run` batches at the request level: the jobs of a batch start together and share one
scheduler, so they must share steps, guidance and shift, and a job arriving a step later waits for
the whole batch to end. `ContinuousBatch` keeps one entry per job instead:

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

What "the same shape" means (`shape_key`): width, height, num_frames; I2V or T2V; for I2V the
number of images (first, or first and last) and the image token shape; and the prompt embeddings'
(length, dim). The text encoder pads every prompt to `max_sequence_length` (512 in this codebase,
`text_encoding.encode_prompts`), so the length is per model; a job whose length differs is refused,
not padded.

Not used here, by design:
- the step cache (`loop.step_cache`): its reuse decisions and residuals are per batch and per
  schedule, which a batch whose members sit at different steps does not have. Continuous batching
  and the step cache are exclusive - the caller picks one; the engine's forwards bypass the cache
  (`DenoiseLoop._forward(..., use_step_cache=False)`) even if the loop has one.
- diffusion forcing (per-frame timesteps, windows): `serve.pipeline.diffusion_forcing`.

Faults (`loop.fault`) are raised from the same `DenoiseLoop._forward` as in `run`. An exception in
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

from serve.contracts import dit_tokens
from serve.pipeline.denoising import DenoiseJob, DenoiseLoop, LoopSettings, initial_latents, latent_shape


@dataclass(eq=False)
class _Running:
    """One job inside the continuous batch: its tensors, its scheduler and where it is."""

    job: DenoiseJob
    settings: LoopSettings
    scheduler: object
    timesteps: torch.Tensor
    latents: torch.Tensor  # (1, C, T, h, w), fp32
    cond: torch.Tensor  # (1, L, D), loop dtype
    uncond: torch.Tensor | None  # (1, L, D) when cfg
    condition: torch.Tensor | None = None  # I2V: (1, 4 + C, T, h, w), fp32
    images: torch.Tensor | None = None  # I2V: (n, tokens, D), loop dtype
    index: int = 0  # steps done
    tokens: int = 0  # what it counts against the token budget

    @property
    def cfg(self) -> bool:
        return self.settings.guidance_scale > 1.0

    @property
    def total(self) -> int:
        return len(self.timesteps)

    @property
    def t(self) -> torch.Tensor:
        return self.timesteps[self.index]


def job_tokens(settings: LoopSettings) -> int:
    """DiT sequence length of one job, x2 with guidance: what the token budget counts."""
    cfg = settings.guidance_scale > 1.0
    return dit_tokens(settings.num_frames, settings.height, settings.width) * (2 if cfg else 1)


def shape_key(job: DenoiseJob, settings: LoopSettings) -> tuple:
    """What must be equal for two jobs to share a transformer call (see the module doc)."""
    prompt = tuple(np.shape(job.prompt_embeds)[1:])
    i2v = job.condition is not None
    images = tuple(np.shape(job.image_embeds)) if job.image_embeds is not None else None
    return (settings.width, settings.height, settings.num_frames, i2v, images, prompt)


class ContinuousBatch:
    """A denoising batch that jobs of one shape join and leave between steps.

    `token_budget`: the most DiT tokens the active jobs may sum to (`job_tokens`: x2 with guidance);
    an empty batch takes any one job, however large, as `Transformer._take_batch` does.
    `max_size`: the most jobs at once. `cfg_batch`: the conditional and unconditional rows go
    through the transformer in one call (`LoopSettings.cfg_batch` of the joining jobs is ignored:
    the batch has one way of calling the model)."""

    def __init__(self, loop: DenoiseLoop, token_budget: int, max_size: int, cfg_batch: bool = False):
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.loop = loop
        self.token_budget = token_budget
        self.max_size = max_size
        self.cfg_batch = cfg_batch
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
            if shape_key(job, settings) != self._key:
                return "a different shape from the running batch"
            if len(self._running) >= self.max_size:
                return f"the batch is full ({self.max_size} jobs)"
            if self.tokens + job_tokens(settings) > self.token_budget:
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
        i2v = loop._check_jobs([job])
        cfg = settings.guidance_scale > 1.0
        if cfg and job.negative_prompt_embeds is None:
            raise ValueError("a job with guidance > 1 needs negative_prompt_embeds")
        tcfg = loop.transformer.config
        channels = tcfg.out_channels if i2v else tcfg.in_channels
        shape = latent_shape(channels, settings.num_frames, settings.height, settings.width)
        latents = initial_latents(job.seed, shape, loop.device)
        cond = torch.from_numpy(np.array(job.prompt_embeds)).to(loop.device, loop.dtype)
        uncond = None
        if cfg:
            uncond = torch.from_numpy(np.array(job.negative_prompt_embeds)).to(loop.device, loop.dtype)
        condition = images = None
        if i2v:
            condition = torch.from_numpy(np.array(job.condition, dtype=np.float32)).to(loop.device)
            if condition.shape[2:] != latents.shape[2:]:
                raise ValueError(f"condition is {tuple(condition.shape[2:])} latents, the video {tuple(shape[2:])}")
            images = torch.from_numpy(np.array(job.image_embeds)).to(loop.device, loop.dtype)
        scheduler = loop.make_scheduler(settings.flow_shift)
        scheduler.set_timesteps(settings.num_inference_steps, device=loop.device)
        if not self._running:
            self._key = shape_key(job, settings)
        self._running.append(_Running(job=job, settings=settings, scheduler=scheduler,
                                      timesteps=scheduler.timesteps, latents=latents, cond=cond, uncond=uncond,
                                      condition=condition, images=images, tokens=job_tokens(settings)))

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

    def _step(self) -> list[DenoiseJob]:
        left: list[DenoiseJob] = []
        keep = []
        for r in self._running:
            if r.job.is_cancelled():
                r.job.cancelled = True
                left.append(r.job)
            else:
                keep.append(r)
        self._running = keep
        if not keep:
            self._key = None
            return left

        noise_preds = self._predict(keep)
        for r, noise_pred in zip(keep, noise_preds):
            r.latents = r.scheduler.step(noise_pred, r.t, r.latents, return_dict=False)[0]
            r.index += 1
        self.loop.steps_run += 1
        self.steps_run += 1
        for r in keep:
            r.job.on_step(r.index, r.total)

        still = []
        for r in keep:
            if r.index >= r.total:
                r.job.result = r.latents.float().cpu().numpy().copy()
                left.append(r.job)
            else:
                still.append(r)
        self._running = still
        if not still:
            self._key = None
        return left

    def _predict(self, running: list[_Running]) -> list[torch.Tensor]:
        """Each job's guided noise prediction for its current timestep, (1, C, T, h, w) each."""
        loop = self.loop
        i2v = running[0].condition is not None
        n = len(running)
        cfg_rows = [r for r in running if r.cfg]

        def inputs(rows: list[_Running]):
            if i2v:
                latent_input = torch.cat([torch.cat([r.latents, r.condition], dim=1) for r in rows]).to(loop.dtype)
                image_input = torch.cat([r.images for r in rows])
            else:
                latent_input = torch.cat([r.latents for r in rows]).to(loop.dtype)
                image_input = None
            timestep = torch.stack([r.t for r in rows])
            return latent_input, timestep, image_input

        latent_input, timestep, image_input = inputs(running)
        cond = torch.cat([r.cond for r in running])
        uncond_pred = None
        if cfg_rows and self.cfg_batch:
            u_latent, u_timestep, u_images = inputs(cfg_rows)
            uncond = torch.cat([r.uncond for r in cfg_rows])
            both = loop._forward(torch.cat([latent_input, u_latent]), torch.cat([timestep, u_timestep]),
                                 torch.cat([cond, uncond]), "cfg",
                                 image_embeds=torch.cat([image_input, u_images]) if i2v else None,
                                 use_step_cache=False)
            self.rows_run += n + len(cfg_rows)
            cond_pred, uncond_pred = both[:n], both[n:]
        else:
            cond_pred = loop._forward(latent_input, timestep, cond, "cond", image_embeds=image_input,
                                      use_step_cache=False)
            self.rows_run += n
            if cfg_rows:
                if len(cfg_rows) == n:  # the same rows: reuse the inputs
                    u_latent, u_timestep, u_images = latent_input, timestep, image_input
                else:
                    u_latent, u_timestep, u_images = inputs(cfg_rows)
                uncond = torch.cat([r.uncond for r in cfg_rows])
                uncond_pred = loop._forward(u_latent, u_timestep, uncond, "uncond", image_embeds=u_images,
                                            use_step_cache=False)
                self.rows_run += len(cfg_rows)

        preds = []
        u = 0
        for k, r in enumerate(running):
            pred = cond_pred[k:k + 1]
            if r.cfg:
                noise_uncond = uncond_pred[u:u + 1]
                u += 1
                pred = noise_uncond + r.settings.guidance_scale * (pred - noise_uncond)
            preds.append(pred)
        return preds
