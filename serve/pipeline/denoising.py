"""The SkyReels-V2 T2V/I2V denoising loop (flow-matching UniPC + classifier-free guidance), written to
match `SkyReelsV2Pipeline.__call__` step for step, for one job or a batch of same-shape jobs.

A job carrying `image_embeds` and `condition` is image-to-video, step for step as
`SkyReelsV2ImageToVideoPipeline.__call__`: the noise has the VAE's 16 channels, every transformer
call gets `cat([latents, condition], dim=1)` and `encoder_hidden_states_image=image_embeds` (the
same image embeddings for the conditional and the unconditional call). Both inputs come from
`serve.pipeline.image_conditioning`.

There is one T2V/I2V engine, `serve.pipeline.continuous.ContinuousBatch`; `DenoiseLoop.run` is its
lockstep case (request-level batching): the jobs join before the first step, share one schedule
(steps, guidance, shift) and the step cache, and leave together. `DenoiseLoop` holds what the
engine runs on: the transformer behind its `TransformerForward` (fault hook, step cache), the
scheduler config, the device and dtype, and the step counter.

Used by the `Transformer` deployment (through `serve.pipeline.scheduler`) and, in process, by the
benchmarks. No Serve in here. The VAE side (de-normalise, decode, frames) is
`serve.pipeline.vae_decode`.
"""

from __future__ import annotations

import copy

import torch

from serve.errors import GenerationCancelled
from serve.pipeline.continuous import ContinuousBatch
from serve.pipeline.denoise_step import (
    DenoiseJob, LoopSettings, TransformerForward, initial_latents, is_i2v_batch, latent_shape, make_scheduler,
    model_dtype,
)

__all__ = ["DenoiseJob", "DenoiseLoop", "LoopSettings", "clone_scheduler_config", "initial_latents",
           "latent_shape"]


class DenoiseLoop:
    """Holds the transformer (behind `serve.pipeline.denoise_step.TransformerForward`) and the
    scheduler config; `run` denoises a batch of jobs in lockstep."""

    def __init__(self, transformer, scheduler_config: dict, device: torch.device, step_cache=None,
                 fault: str | None = None):
        self.transformer = transformer
        self.scheduler_config = dict(scheduler_config)
        self.device = device
        self.dtype = model_dtype(transformer)
        # the model call: chaos fault ("oom" | "error"), optional step cache
        # (serve.pipeline.step_cache.make_step_cache(levers)), shared with the continuous engine
        self.forward = TransformerForward(transformer, fault=fault, step_cache=step_cache)
        self.steps_run = 0  # denoising steps executed over the loop's lifetime (observability)
        self._step_cache_kind: tuple | None = None

    @property
    def fault(self) -> str | None:
        return self.forward.fault

    @property
    def step_cache(self):
        return self.forward.step_cache

    @step_cache.setter
    def step_cache(self, cache) -> None:
        self.forward.step_cache = cache

    def configure_step_cache(self, levers) -> None:
        """Create, retune or drop the step cache the levers ask for
        (`serve.pipeline.step_cache.make_step_cache`; threshold 0: off). A change of backend or of
        cache-dit's knobs builds a new one; a new threshold for the first-block cache retunes it."""
        from serve.pipeline.step_cache import make_step_cache

        cache = self.step_cache
        kind = (levers.step_cache_backend, levers.cache_dit_fn, levers.cache_dit_bn, levers.cache_dit_taylorseer)
        if levers.step_cache_threshold <= 0:
            self.step_cache = None
        elif cache is not None and levers.step_cache_backend == "first_block" and self._step_cache_kind == kind:
            cache.threshold = float(levers.step_cache_threshold)
        else:
            self.step_cache = make_step_cache(levers)
        self._step_cache_kind = kind

    def make_scheduler(self, flow_shift: float, num_inference_steps: int | None = None):
        return make_scheduler(self.scheduler_config, flow_shift, num_inference_steps, self.device)

    @torch.no_grad()
    def run(self, jobs: list[DenoiseJob], s: LoopSettings) -> None:
        """Denoise `jobs` together (the engine's lockstep case); fills each job's `result`
        (normalised fp32 latents, shape (1, C, T, H/8, W/8)) or marks it `cancelled`. A job
        cancelled mid-loop is dropped at the next step boundary; when none is left,
        `GenerationCancelled` is raised."""
        # 1. Check inputs: a batch is refused as a whole (before any work) when the transformer cannot run it
        is_i2v_batch(self.transformer.config, jobs)
        # 2. The jobs join one lockstep batch (their tensors, their schedulers, the step cache reset)
        batch = ContinuousBatch(self, token_budget=None, max_size=len(jobs), cfg_batch=s.cfg_batch, lockstep=True)
        for job in jobs:
            batch.join(job, s)
        # 3. The denoising loop
        while not batch.empty:
            batch.step()
        if all(j.cancelled for j in jobs):
            raise GenerationCancelled("every job of the batch was cancelled", stage="transformer")


def clone_scheduler_config(scheduler) -> dict:
    return copy.deepcopy(dict(scheduler.config))
