"""Diffusion forcing conditioned on an image or a video, at the pipeline level: the DF loop, given
the conditioning latents that `serve.pipeline.vae_encode` makes (what the VAE deployment computes),
equals diffusers' `SkyReelsV2DiffusionForcingImageToVideoPipeline` (the image as the first frame,
optionally a last image) and `SkyReelsV2DiffusionForcingVideoToVideoPipeline` (video extension) on
the tiny DF model, CPU fp32, max |d| <= 1e-5, frames and latents; `extension_frames` states the
extended video; the geometry of each mode; and where diffusers' I2V pipeline fails, the loop runs."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from serve.pipeline.diffusion_forcing import (
    DFJob, DFSettings, DiffusionForcingLoop, addnoise_seed, extension_frames, plan_windows,
)
from serve.pipeline.vae_decode import iter_decode, to_float_frames
from serve.pipeline.vae_encode import encode, to_model_input

PROMPT, NEGATIVE, SEED = "a red fox running through snow", "blurry, low quality", 1234
SIZE = dict(width=32, height=32, num_inference_steps=3, fps=24)

# the image and the last image: deterministic gradients of exactly the target size
_Y, _X = np.mgrid[0:32, 0:32]
IMAGE = np.stack([_X * 8, _Y * 8, (_X + _Y) * 4], axis=-1).astype(np.uint8)
LAST_IMAGE = np.stack([255 - _Y * 8, (_X * 5) % 256, np.full_like(_X, 90)], axis=-1).astype(np.uint8)
# the video to extend: 9 random frames (longer than overlap_history)
SOURCE = np.random.default_rng(7).integers(0, 256, size=(9, 32, 32, 3), dtype=np.uint8)

DF = dict(ar_step=0, causal_block_size=1, addnoise_condition=20.0, guidance_scale=6.0)
I2V_CASES = {
    # one window: fewer frames than base_num_frames; the image is the prefix
    "one-window": dict(num_frames=13, base_num_frames=17, overlap_history=5, **DF),
    # 3 full windows of 4 latent frames, 2 carried (diffusers' I2V pipeline needs full windows)
    "sync-3-windows": dict(num_frames=29, base_num_frames=13, overlap_history=5, **DF),
    "last-image-one-window": dict(num_frames=13, base_num_frames=17, overlap_history=5, last_image=True, **DF),
    # 3 windows carrying 1 latent frame: the only long geometry in which diffusers runs a last image
    "last-image-3-windows": dict(num_frames=37, base_num_frames=13, overlap_history=1, last_image=True,
                                 **{**DF, "guidance_scale": 1.0}),
    # asynchronous: blocks of 2 latent frames (the image's block is denoised too: it is no whole block)
    "async-3-windows": dict(num_frames=29, base_num_frames=13, overlap_history=5,
                            **{**DF, "ar_step": 2, "causal_block_size": 2}),
}
V2V_CASES = {
    # windows of 4, 4, 3 latent frames, the first one's prefix the source's last 5 frames (2 latent)
    "sync-3-windows": dict(num_frames=25, base_num_frames=13, overlap_history=5, **DF),
    "async-3-windows-no-cfg": dict(num_frames=29, base_num_frames=13, overlap_history=5,
                                   **{**DF, "ar_step": 2, "causal_block_size": 2, "guidance_scale": 1.0}),
}


@pytest.fixture(scope="module")
def pipes():
    from diffusers import (
        SkyReelsV2DiffusionForcingImageToVideoPipeline, SkyReelsV2DiffusionForcingVideoToVideoPipeline,
    )

    from serve.pipeline.tiny_model import build_tiny_pipeline

    df = build_tiny_pipeline(seed=0, variant="df")
    i2v = SkyReelsV2DiffusionForcingImageToVideoPipeline(**df.components)
    v2v = SkyReelsV2DiffusionForcingVideoToVideoPipeline(**df.components)
    for pipe in (i2v, v2v):
        pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        embeds, negative = df.encode_prompt(PROMPT, NEGATIVE, do_classifier_free_guidance=True,
                                            max_sequence_length=512, device=torch.device("cpu"))
    return dict(df=df, i2v=i2v, v2v=v2v, embeds=embeds.numpy(), negative=negative.numpy())


def latents_of(vae, frames: np.ndarray) -> np.ndarray:
    """What the VAE deployment hands the loop: uint8 frames -> normalised latents."""
    return encode(vae, to_model_input(frames)).numpy()


def reference(pipe, case: dict, output_type: str, **inputs):
    torch.manual_seed(addnoise_seed(SEED))  # diffusers draws addnoise_condition's noise from the global RNG
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(SEED),
               max_sequence_length=512, output_type=output_type, **SIZE, **case, **inputs).frames
    pipe.transformer._set_ar_attention(1)  # diffusers leaves causal_block_size on the model
    return out.numpy() if output_type == "latent" else out[0]


def i2v_reference(pipes, case: dict, output_type: str = "np"):
    case = dict(case)
    last = PIL.Image.fromarray(LAST_IMAGE) if case.pop("last_image", False) else None
    return reference(pipes["i2v"], case, output_type, image=PIL.Image.fromarray(IMAGE), last_image=last)


def v2v_reference(pipes, case: dict, output_type: str = "np"):
    return reference(pipes["v2v"], case, output_type, video=[PIL.Image.fromarray(f) for f in SOURCE])


def run_loop(pipes, case: dict, mode: str, **job_kw) -> tuple[DFJob, np.ndarray]:
    df = pipes["df"]
    loop = DiffusionForcingLoop(df.transformer, dict(df.scheduler.config), torch.device("cpu"))
    job = DFJob(seed=SEED, prompt_embeds=pipes["embeds"],
                negative_prompt_embeds=pipes["negative"] if case["guidance_scale"] > 1 else None, **job_kw)
    loop.run(job, DFSettings(flow_shift=df.scheduler.config.flow_shift, mode=mode, **SIZE, **case))
    if not job.keep_result:
        return job, None
    video = torch.cat(list(iter_decode(df.vae, torch.from_numpy(job.result))), dim=2)
    return job, to_float_frames(video)


def i2v_job_inputs(pipes, case: dict) -> dict:
    vae = pipes["df"].vae
    return dict(condition_latents=latents_of(vae, IMAGE[None]),
                end_latents=latents_of(vae, LAST_IMAGE[None]) if case.get("last_image") else None)


@pytest.mark.parametrize("name", list(I2V_CASES))
def test_image_to_video_equals_diffusers_df_i2v_pipeline(pipes, name):
    case = I2V_CASES[name]
    plan = plan_windows(case["num_frames"], case["base_num_frames"], case["overlap_history"],
                        case["causal_block_size"], "i2v", case.get("last_image", False))
    assert plan.num_windows == (1 if "one-window" in name else 3)
    expected = i2v_reference(pipes, case)
    job, frames = run_loop(pipes, case, "i2v", **i2v_job_inputs(pipes, case))
    assert frames.shape == expected.shape == (case["num_frames"], 32, 32, 3)
    assert np.abs(frames - expected).max() <= 1e-5
    # the latents too; diffusers' keep the last image's end frame, which it drops before decoding
    latents = i2v_reference(pipes, case, "latent")
    if case.get("last_image"):
        assert np.abs(latents[:, :, -1:] - job.end_latents).max() <= 1e-5
        latents = latents[:, :, :-1]
    assert job.result.shape == latents.shape
    assert np.abs(job.result - latents).max() <= 1e-5
    assert pipes["df"].transformer.config.num_frame_per_block == 1


@pytest.mark.fast
@pytest.mark.parametrize("name", list(V2V_CASES))
def test_video_extension_equals_diffusers_df_v2v_pipeline(pipes, name):
    case = V2V_CASES[name]
    overlap = case["overlap_history"]
    plan = plan_windows(case["num_frames"], case["base_num_frames"], overlap, case["causal_block_size"], "v2v")
    assert plan.num_windows == 3 and plan.is_long
    condition = latents_of(pipes["df"].vae, SOURCE[-overlap:])
    job, frames = run_loop(pipes, case, "v2v", condition_latents=condition)
    # diffusers: the source, then every generated frame (the overlap re-made from the source included)
    expected = v2v_reference(pipes, case)
    source = to_float_frames(to_model_input(SOURCE))
    assert expected.shape == (len(SOURCE) + case["num_frames"], 32, 32, 3)
    assert np.abs(expected[:len(SOURCE)] - source).max() <= 1e-5
    assert frames.shape == (case["num_frames"], 32, 32, 3)
    assert np.abs(frames - expected[len(SOURCE):]).max() <= 1e-5
    assert np.abs(job.result - v2v_reference(pipes, case, "latent")).max() <= 1e-5
    # the prefix is the source's end, never updated: the first `overlap_history` generated frames
    # re-make the source's last ones, and the extended video shows them once
    assert np.array_equal(job.result[:, :, :plan.prefix_latent_frames[0]], condition)
    video = extension_frames(source, frames, overlap)
    assert video.shape == (len(SOURCE) + case["num_frames"] - overlap, 32, 32, 3)
    assert np.abs(video - np.concatenate([expected[:len(SOURCE)], expected[len(SOURCE) + overlap:]])).max() <= 1e-5


def test_conditioned_jobs_stream_window_by_window_and_resume_in_slices(pipes):
    """`keep_result=False` hands the same latents over, window by window (for "v2v" the first
    window's prefix included, for "i2v" without the end frame), and a job run one step at a time,
    with a T2V job on the same transformer in between, equals one run."""
    case = V2V_CASES["sync-3-windows"]
    condition = latents_of(pipes["df"].vae, SOURCE[-case["overlap_history"]:])
    alone, _ = run_loop(pipes, case, "v2v", condition_latents=condition)
    windows = []
    run_loop(pipes, case, "v2v", condition_latents=condition, keep_result=False,
             on_window=lambda k, n, latents: windows.append(latents))
    assert [w.shape[2] for w in windows] == [4, 2, 1]
    assert np.array_equal(np.concatenate(windows, axis=2), alone.result)

    case = I2V_CASES["last-image-3-windows"]
    alone, _ = run_loop(pipes, case, "i2v", **i2v_job_inputs(pipes, case))
    df = pipes["df"]
    loop = DiffusionForcingLoop(df.transformer, dict(df.scheduler.config), torch.device("cpu"))
    windows = []
    job = DFJob(seed=SEED, prompt_embeds=pipes["embeds"], negative_prompt_embeds=None,
                on_window=lambda k, n, latents: windows.append(latents), **i2v_job_inputs(pipes, case))
    run = loop.start(job, DFSettings(flow_shift=df.scheduler.config.flow_shift, mode="i2v", **SIZE, **case))
    while not run.finished:
        run.advance("step")
        loop.run(DFJob(seed=5, prompt_embeds=pipes["embeds"], negative_prompt_embeds=None),
                 DFSettings(flow_shift=df.scheduler.config.flow_shift, **{**SIZE, **I2V_CASES["one-window"],
                                                                        "num_frames": 5, "guidance_scale": 1.0}))
    assert np.array_equal(job.result, alone.result)
    assert [w.shape[2] for w in windows] == [4, 3, 3]  # the end frame is not the video's
    assert np.array_equal(np.concatenate(windows, axis=2), job.result)


@pytest.mark.parametrize("case", [
    # the last window shorter than a full one: diffusers indexes past it (IndexError)
    dict(num_frames=25, base_num_frames=13, overlap_history=5, **DF),
    # a last image after a prefix of 2 latent frames: diffusers fixes 2 end frames but appends 1 (RuntimeError)
    dict(num_frames=29, base_num_frames=13, overlap_history=5, last_image=True, **DF),
], ids=["short-last-window", "last-image-after-2-carried"])
def test_where_diffusers_i2v_pipeline_fails_the_loop_runs(pipes, case):
    """The two places the module docstring says the loop differs from diffusers (which raises
    there); if diffusers stops raising, compare instead."""
    with pytest.raises((IndexError, RuntimeError)):
        i2v_reference(pipes, case, "latent")
    job, frames = run_loop(pipes, case, "i2v", **i2v_job_inputs(pipes, case))
    assert frames.shape == (case["num_frames"], 32, 32, 3) and np.isfinite(frames).all()
    assert job.result.shape[2] == plan_windows(case["num_frames"], 13, 5).num_latent_frames


def test_windows_of_each_mode():
    # T2V: the defaults are the T2V plan
    assert plan_windows(25, 13, 5) == plan_windows(25, 13, 5, 1, "t2v")
    assert plan_windows(25, 13, 5).prefix_latent_frames == (0, 2, 2)
    # I2V: the image is the first window's prefix; a last image lengthens the last window by one
    one = plan_windows(13, 17, 5, mode="i2v")
    assert (one.is_long, one.window_latent_frames, one.prefix_latent_frames, one.end_latent_frames) == (
        False, (4,), (1,), 0)
    last = plan_windows(37, 13, 1, mode="i2v", last_image=True)
    assert (last.num_latent_frames, last.window_latent_frames, last.prefix_latent_frames, last.end_latent_frames) == (
        10, (4, 4, 5), (1, 1, 1), 1)
    assert plan_windows(29, 13, 5, 2, "i2v").prefix_latent_frames == (1, 2, 2)  # the image: no whole block
    assert plan_windows(13, 17, 5, mode="i2v", last_image=True).window_latent_frames == (5,)
    # V2V: always long, the first window's prefix the source's encoded overlap; num_frames counts it
    v2v = plan_windows(25, 13, 5, mode="v2v")
    assert (v2v.is_long, v2v.window_latent_frames, v2v.prefix_latent_frames, v2v.condition_latent_frames) == (
        True, (4, 4, 3), (2, 2, 2), 2)
    short = plan_windows(13, 17, 5, mode="v2v")
    assert (short.is_long, short.window_latent_frames, short.prefix_latent_frames) == (True, (4,), (2,))
    with pytest.raises(ValueError, match="longer than overlap_history"):
        plan_windows(5, 17, 5, mode="v2v")
    with pytest.raises(ValueError, match="mode 'i2v'"):
        plan_windows(25, 13, 5, mode="v2v", last_image=True)


def test_a_job_without_the_conditioning_its_mode_needs_is_refused(pipes):
    df = pipes["df"]
    loop = DiffusionForcingLoop(df.transformer, dict(df.scheduler.config), torch.device("cpu"))
    settings = DFSettings(flow_shift=8.0, mode="i2v", last_image=True, **SIZE, **I2V_CASES["one-window"])
    image = latents_of(df.vae, IMAGE[None])
    for kw, words in [({}, "needs condition_latents"),
                      ({"condition_latents": image}, "needs end_latents"),
                      ({"condition_latents": np.concatenate([image, image], axis=2), "end_latents": image},
                       "needs condition_latents of shape")]:
        with pytest.raises(ValueError, match=words):
            loop.start(DFJob(seed=1, prompt_embeds=pipes["embeds"], negative_prompt_embeds=pipes["negative"], **kw),
                       settings)
    with pytest.raises(ValueError, match="takes none"):
        loop.start(DFJob(seed=1, prompt_embeds=pipes["embeds"], negative_prompt_embeds=pipes["negative"],
                         condition_latents=image),
                   DFSettings(flow_shift=8.0, **SIZE, **I2V_CASES["one-window"]))
