"""The SkyReels-V2 T2V denoising loop (flow-matching UniPC + classifier-free guidance), written to
match `SkyReelsV2Pipeline.__call__` step for step, for one job or a batch of same-shape jobs.

A job carrying `image_embeds` and `condition` is image-to-video, step for step as
`SkyReelsV2ImageToVideoPipeline.__call__`: the noise has the VAE's 16 channels, every transformer
call gets `cat([latents, condition], dim=1)` and `encoder_hidden_states_image=image_embeds` (the
same image embeddings for the conditional and the unconditional call). Both inputs come from
`serve.pipeline.image_conditioning`.

Used by the `Transformer` deployment and, in process, by the benchmarks. No Serve in here. The
VAE side (de-normalise, decode, frames) is `serve.pipeline.vae_decode`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from serve.errors import GenerationCancelled
from serve.pipeline.denoise_step import (
    ClassifierFreeGuidance, ModelInput, TransformerForward, check_jobs, drop_cancelled, initial_latents,
    latent_shape, make_scheduler, model_dtype, prepare_job,
)

if TYPE_CHECKING:
    from serve.contracts import ResolvedSpec

__all__ = ["DenoiseJob", "DenoiseLoop", "LoopSettings", "clone_scheduler_config", "initial_latents",
           "latent_shape"]


@dataclass
class DenoiseJob:
    """One request inside a (possibly batched) loop."""

    seed: int
    prompt_embeds: np.ndarray  # (1, L, D)
    negative_prompt_embeds: np.ndarray | None  # (1, L, D) when guidance > 1
    is_cancelled: Callable[[], bool] = lambda: False
    on_step: Callable[[int, int], None] = lambda step, total: None
    result: np.ndarray | None = None
    cancelled: bool = False
    # image-to-video (both or neither): `image_conditioning.clip_image_embeds` (n, tokens, D), n = 2
    # with a last image; `image_conditioning.i2v_condition` (1, 4 + 16, T, H/8, W/8)
    image_embeds: np.ndarray | None = None
    condition: np.ndarray | None = None


@dataclass
class LoopSettings:
    width: int
    height: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    flow_shift: float
    cfg_batch: bool = False  # a replica's lever (`levers.cfg_batch`), not a request's

    @classmethod
    def from_spec(cls, spec: ResolvedSpec, cfg_batch: bool = False) -> LoopSettings:
        """The loop's settings of a job: every field but `cfg_batch` is the spec's field of that name."""
        return cls(**{f.name: getattr(spec, f.name) for f in fields(cls) if f.name != "cfg_batch"},
                   cfg_batch=cfg_batch)


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

    @property
    def fault(self) -> str | None:
        return self.forward.fault

    @property
    def step_cache(self):
        return self.forward.step_cache

    @step_cache.setter
    def step_cache(self, cache) -> None:
        self.forward.step_cache = cache

    def make_scheduler(self, flow_shift: float, num_inference_steps: int | None = None):
        return make_scheduler(self.scheduler_config, flow_shift, num_inference_steps, self.device)

    @torch.no_grad()
    def run(self, jobs: list[DenoiseJob], s: LoopSettings) -> None:
        """Denoise `jobs` together; fills each job's `result` (normalised fp32 latents,
        shape (1, C, T, H/8, W/8)) or marks it `cancelled`. A job cancelled mid-loop is dropped
        at the next step boundary; when none is left, `GenerationCancelled` is raised."""
        # 1. Check inputs, prepare each job's tensors (noise, embeddings, I2V condition and images)
        i2v = check_jobs(self.transformer.config, jobs)
        active = list(jobs)
        parts = [prepare_job(self.transformer.config, j, s, i2v, self.device, self.dtype) for j in active]
        latents = torch.cat([p.latents for p in parts])
        cond = torch.cat([p.cond for p in parts])
        do_cfg = s.guidance_scale > 1.0
        uncond = torch.cat([p.uncond for p in parts]) if do_cfg else None
        # (jobs, n, tokens, D): one row per job, so cancelling slices it like the latents
        condition = torch.cat([p.condition for p in parts]) if i2v else None
        images = torch.cat([p.images for p in parts]) if i2v else None

        # 2. The scheduler (one for the batch: the jobs share their schedule) and the guider
        scheduler = self.make_scheduler(s.flow_shift, s.num_inference_steps)
        timesteps = scheduler.timesteps
        total = len(timesteps)
        if self.step_cache is not None:
            self.step_cache.reset(num_steps=total)
        guider = ClassifierFreeGuidance(batch_cond_uncond=s.cfg_batch)

        # 3. The denoising loop
        for i, t in enumerate(timesteps):
            gone, keep = drop_cancelled(active)
            if gone:
                if not keep:
                    raise GenerationCancelled("every job of the batch was cancelled", stage="transformer")
                idx = torch.tensor(keep, device=self.device)
                active = [active[k] for k in keep]
                latents, cond = latents[idx], cond[idx]
                uncond = uncond[idx] if uncond is not None else None
                if i2v:
                    condition, images = condition[idx], images[idx]
                _slice_scheduler_state(scheduler, idx)
                if self.step_cache is not None:
                    self.step_cache.select(idx)

            model_latents = torch.cat([latents, condition], dim=1) if i2v else latents
            inp = ModelInput(latents=model_latents.to(self.dtype), timestep=t.expand(latents.shape[0]),
                             image_embeds=images)
            noise_pred = guider(self.forward, inp, cond, uncond, [s.guidance_scale] * len(active))
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            self.steps_run += 1
            for j in active:
                j.on_step(i + 1, total)

        out = latents.float().cpu().numpy()
        for k, j in enumerate(active):
            j.result = out[k:k + 1].copy()


def _slice_scheduler_state(scheduler, idx: torch.Tensor) -> None:
    """Drop cancelled samples from UniPC's multistep history (its math is per-sample)."""
    scheduler.model_outputs = [m[idx] if isinstance(m, torch.Tensor) else m for m in scheduler.model_outputs]
    if isinstance(getattr(scheduler, "last_sample", None), torch.Tensor):
        scheduler.last_sample = scheduler.last_sample[idx]


def clone_scheduler_config(scheduler) -> dict:
    return copy.deepcopy(dict(scheduler.config))
