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
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from serve.contracts import VAE_SPATIAL_FACTOR, latent_frames
from serve.errors import GenerationCancelled
from serve.runtime.faults import inject_fault


def latent_shape(channels: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
    return (1, channels, latent_frames(num_frames), height // VAE_SPATIAL_FACTOR, width // VAE_SPATIAL_FACTOR)


def initial_latents(seed: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The pipeline's noise: `randn_tensor` from a CPU generator seeded with `seed`, in fp32."""
    from diffusers.utils.torch_utils import randn_tensor

    generator = torch.Generator().manual_seed(seed)
    return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)


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
    cfg_batch: bool = False


class DenoiseLoop:
    """Holds the transformer and the scheduler config; `run` denoises a batch of jobs."""

    def __init__(self, transformer, scheduler_config: dict, device: torch.device, step_cache=None,
                 fault: str | None = None):
        self.transformer = transformer
        self.fault = fault  # chaos testing: "oom" | "error" raised from the model call
        self.scheduler_config = dict(scheduler_config)
        self.device = device
        # ModelMixin.dtype skips the `_keep_in_fp32_modules` (the first parameter, scale_shift_table, is one)
        self.dtype = getattr(transformer, "dtype", None) or next(transformer.parameters()).dtype
        self.step_cache = step_cache  # optional: serve.pipeline.step_cache.make_step_cache(levers)
        self.steps_run = 0  # denoising steps executed over the loop's lifetime (observability)

    def make_scheduler(self, flow_shift: float):
        from diffusers import UniPCMultistepScheduler

        return UniPCMultistepScheduler.from_config(self.scheduler_config, flow_shift=flow_shift)

    def _forward(self, latents: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor, branch: str,
                 image_embeds: torch.Tensor | None = None, use_step_cache: bool = True):
        """One transformer call (`timestep`: one value per row, shape (B,)). `use_step_cache=False`:
        straight to the transformer even when the loop has a step cache (the continuous batching
        engine, `serve.pipeline.continuous`, whose rows sit at different steps)."""
        if self.fault:
            inject_fault(self.fault)
        step_cache = self.step_cache if use_step_cache else None
        if image_embeds is None:  # T2V: the call as it always was
            if step_cache is not None:
                return step_cache(self.transformer, latents, timestep, embeds, branch)
            return self.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=embeds,
                                    return_dict=False)[0]
        if step_cache is not None:
            return step_cache(self.transformer, latents, timestep, embeds, branch, image_embeds=image_embeds)
        return self.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=embeds,
                                encoder_hidden_states_image=image_embeds, return_dict=False)[0]

    def _check_jobs(self, jobs: list[DenoiseJob]) -> bool:
        """Whether the batch is image-to-video; refuses what the transformer cannot run correctly."""
        cfg = self.transformer.config
        i2v = [j.condition is not None for j in jobs]
        if any(i2v) and not all(i2v):
            raise ValueError("a batch cannot mix image-to-video and text-to-video jobs")
        for j in jobs:
            if (j.image_embeds is None) != (j.condition is None):
                raise ValueError("an image-to-video job needs both image_embeds and condition")
        if not i2v[0]:
            if cfg.in_channels != cfg.out_channels:
                raise ValueError(f"this transformer takes {cfg.in_channels} input channels for "
                                 f"{cfg.out_channels} out: it needs an image condition (image-to-video)")
            return False
        if getattr(cfg, "image_dim", None) is None:
            raise ValueError("this transformer has no image embedding (image_dim): not an image-to-video model")
        for j in jobs:
            if cfg.in_channels - j.condition.shape[1] != cfg.out_channels:
                raise ValueError(f"condition has {j.condition.shape[1]} channels; the transformer needs "
                                 f"{cfg.in_channels - cfg.out_channels}")
            if j.image_embeds.ndim != 3 or j.image_embeds.shape[0] != jobs[0].image_embeds.shape[0]:
                raise ValueError("image_embeds must be (n, tokens, dim), the same n for every job of a batch")
            if j.image_embeds.shape[0] > 1 and getattr(cfg, "pos_embed_seq_len", None) is None:
                raise ValueError("a last image needs a first-last-frame transformer (pos_embed_seq_len); "
                                 "this one takes the embeddings of one image")
            # the attention processor takes the last 512 tokens of the context as the text
            if getattr(cfg, "added_kv_proj_dim", None) is not None and j.prompt_embeds.shape[1] != 512:
                raise ValueError(f"image-to-video needs 512-token prompt embeddings (got {j.prompt_embeds.shape[1]}):"
                                 " the transformer splits its context at 512 text tokens")
        return True

    @torch.no_grad()
    def run(self, jobs: list[DenoiseJob], s: LoopSettings) -> None:
        """Denoise `jobs` together; fills each job's `result` (normalised fp32 latents,
        shape (1, C, T, H/8, W/8)) or marks it `cancelled`. A job cancelled mid-loop is dropped
        at the next step boundary; when none is left, `GenerationCancelled` is raised."""
        do_cfg = s.guidance_scale > 1.0
        i2v = self._check_jobs(jobs)
        # T2V: SkyReelsV2Pipeline's `transformer.config.in_channels`; I2V: the VAE's z_dim, which is
        # what is left of the transformer's input once the condition is concatenated
        channels = self.transformer.config.out_channels if i2v else self.transformer.config.in_channels
        shape = latent_shape(channels, s.num_frames, s.height, s.width)
        active = list(jobs)
        latents = torch.cat([initial_latents(j.seed, shape, self.device) for j in active])
        cond = torch.cat([torch.from_numpy(np.array(j.prompt_embeds)) for j in active]).to(self.device, self.dtype)
        uncond = None
        if do_cfg:
            uncond = torch.cat([torch.from_numpy(np.array(j.negative_prompt_embeds)) for j in active]).to(
                self.device, self.dtype)
        condition = images = None
        if i2v:
            condition = torch.cat([torch.from_numpy(np.array(j.condition, dtype=np.float32)) for j in active]).to(
                self.device)
            if condition.shape[2:] != latents.shape[2:]:
                raise ValueError(f"condition is {tuple(condition.shape[2:])} latents, the video {tuple(shape[2:])}")
            # (jobs, n, tokens, D): one row per job, so cancelling slices it like the latents; the
            # transformer gets it flattened to (jobs * n, tokens, D), the pipeline's layout
            images = torch.stack([torch.from_numpy(np.array(j.image_embeds)) for j in active]).to(
                self.device, self.dtype)

        scheduler = self.make_scheduler(s.flow_shift)
        scheduler.set_timesteps(s.num_inference_steps, device=self.device)
        timesteps = scheduler.timesteps
        total = len(timesteps)
        if self.step_cache is not None:
            self.step_cache.reset(num_steps=total)

        for i, t in enumerate(timesteps):
            keep = [k for k, j in enumerate(active) if not j.is_cancelled()]
            if len(keep) < len(active):
                for k, j in enumerate(active):
                    if k not in keep:
                        j.cancelled = True
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

            if i2v:
                latent_input = torch.cat([latents, condition], dim=1).to(self.dtype)
                image_input = images.flatten(0, 1)
            else:
                latent_input = latents.to(self.dtype)
                image_input = None
            timestep = t.expand(latents.shape[0])
            if do_cfg and s.cfg_batch:
                n = latents.shape[0]
                both = self._forward(torch.cat([latent_input, latent_input]), t.expand(2 * n),
                                     torch.cat([cond, uncond]), "cfg",
                                     image_embeds=torch.cat([image_input, image_input]) if i2v else None)
                noise_pred, noise_uncond = both[:n], both[n:]
                noise_pred = noise_uncond + s.guidance_scale * (noise_pred - noise_uncond)
            else:
                noise_pred = self._forward(latent_input, timestep, cond, "cond", image_embeds=image_input)
                if do_cfg:  # the unconditional call sees the same image, as in the pipeline
                    noise_uncond = self._forward(latent_input, timestep, uncond, "uncond", image_embeds=image_input)
                    noise_pred = noise_uncond + s.guidance_scale * (noise_pred - noise_uncond)
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
