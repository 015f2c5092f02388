"""Long video by diffusion forcing (DF): the loop of `SkyReelsV2DiffusionForcingPipeline.__call__`
(and of its image-to-video and video-to-video siblings, the modes below), written to match it step
for step, window by window.

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

Three modes (`DFSettings.mode`), each the loop of one diffusers pipeline:

- "t2v": `SkyReelsV2DiffusionForcingPipeline`, text only.
- "i2v": `SkyReelsV2DiffusionForcingImageToVideoPipeline`. The image's latent frame
  (`DFJob.condition_latents`, 1 latent frame) is the first window's prefix: it is the video's first
  latent frame. With `DFSettings.last_image` the last image's latent frame (`DFJob.end_latents`) is
  appended to the LAST window with its timesteps fixed to 0 (never updated: it only steers the frames
  before it) and removed afterwards, so the video still has `num_frames` frames, the last image
  itself not among them (as diffusers returns it). With `causal_block_size` > 1 the image's frame
  is no whole block, so it is not marked ready: diffusers denoises it with its block, and so does
  the loop.
- "v2v": `SkyReelsV2DiffusionForcingVideoToVideoPipeline`, video extension. The source video's last
  `overlap_history` frames, encoded (`DFJob.condition_latents`, `latent_frames(overlap_history)`
  latent frames), are the first window's prefix; the windows are always cut the "long video" way
  (the timestep matrix of each window sized by the window itself). `num_frames` counts the
  generated frames INCLUDING the `overlap_history` frames re-made from the source's end, so the
  extension adds `num_frames - overlap_history` new frames.

The conditioning comes in as latents on the job (the VAE deployment encodes with
`serve.pipeline.vae_encode`); the loop never calls the VAE. In every mode the latents the loop
makes (`job.result`, or the `on_window` parts put together) are the latents diffusers makes
(`output_type="latent"`), less the end frame of "i2v" with a last image, which diffusers removes
before decoding.

What is the same as diffusers and what is not:

- "v2v", the final video: diffusers returns the source followed by ALL generated frames decoded,
  so the source's last `overlap_history` frames play twice (the second time as their VAE round
  trip: the prefix latents are marked ready and never updated). SkyReels-V2's own `extend_video`
  appends only the frames after the overlap, and that is what this module states as the final
  video (`extension_frames`): the source followed by the decoded generated frames from
  `overlap_history` on. The latents are diffusers' all the same, and the first window's
  `on_window` hands over all its latents, prefix included, so that the frames after the overlap
  are decoded with the same causal context (decode everything, then drop `overlap_history`
  frames). Choosing diffusers' video instead is `source + generated`, nothing more.
- "i2v", where diffusers raises: when the last window is shorter than a full window, diffusers
  sizes its timestep matrix by `base_latent_num_frames` and indexes past the window (IndexError);
  here the matrix is sized by the window, which is what diffusers computes whenever it runs (the
  only windows it runs are those of the full size) and what the T2V pipeline does. With a last
  image, diffusers appends one end frame but fixes (timestep 0, never updated) as many frames as
  the last window's prefix has (`prefix_video_latents_frames`): right when that prefix is one
  latent frame (one window, whose prefix is the image; or an overlap of one latent frame), a
  RuntimeError when it is more, and every frame of the window left as noise when causal blocks
  truncate it to none. Here the end is the end frame, one latent frame, always; where diffusers
  runs right, the two agree (tests/test_df_conditioning.py pins both failures of diffusers). A last
  window, end frame included, that is no multiple of `causal_block_size` leaves frames diffusers
  never denoises (as the T2V pipeline does, where the spec refuses such a `num_frames`); `DFRun`
  refuses it (ValueError).
- diffusers' batch handling of the conditions (`condition[: (condition.shape[0] + 1) // 2]` the
  images, the rest the last images, from one batched VAE call) reduces, for one video, to the
  image's latent frame and the last image's, each encoded on its own here (on the tiny model, CPU,
  the batched and the single encodings differ by < 1e-5).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from typing import Callable, Literal

import numpy as np

from serve.contracts import DF_MODE, VAE_SPATIAL_FACTOR, ResolvedSpec, latent_frames
from serve.errors import GenerationCancelled
from serve.pipeline.denoise_step import (
    ClassifierFreeGuidance, ModelInput, TransformerForward, latent_channels, make_scheduler, model_dtype, to_device,
)

# diffusers' fps conditioning (`inject_sample_info` models, e.g. SkyReels-V2-DF-1.3B): 16 fps -> 0, else 1
FPS_16 = 16


def addnoise_seed(seed: int) -> int:
    """Seed of the noise `addnoise_condition` mixes into the carried frames. diffusers draws it with
    `torch.randn_like`, i.e. from torch's global RNG; here it comes from its own generator seeded
    with this, so a job's frames do not depend on what else ran in the process. (The reference test
    seeds the global RNG with the same value before calling diffusers.)"""
    return (seed + 1) % 2**63


# -- geometry ----------------------------------------------------------------------------------
# Which diffusers pipeline the loop follows: text only, an image as the first frame (and optionally a
# last image as the end), or the extension of a video.
DFMode = Literal["t2v", "i2v", "v2v"]
DF_MODES: tuple[str, ...] = ("t2v", "i2v", "v2v")


@dataclass(frozen=True)
class WindowPlan:
    """How a DF job is cut into windows, in latent frames (as diffusers cuts it)."""

    num_latent_frames: int  # of the whole video (the end frame of a last image not included)
    is_long: bool  # cut into windows of base_num_frames carrying an overlap (diffusers' `is_long_video`)
    overlap_latent_frames: int  # carried from one window into the next (0 when not long)
    window_latent_frames: tuple[int, ...]  # size of each window, prefix and end frame included
    prefix_latent_frames: tuple[int, ...]  # frames given as each window's prefix (carried, or the condition)
    mode: DFMode = "t2v"
    # "i2v" with a last image: latent frames appended to the last window, fixed, removed afterwards
    end_latent_frames: int = 0

    @property
    def num_windows(self) -> int:
        return len(self.window_latent_frames)

    @property
    def condition_latent_frames(self) -> int:
        """Latent frames of the condition the job must supply (`DFJob.condition_latents`): 1 for
        "i2v" (the image), the overlap for "v2v" (the source's last `overlap_history` frames)."""
        if self.mode == "i2v":
            return 1
        return self.overlap_latent_frames if self.mode == "v2v" else 0


def plan_windows(num_frames: int, base_num_frames: int, overlap_history: int,
                 causal_block_size: int = 1, mode: DFMode = "t2v", last_image: bool = False) -> WindowPlan:
    """The windows the diffusers pipeline of `mode` runs for these settings (its `n_iter` and
    `prepare_latents`); frame counts are validated by `serve.pipeline.spec`.

    "t2v" and "i2v" cut like `SkyReelsV2DiffusionForcingPipeline`: one window when `num_frames` <=
    `base_num_frames`. "i2v" gives the first window the image's latent frame as its prefix and, with
    `last_image`, makes the last window one latent frame longer (the end frame). "v2v" always cuts
    the long-video way, its first window's prefix the encoded end of the source; its `num_frames`
    counts the generated frames, the `overlap_history` frames re-made from the source included, and
    must exceed `overlap_history`."""
    if mode not in DF_MODES:
        raise ValueError(f"unknown diffusion forcing mode {mode!r}; one of {DF_MODES}")
    if last_image and mode != "i2v":
        raise ValueError("a last image needs mode 'i2v'")
    total = latent_frames(num_frames)
    end = 1 if last_image else 0
    base = latent_frames(base_num_frames)
    overlap = latent_frames(overlap_history)
    whole_blocks = overlap - overlap % causal_block_size  # diffusers truncates a carried prefix to whole blocks
    if mode == "v2v":
        if total <= overlap:
            raise ValueError(f"video extension needs num_frames ({num_frames}) longer than overlap_history "
                             f"({overlap_history}) by at least 4 frames")
    elif num_frames <= base_num_frames:
        return WindowPlan(total, False, 0, (total + end,), (1 if mode == "i2v" else 0,), mode, end)
    n_windows = 1 + (total - base - 1) // (base - overlap) + 1
    # window k starts where the video so far, less the overlap, ends: k * (base - overlap)
    sizes = [min(total - k * (base - overlap), base) for k in range(n_windows)]
    sizes[-1] += end
    first_prefix = {"t2v": 0, "i2v": 1, "v2v": whole_blocks}[mode]
    prefixes = [first_prefix] + [whole_blocks] * (n_windows - 1)
    return WindowPlan(total, True, overlap, tuple(sizes), tuple(prefixes), mode, end)


def extension_frames(source_frames: np.ndarray, generated_frames: np.ndarray, overlap_history: int) -> np.ndarray:
    """The final video of a "v2v" job: the source's frames (F, H, W, 3), then the generated ones from
    `overlap_history` on (the first `overlap_history` decoded frames re-make the source's last ones).
    SkyReels-V2's `extend_video` does this; diffusers returns `source + generated`, showing the
    overlap twice (see the module docstring)."""
    if len(generated_frames) < overlap_history:
        raise ValueError(f"{len(generated_frames)} generated frames do not reach past the overlap ({overlap_history})")
    return np.concatenate([source_frames, generated_frames[overlap_history:]], axis=0)


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
    # "t2v" (text), "i2v" (an image as the first frame), "v2v" (extend a video): see the module docstring
    mode: DFMode = "t2v"
    last_image: bool = False  # "i2v": the job has `end_latents`, the last window ends on them
    cfg_batch: bool = False  # the conditional and unconditional calls as one batch (`levers.cfg_batch`)

    @classmethod
    def from_spec(cls, spec: ResolvedSpec, cfg_batch: bool = False) -> DFSettings:
        """A DF job's settings: `mode` from the spec's mode (`serve.contracts.DF_MODE`), `last_image`
        from `has_last_image`, `cfg_batch` the replica's lever; every other field is the spec's of that name."""
        derived = {"mode": DF_MODE[spec.mode], "last_image": spec.has_last_image, "cfg_batch": cfg_batch}
        return cls(**{f.name: getattr(spec, f.name) for f in fields(cls) if f.name not in derived}, **derived)

    def plan(self) -> WindowPlan:
        return plan_windows(self.num_frames, self.base_num_frames, self.overlap_history, self.causal_block_size,
                            self.mode, self.last_image)


@dataclass
class DFJob:
    """One DF generation. `on_step(step, total)` after each transformer iteration, counted over all
    windows; `on_window(index, num_windows, latents)` when a window ends, with the latents it adds
    to the video (final: later windows only read them). For "v2v" the first window's include its
    prefix, the source's encoded end: decode them all and drop the first `overlap_history` frames
    (`extension_frames`) to get the new frames with the same causal context as one decode."""

    seed: int
    prompt_embeds: np.ndarray  # (1, L, D)
    negative_prompt_embeds: np.ndarray | None  # (1, L, D) when guidance > 1
    # Normalised fp32 latents (1, C, n, h, w) from `serve.pipeline.vae_encode.encode`, the first
    # window's prefix: "i2v" the image (n = 1), "v2v" the source's last `overlap_history` frames
    # (n = latent_frames(overlap_history)); None for "t2v".
    condition_latents: np.ndarray | None = None
    # "i2v" with `DFSettings.last_image`: the last image's latent frame (1, C, 1, h, w), likewise encoded
    end_latents: np.ndarray | None = None
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
        self.dtype = model_dtype(transformer)
        self.forward = TransformerForward(transformer, fault=fault)  # the same model call as the T2V loops
        self.steps_run = 0

    @property
    def fault(self) -> str | None:
        return self.forward.fault

    def _scheduler(self, flow_shift: float, num_inference_steps: int):
        return make_scheduler(self.scheduler_config, flow_shift, num_inference_steps, self.device)

    def total_steps(self, s: DFSettings) -> int:
        """Transformer iterations over all windows (what `on_step`'s `total` counts)."""
        plan = s.plan()
        timesteps = self._scheduler(s.flow_shift, s.num_inference_steps).timesteps
        return sum(len(self._matrix(plan, k, timesteps, s)[0]) for k in range(plan.num_windows))

    @staticmethod
    def _matrix(plan: WindowPlan, k: int, timesteps, s: DFSettings):
        """Window k's timestep matrix, sized by the window in every mode: diffusers' T2V and V2V
        pipelines pass the window's size (one window: the whole video's), and the I2V pipeline's
        `base_latent_num_frames` is that too wherever it runs (see the module docstring). The end
        frame of a last image is in the matrix (so it sets how many iterations the window takes),
        then fixed at timestep 0 and never updated."""
        size = plan.window_latent_frames[k]
        step_matrix, update_mask, intervals = timestep_matrix(size, timesteps, size, s.ar_step,
                                                              plan.prefix_latent_frames[k], s.causal_block_size)
        if plan.end_latent_frames and k == plan.num_windows - 1:
            step_matrix[:, -plan.end_latent_frames:] = 0
            update_mask[:, -plan.end_latent_frames:] = False
        return step_matrix, update_mask, intervals

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
        self.plan = plan = s.plan()
        self.condition, self.end = self._conditions(plan, job, s)
        self.scheduler = loop._scheduler(s.flow_shift, s.num_inference_steps)
        self.matrices = [loop._matrix(plan, k, self.scheduler.timesteps, s) for k in range(plan.num_windows)]
        job.window_steps = [len(m[0]) for m in self.matrices]
        self.total, self.done = sum(job.window_steps), 0

        # 2. The prompt embeddings, once for every window
        self.do_cfg = s.guidance_scale > 1.0
        if self.do_cfg and job.negative_prompt_embeds is None:
            raise ValueError("a job with guidance > 1 needs negative_prompt_embeds")
        self.cond = to_device(job.prompt_embeds, loop.device, loop.dtype)
        self.uncond = to_device(job.negative_prompt_embeds, loop.device, loop.dtype) if self.do_cfg else None
        # the same guider as the T2V loops: two calls, or one CFG batch
        self.guider = ClassifierFreeGuidance(batch_cond_uncond=s.cfg_batch)
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

    def _conditions(self, plan: WindowPlan, job: DFJob, s: DFSettings):
        """The job's condition and end latents as tensors, checked against the mode."""
        h, w = s.height // VAE_SPATIAL_FACTOR, s.width // VAE_SPATIAL_FACTOR
        channels = latent_channels(self.loop.transformer.config, i2v=False)  # the DF model's noise channels

        def tensor(name: str, latents, frames: int):
            if frames == 0:
                if latents is not None:
                    raise ValueError(f"{name} given, but this {s.mode} job (last_image={s.last_image}) takes none")
                return None
            if latents is None or tuple(latents.shape) != (1, channels, frames, h, w):
                raise ValueError(f"a {s.mode} job needs {name} of shape {(1, channels, frames, h, w)}, got "
                                 f"{None if latents is None else tuple(latents.shape)}")
            return to_device(np.asarray(latents, dtype=np.float32), self.loop.device)

        if plan.end_latent_frames and plan.window_latent_frames[-1] % s.causal_block_size:
            raise ValueError(f"the last window with the end frame has {plan.window_latent_frames[-1]} latent frames, "
                             f"not a multiple of causal_block_size ({s.causal_block_size})")
        return (tensor("condition_latents", job.condition_latents, plan.condition_latent_frames),
                tensor("end_latents", job.end_latents, plan.end_latent_frames))

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

        # 3. The window's noise, its first frames replaced by the end of the video so far (the
        # first window's by the condition: the image, or the source video's end), the last
        # window's end frame (a last image) appended
        loop, plan, s, k = self.loop, self.plan, self.s, self.window
        size, prefix = plan.window_latent_frames[k], plan.prefix_latent_frames[k]
        end = plan.end_latent_frames if k == plan.num_windows - 1 else 0
        h, w = s.height // VAE_SPATIAL_FACTOR, s.width // VAE_SPATIAL_FACTOR
        latents = randn_tensor((1, latent_channels(loop.transformer.config, i2v=False), size - end, h, w),
                               generator=self.generator,
                               device=loop.device, dtype=torch.float32)
        if prefix > 0:
            given = self.condition if k == 0 else self.carried_over
            latents[:, :, :prefix] = given[:, :, :prefix].to(loop.dtype)
        if end:
            latents = torch.cat([latents, self.end.to(loop.dtype)], dim=2)
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
        inp = ModelInput(latents=model_input, timestep=timestep, fps=self.fps_embeds)
        noise_pred = self.guider(loop.forward, inp, self.cond, self.uncond, [s.guidance_scale] * latents.shape[0])
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

        # 5. The window's new frames join the video; they are final (the end frame of a last image
        # leaves: it only steered the window)
        plan, latents = self.plan, self.latents
        if self.window == plan.num_windows - 1 and plan.end_latent_frames:
            latents = latents[:, :, :-plan.end_latent_frames]
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

