"""Long video by diffusion forcing (DF): the loop of `SkyReelsV2DiffusionForcingPipeline.__call__`,
written to match it step for step, window by window.

A video of `num_frames` is made in windows of `base_num_frames`; each window after the first starts
from the last `overlap_history` frames of the latents so far (optionally re-noised by
`addnoise_condition`), and inside a window every latent frame has its own timestep: synchronous
(`ar_step` 0, all frames together) or asynchronous (`ar_step` > 0, blocks of `causal_block_size`
latent frames each `ar_step` steps behind the block before, with block-causal attention).

The latents a window adds are final when the window ends: `on_window` hands them over, so a caller
can decode and deliver a long video window by window. The text embeddings are computed once per
job and used by every window. The VAE side is unchanged: decoding all latents at once (or streamed
through the Wan VAE's causal cache, `serve.pipeline.vae_decode.iter_decode`) is what diffusers does.

No Serve in here; the `Transformer` deployment runs it for DF jobs, in slices (`DFRun.advance`: a
step or a window at a time) so that other jobs can run on the same transformer in between.
Geometry (`plan_windows`) is plain Python so that spec validation can use it without torch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np

from serve.contracts import VAE_SPATIAL_FACTOR, latent_frames
from serve.errors import GenerationCancelled
from serve.pipeline.faults import inject_fault

# diffusers' fps conditioning (`inject_sample_info` models, e.g. SkyReels-V2-DF-1.3B): 16 fps -> 0, else 1
FPS_16 = 16


def addnoise_seed(seed: int) -> int:
    """Seed of the noise `addnoise_condition` mixes into the carried frames. diffusers draws it with
    `torch.randn_like`, i.e. from torch's global RNG; here it comes from its own generator seeded
    with this, so a job's frames do not depend on what else ran in the process. (The reference test
    seeds the global RNG with the same value before calling diffusers.)"""
    return (seed + 1) % 2**63


# -- geometry ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WindowPlan:
    """How a DF job is cut into windows, in latent frames (as diffusers cuts it)."""

    num_latent_frames: int  # of the whole video
    is_long: bool  # more than one window's worth of frames (diffusers' `is_long_video`)
    overlap_latent_frames: int  # carried from one window into the next (0 when not long)
    window_latent_frames: tuple[int, ...]  # size of each window, prefix included
    prefix_latent_frames: tuple[int, ...]  # carried frames actually used as each window's prefix

    @property
    def num_windows(self) -> int:
        return len(self.window_latent_frames)


def plan_windows(num_frames: int, base_num_frames: int, overlap_history: int,
                 causal_block_size: int = 1) -> WindowPlan:
    """The windows `SkyReelsV2DiffusionForcingPipeline` runs for these settings (its `n_iter` and
    `prepare_latents`); frame counts are validated by `serve.pipeline.spec`."""
    total = latent_frames(num_frames)
    if num_frames <= base_num_frames:
        return WindowPlan(total, False, 0, (total,), (0,))
    base = latent_frames(base_num_frames)
    overlap = latent_frames(overlap_history)
    n_windows = 1 + (total - base - 1) // (base - overlap) + 1
    sizes, prefixes = [base], [0]
    for k in range(1, n_windows):
        finished = k * (base - overlap) + overlap
        sizes.append(min(total - finished + overlap, base))
        prefixes.append(overlap - overlap % causal_block_size)  # diffusers truncates to whole blocks
    return WindowPlan(total, True, overlap, tuple(sizes), tuple(prefixes))


def timestep_matrix(num_latent_frames: int, step_template, base_num_latent_frames: int, ar_step: int,
                    num_pre_ready: int, causal_block_size: int):
    """diffusers' `generate_timestep_matrix` (without `shrink_interval_with_mask`, which the
    pipeline never sets): per iteration, each latent frame's timestep, whether it is updated, and
    the [start, end) interval of frames fed to the transformer."""
    import torch

    num_iterations = len(step_template) + 1
    num_blocks = num_latent_frames // causal_block_size
    base_num_blocks = base_num_latent_frames // causal_block_size
    if base_num_blocks < num_blocks and ar_step < len(step_template) / base_num_blocks:
        raise ValueError(f"`ar_step` should be at least {math.ceil(len(step_template) / base_num_blocks)}")
    template = torch.cat([torch.tensor([999], dtype=torch.int64, device=step_template.device),
                          step_template.long(),
                          torch.tensor([0], dtype=torch.int64, device=step_template.device)])
    pre_row = torch.zeros(num_blocks, dtype=torch.long)
    if num_pre_ready > 0:
        pre_row[: num_pre_ready // causal_block_size] = num_iterations
    rows, masks = [], []
    while not torch.all(pre_row >= num_iterations - 1):
        new_row = torch.zeros(num_blocks, dtype=torch.long)
        for i in range(num_blocks):
            if i == 0 or pre_row[i - 1] >= num_iterations - 1:
                new_row[i] = pre_row[i] + 1
            else:
                new_row[i] = new_row[i - 1] - ar_step
        new_row = new_row.clamp(0, num_iterations)
        masks.append((new_row != pre_row) & (new_row != num_iterations))
        rows.append(template[new_row])
        pre_row = new_row
    intervals, terminal = [], base_num_blocks
    for mask in masks:
        if terminal < num_blocks and mask[terminal]:
            terminal += 1
        intervals.append((max(terminal - base_num_blocks, 0), terminal))
    step_matrix, update_mask = torch.stack(rows), torch.stack(masks)
    if causal_block_size > 1:
        step_matrix = step_matrix.unsqueeze(-1).repeat(1, 1, causal_block_size).flatten(1).contiguous()
        update_mask = update_mask.unsqueeze(-1).repeat(1, 1, causal_block_size).flatten(1).contiguous()
        intervals = [(s * causal_block_size, e * causal_block_size) for s, e in intervals]
    return step_matrix, update_mask, intervals


# -- the loop ----------------------------------------------------------------------------------
@dataclass
class DFSettings:
    width: int
    height: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    flow_shift: float
    fps: int
    base_num_frames: int
    overlap_history: int
    ar_step: int
    causal_block_size: int
    addnoise_condition: float


@dataclass
class DFJob:
    """One DF generation. `on_step(step, total)` after each transformer iteration, counted over all
    windows; `on_window(index, num_windows, latents)` when a window ends, with the latents it adds
    to the video (final: later windows only read them)."""

    seed: int
    prompt_embeds: np.ndarray  # (1, L, D)
    negative_prompt_embeds: np.ndarray | None  # (1, L, D) when guidance > 1
    is_cancelled: Callable[[], bool] = lambda: False
    on_step: Callable[[int, int], None] = lambda step, total: None
    on_window: Callable[[int, int, np.ndarray], None] = lambda index, num_windows, latents: None
    # False: the loop keeps only the frames the next window needs (the overlap), not the whole
    # video, so memory is bounded by the window; `result` then stays None and `on_window` is the
    # only way out for the latents (the Transformer deployment streams them window by window).
    keep_result: bool = True
    result: np.ndarray | None = None
    window_steps: list[int] = field(default_factory=list)


class DiffusionForcingLoop:
    """Holds the transformer (shared with the T2V loop) and the scheduler config; `run` makes one
    DF video. The transformer's `num_frame_per_block` (diffusers persists `causal_block_size` on
    the model) is set for each job and put back afterwards, so a T2V job never sees it."""

    def __init__(self, transformer, scheduler_config: dict, device, fault: str | None = None):
        self.transformer = transformer
        self.scheduler_config = dict(scheduler_config)
        self.device = device
        self.fault = fault
        self.dtype = getattr(transformer, "dtype", None) or next(transformer.parameters()).dtype
        self.steps_run = 0

    def _scheduler(self, flow_shift: float, num_inference_steps: int):
        from diffusers import UniPCMultistepScheduler

        scheduler = UniPCMultistepScheduler.from_config(self.scheduler_config, flow_shift=flow_shift)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        return scheduler

    def total_steps(self, s: DFSettings) -> int:
        """Transformer iterations over all windows (what `on_step`'s `total` counts)."""
        plan = plan_windows(s.num_frames, s.base_num_frames, s.overlap_history, s.causal_block_size)
        timesteps = self._scheduler(s.flow_shift, s.num_inference_steps).timesteps
        return sum(len(self._matrix(plan, k, timesteps, s)[0]) for k in range(plan.num_windows))

    @staticmethod
    def _matrix(plan: WindowPlan, k: int, timesteps, s: DFSettings):
        size = plan.window_latent_frames[k]
        return timestep_matrix(size, timesteps, size if plan.is_long else plan.num_latent_frames, s.ar_step,
                               plan.prefix_latent_frames[k], s.causal_block_size)

    def _forward(self, latents, timestep, embeds, fps_embeds):
        if self.fault:
            inject_fault(self.fault)
        return self.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=embeds,
                                enable_diffusion_forcing=True, fps=fps_embeds, return_dict=False)[0]

    def run(self, job: DFJob, s: DFSettings) -> None:
        """Fills `job.result` with the whole video's normalised fp32 latents (1, C, T, h, w) (when
        `job.keep_result`; `on_window` hands each window's new ones over either way), or
        raises GenerationCancelled at the first iteration boundary after `job.is_cancelled()`."""
        self.start(job, s).advance("job")

    def start(self, job: DFJob, s: DFSettings) -> "DFRun":
        """The job, ready to run in slices (`DFRun.advance`); nothing runs yet."""
        return DFRun(self, job, s)


# What `DFRun.advance` runs before it returns: one transformer iteration, up to the end of the
# current window, or the whole job.
YieldEvery = Literal["step", "window", "job"]


class DFRun:
    """One DF job in progress, resumable: it keeps everything the loop carries between iterations
    (the window's latents and per-frame schedulers, the video so far, both generators, the step
    count), so running it in slices, with other jobs on the same transformer in between, gives
    exactly the latents of one uninterrupted run. `causal_block_size` is set on the shared
    transformer for each slice and put back after it, so a T2V batch run between two slices sees
    none."""

    def __init__(self, loop: DiffusionForcingLoop, job: DFJob, s: DFSettings):
        import torch

        self.loop, self.job, self.s = loop, job, s
        # 1. The windows and each one's timestep matrix
        self.plan = plan = plan_windows(s.num_frames, s.base_num_frames, s.overlap_history, s.causal_block_size)
        self.scheduler = loop._scheduler(s.flow_shift, s.num_inference_steps)
        self.matrices = [loop._matrix(plan, k, self.scheduler.timesteps, s) for k in range(plan.num_windows)]
        job.window_steps = [len(m[0]) for m in self.matrices]
        self.total, self.done = sum(job.window_steps), 0

        # 2. The prompt embeddings, once for every window
        self.do_cfg = s.guidance_scale > 1.0
        self.cond = torch.from_numpy(np.array(job.prompt_embeds)).to(loop.device, loop.dtype)
        self.uncond = (torch.from_numpy(np.array(job.negative_prompt_embeds)).to(loop.device, loop.dtype)
                       if self.do_cfg else None)
        self.fps_embeds = [0 if s.fps == FPS_16 else 1] * self.cond.shape[0]
        self.generator = torch.Generator().manual_seed(job.seed)  # the pipeline's generator: every window's noise
        self.noise_generator = torch.Generator().manual_seed(addnoise_seed(job.seed))

        self.video = None  # the latents so far (diffusers' accumulated_latents), only when job.keep_result
        self.carried_over = None  # the last `overlap_latent_frames` of the video so far: all the next window reads
        self.ended = False
        self.window = 0  # the window being denoised
        self.iteration = 0  # the next iteration of that window
        self.latents = None  # that window's latents, None before it starts
        self.schedulers: list = []  # one per latent frame of that window

    @property
    def finished(self) -> bool:
        return self.ended

    def advance(self, until: YieldEvery = "window") -> None:
        """Runs one iteration, the rest of the current window, or the rest of the job; raises
        GenerationCancelled at the first iteration boundary after `job.is_cancelled()`."""
        import torch

        transformer = self.loop.transformer
        original_block = transformer.config.num_frame_per_block
        transformer._set_ar_attention(self.s.causal_block_size)
        try:
            with torch.no_grad():
                while not self.finished:
                    window_ended = self._iterate()
                    if until == "step" or (until == "window" and window_ended):
                        break
        finally:
            transformer._set_ar_attention(original_block)

    def _begin_window(self) -> None:
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        # 3. The window's noise, its first frames replaced by the end of the video so far
        loop, plan, s, k = self.loop, self.plan, self.s, self.window
        size, prefix = plan.window_latent_frames[k], plan.prefix_latent_frames[k]
        h, w = s.height // VAE_SPATIAL_FACTOR, s.width // VAE_SPATIAL_FACTOR
        latents = randn_tensor((1, loop.transformer.config.in_channels, size, h, w), generator=self.generator,
                               device=loop.device, dtype=torch.float32)
        if prefix > 0:
            latents[:, :, :prefix] = self.carried_over[:, :, :prefix].to(loop.dtype)
        self.schedulers = [copy.deepcopy(self.scheduler) for _ in range(size)]
        for frame_scheduler in self.schedulers:
            frame_scheduler.set_timesteps(s.num_inference_steps, device=loop.device)
        self.latents, self.iteration = latents, 0

    def _iterate(self) -> bool:
        """One transformer iteration; True when it was the window's last."""
        import torch

        if self.latents is None:
            self._begin_window()
        # 4. Denoise the window: each iteration updates the frames its row of the matrix marks
        loop, job, s, latents, i = self.loop, self.job, self.s, self.latents, self.iteration
        prefix = self.plan.prefix_latent_frames[self.window]
        step_matrix, update_mask, intervals = self.matrices[self.window]
        if job.is_cancelled():
            raise GenerationCancelled("generation cancelled", stage="transformer")
        t = step_matrix[i]
        start, end = intervals[i]
        model_input = latents[:, :, start:end].to(loop.dtype).clone()
        timestep = t.expand(latents.shape[0], -1)[:, start:end].clone()
        if s.addnoise_condition > 0 and start < prefix:
            factor = 0.001 * s.addnoise_condition
            carried = model_input[:, :, start:prefix]
            noise = torch.randn(carried.shape, generator=self.noise_generator, dtype=carried.dtype)
            model_input[:, :, start:prefix] = carried * (1.0 - factor) + noise.to(loop.device) * factor
            timestep[:, start:prefix] = s.addnoise_condition
        noise_pred = loop._forward(model_input, timestep, self.cond, self.fps_embeds)
        if self.do_cfg:
            noise_uncond = loop._forward(model_input, timestep, self.uncond, self.fps_embeds)
            noise_pred = noise_uncond + s.guidance_scale * (noise_pred - noise_uncond)
        for idx in range(start, end):
            if update_mask[i][idx].item():
                latents[:, :, idx] = self.schedulers[idx].step(
                    noise_pred[:, :, idx - start], t[idx], latents[:, :, idx], return_dict=False)[0]
        loop.steps_run += 1
        self.done += 1
        self.iteration += 1
        job.on_step(self.done, self.total)
        if self.iteration < len(step_matrix):
            return False
        self._end_window()
        return True

    def _end_window(self) -> None:
        import torch

        # 5. The window's new frames join the video; they are final
        plan, latents = self.plan, self.latents
        new = latents if self.window == 0 else latents[:, :, plan.overlap_latent_frames:]
        if plan.overlap_latent_frames:  # the end of the video so far (may reach into the window before)
            tail = latents if self.carried_over is None else torch.cat([self.carried_over, new], dim=2)
            self.carried_over = tail[:, :, -plan.overlap_latent_frames:].clone()
        if self.job.keep_result:
            self.video = new if self.video is None else torch.cat([self.video, new], dim=2)
        self.latents, self.schedulers = None, []
        self.job.on_window(self.window, plan.num_windows, new.float().cpu().numpy())
        self.window += 1
        if self.window == plan.num_windows:
            self.ended = True
            if self.job.keep_result:
                self.job.result = self.video.float().cpu().numpy()

