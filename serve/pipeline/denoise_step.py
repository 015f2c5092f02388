"""The pieces of one denoising step, shared by every loop: the request-level batch
(`serve.pipeline.denoising.DenoiseLoop.run`), the step-level engine
(`serve.pipeline.continuous.ContinuousBatch`) and diffusion forcing
(`serve.pipeline.diffusion_forcing.DFRun`).

As in diffusers' modular pipelines, where a loop denoiser calls a guider component
(`ClassifierFreeGuidance`) around the model, a loop here:

1. prepares each job's tensors once (`prepare_job`: noise from the seed, prompt and negative
   embeddings, an I2V condition and image embeddings, after `is_i2v_batch`), or its own (DF windows);
2. gets a scheduler from `make_scheduler` (UniPC from the model's config, the job's `flow_shift`);
3. each step, builds a `ModelInput` (latents with the condition concatenated, one timestep per
   row - or per frame for DF -, image embeddings, DF's fps) and asks the guider
   (`ClassifierFreeGuidance`) for the guided noise prediction; the guider calls the
   `TransformerForward` (fault injection, step cache, image embeddings, plain call) for the
   conditional rows and the unconditional ones - two calls, or one CFG batch - and mixes them with
   each row's own guidance scale;
4. steps its scheduler(s) with that prediction.

`job_tokens` is the one measure of a job's cost (the token budget of both batchings). No Serve here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from serve.contracts import VAE_SPATIAL_FACTOR, dit_tokens, latent_frames
from serve.runtime.faults import inject_fault

if TYPE_CHECKING:
    from serve.contracts import ResolvedSpec


# -- a job and its settings ---------------------------------------------------------------------
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


# -- facts about a job ---------------------------------------------------------------------------
def job_tokens(settings) -> int:
    """DiT sequence length of one job, x2 with guidance (guidance_scale > 1): what a token budget
    counts. `settings`: anything with num_frames, height, width and guidance_scale (a
    `LoopSettings`, a `ResolvedSpec`)."""
    cfg = settings.guidance_scale > 1.0
    return dit_tokens(settings.num_frames, settings.height, settings.width) * (2 if cfg else 1)


def latent_shape(channels: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
    return (1, channels, latent_frames(num_frames), height // VAE_SPATIAL_FACTOR, width // VAE_SPATIAL_FACTOR)


def latent_channels(transformer_config, i2v: bool) -> int:
    """Channels of the noise. T2V (and DF): the transformer's `in_channels` (`SkyReelsV2Pipeline`);
    I2V: the VAE's z_dim, what is left of the input once the condition is concatenated (`out_channels`)."""
    return transformer_config.out_channels if i2v else transformer_config.in_channels


def initial_latents(seed: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The pipeline's noise: `randn_tensor` from a CPU generator seeded with `seed`, in fp32."""
    from diffusers.utils.torch_utils import randn_tensor

    generator = torch.Generator().manual_seed(seed)
    return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)


def model_dtype(transformer) -> torch.dtype:
    """The transformer's compute dtype. `ModelMixin.dtype` skips the `_keep_in_fp32_modules` (the
    first parameter, scale_shift_table, is one); a plain module falls back to its first parameter."""
    return getattr(transformer, "dtype", None) or next(transformer.parameters()).dtype


def to_device(array, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A numpy input (embeddings, a condition) as a tensor on the device (in `dtype` when given)."""
    tensor = torch.from_numpy(np.array(array))
    return tensor.to(device, dtype) if dtype is not None else tensor.to(device)


def make_scheduler(scheduler_config: dict, flow_shift: float, num_inference_steps: int | None = None,
                   device: torch.device | None = None):
    """The flow-matching UniPC scheduler of the model's config with a job's `flow_shift`; its
    timesteps set when `num_inference_steps` is given."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler.from_config(scheduler_config, flow_shift=flow_shift)
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler


def drop_cancelled(entries: list, job_of: Callable = lambda e: e) -> tuple[list, list[int]]:
    """The step-boundary sweep: marks the jobs whose `is_cancelled()` is true (`cancelled=True`) and
    returns (the cancelled entries, the indices of the ones that go on)."""
    keep, gone = [], []
    for k, entry in enumerate(entries):
        job = job_of(entry)
        if job.is_cancelled():
            job.cancelled = True
            gone.append(entry)
        else:
            keep.append(k)
    return gone, keep


# -- a job's tensors -----------------------------------------------------------------------------
def is_i2v_batch(transformer_config, jobs: Sequence) -> bool:
    """Whether the jobs (`DenoiseJob`s run together) are image-to-video; refuses what the
    transformer cannot run correctly (ValueError)."""
    cfg = transformer_config
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


@dataclass
class JobTensors:
    """One job's inputs on the device, batch dimension 1 (images: (1, n, tokens, D))."""

    latents: torch.Tensor  # (1, C, T, h, w), fp32: the noise from the job's seed
    cond: torch.Tensor  # (1, L, D), model dtype
    uncond: torch.Tensor | None  # (1, L, D) when guidance > 1
    condition: torch.Tensor | None = None  # I2V: (1, 4 + C, T, h, w), fp32
    images: torch.Tensor | None = None  # I2V: (1, n, tokens, D), model dtype


def prepare_job(transformer_config, job, settings, i2v: bool, device: torch.device,
                dtype: torch.dtype) -> JobTensors:
    """A `DenoiseJob`'s tensors for `settings` (a `LoopSettings`), after `is_i2v_batch`."""
    cfg = settings.guidance_scale > 1.0
    if cfg and job.negative_prompt_embeds is None:
        raise ValueError("a job with guidance > 1 needs negative_prompt_embeds")
    shape = latent_shape(latent_channels(transformer_config, i2v), settings.num_frames, settings.height,
                         settings.width)
    latents = initial_latents(job.seed, shape, device)
    cond = to_device(job.prompt_embeds, device, dtype)
    uncond = to_device(job.negative_prompt_embeds, device, dtype) if cfg else None
    condition = images = None
    if i2v:
        condition = to_device(np.asarray(job.condition, dtype=np.float32), device)
        if condition.shape[2:] != latents.shape[2:]:
            raise ValueError(f"condition is {tuple(condition.shape[2:])} latents, the video {tuple(shape[2:])}")
        images = to_device(job.image_embeds, device, dtype).unsqueeze(0)
    return JobTensors(latents=latents, cond=cond, uncond=uncond, condition=condition, images=images)


# -- the model call ------------------------------------------------------------------------------
@dataclass
class ModelInput:
    """The transformer's per-row inputs for one step, besides the text embeddings (which the guider
    picks: conditional or unconditional). Rows can be selected and concatenated (CFG batch)."""

    latents: torch.Tensor  # (B, C_in, T, h, w), model dtype, I2V condition already concatenated
    timestep: torch.Tensor  # (B,), or (B, F) per frame (diffusion forcing)
    image_embeds: torch.Tensor | None = None  # (B, n, tokens, D): flattened to (B * n, ...) for the call
    fps: list[int] | None = None  # diffusion forcing: one fps flag per row

    @property
    def rows(self) -> int:
        return self.latents.shape[0]

    def select(self, rows: list[int]) -> "ModelInput":
        idx = torch.tensor(rows, device=self.latents.device)
        return ModelInput(latents=self.latents[idx], timestep=self.timestep[idx],
                          image_embeds=self.image_embeds[idx] if self.image_embeds is not None else None,
                          fps=[self.fps[k] for k in rows] if self.fps is not None else None)

    def concat(self, other: "ModelInput") -> "ModelInput":
        return ModelInput(latents=torch.cat([self.latents, other.latents]),
                          timestep=torch.cat([self.timestep, other.timestep]),
                          image_embeds=(torch.cat([self.image_embeds, other.image_embeds])
                                        if self.image_embeds is not None else None),
                          fps=self.fps + other.fps if self.fps is not None else None)


class TransformerForward:
    """One transformer call: the chaos fault hook, then the step cache when there is one and the
    caller allows it, else the plain call (with the image embeddings for I2V, the DF arguments for
    diffusion forcing). `step_cache` may be swapped at any time (live levers)."""

    def __init__(self, transformer, fault: str | None = None, step_cache=None):
        self.transformer = transformer
        self.fault = fault  # chaos testing: "oom" | "error" raised from the model call
        self.step_cache = step_cache

    def __call__(self, inp: ModelInput, embeds: torch.Tensor, branch: str, use_step_cache: bool = True):
        if self.fault:
            inject_fault(self.fault)
        images = inp.image_embeds.flatten(0, 1) if inp.image_embeds is not None else None
        step_cache = self.step_cache if use_step_cache else None
        if step_cache is not None:
            if inp.fps is not None:
                raise ValueError("the step cache does not run diffusion forcing")
            extra = {"image_embeds": images} if images is not None else {}
            return step_cache(self.transformer, inp.latents, inp.timestep, embeds, branch, **extra)
        kwargs = {"encoder_hidden_states_image": images} if images is not None else {}
        if inp.fps is not None:
            # diffusers' DF transformer adds the fps projection repeated per frame, shaped for one row:
            # rows that share one fps (the cond and uncond rows of one DF job) pass it once, and it
            # broadcasts over the rows (with one row this is the pipeline's own call)
            fps = inp.fps[:1] if len(set(inp.fps)) == 1 else inp.fps
            kwargs.update(enable_diffusion_forcing=True, fps=fps)
        return self.transformer(hidden_states=inp.latents, timestep=inp.timestep, encoder_hidden_states=embeds,
                                return_dict=False, **kwargs)[0]


class ClassifierFreeGuidance:
    """The guider: a guided noise prediction per row, `uncond + g * (cond - uncond)` with each row's
    own guidance scale g; rows with g <= 1 get no unconditional call at all. `batch_cond_uncond`:
    the conditional and unconditional rows go through the transformer in one call (`cfg_batch`),
    else in two ("cond", then "uncond": the step cache tells the branches apart)."""

    def __init__(self, batch_cond_uncond: bool = False):
        self.batch_cond_uncond = batch_cond_uncond

    @staticmethod
    def mix(cond_pred: torch.Tensor, uncond_pred: torch.Tensor, scale: float) -> torch.Tensor:
        return uncond_pred + scale * (cond_pred - uncond_pred)

    def __call__(self, forward: Callable, inp: ModelInput, cond: torch.Tensor, uncond: torch.Tensor | None,
                 scales: Sequence[float], use_step_cache: bool = True) -> torch.Tensor:
        """`cond`: (B, L, D); `uncond`: the negative embeddings of the guided rows only (those with
        scale > 1, in order); returns the (B, ...) noise prediction."""
        guided = [k for k, g in enumerate(scales) if g > 1.0]
        if not guided:
            return forward(inp, cond, "cond", use_step_cache=use_step_cache)
        n = inp.rows
        u_inp = inp if len(guided) == n else inp.select(guided)
        if self.batch_cond_uncond:
            both = forward(inp.concat(u_inp), torch.cat([cond, uncond]), "cfg", use_step_cache=use_step_cache)
            cond_pred, uncond_pred = both[:n], both[n:]
        else:
            cond_pred = forward(inp, cond, "cond", use_step_cache=use_step_cache)
            uncond_pred = forward(u_inp, uncond, "uncond", use_step_cache=use_step_cache)
        if len(guided) == n and len(set(scales)) == 1:  # one scale for the batch: one op, as diffusers
            return self.mix(cond_pred, uncond_pred, scales[0])
        rows = list(cond_pred.split(1))
        for u, k in enumerate(guided):
            rows[k] = self.mix(rows[k], uncond_pred[u:u + 1], scales[k])
        return torch.cat(rows)
