"""Diffusion forcing at the pipeline level: the DF loop's frames equal what diffusers'
`SkyReelsV2DiffusionForcingPipeline` returns (CPU fp32, max |d| <= 1e-5) on the tiny DF model, for
one window, several windows synchronous and asynchronous, with and without addnoise_condition and
guidance; and its events (steps over all windows, final latents per window)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve.errors import GenerationCancelled
from serve.pipeline.diffusion_forcing import (
    DFJob, DFSettings, DiffusionForcingLoop, addnoise_seed, plan_windows,
)
from serve.pipeline.vae_decode import iter_decode, to_float_frames

PROMPT, NEGATIVE, SEED = "a red fox running through snow", "blurry, low quality", 1234
SIZE = dict(width=32, height=32, num_inference_steps=3, fps=24)

CASES = {
    # one window: fewer frames than base_num_frames
    "one-window": dict(num_frames=13, base_num_frames=17, overlap_history=5, ar_step=0, causal_block_size=1,
                       addnoise_condition=20.0, guidance_scale=6.0),
    # 3 windows of 4 latent frames (the last one shorter: 3), 2 carried, synchronous
    "sync-3-windows": dict(num_frames=25, base_num_frames=13, overlap_history=5, ar_step=0, causal_block_size=1,
                           addnoise_condition=20.0, guidance_scale=6.0),
    "sync-3-windows-no-addnoise-no-cfg": dict(num_frames=25, base_num_frames=13, overlap_history=5, ar_step=0,
                                              causal_block_size=1, addnoise_condition=0.0, guidance_scale=1.0),
    # 3 windows, asynchronous: blocks of 2 latent frames, each 2 steps behind the one before
    "async-3-windows": dict(num_frames=29, base_num_frames=13, overlap_history=5, ar_step=2, causal_block_size=2,
                            addnoise_condition=20.0, guidance_scale=6.0),
    "async-3-windows-no-addnoise-no-cfg": dict(num_frames=29, base_num_frames=13, overlap_history=5, ar_step=2,
                                               causal_block_size=2, addnoise_condition=0.0, guidance_scale=1.0),
}


@pytest.fixture(scope="module")
def df_pipeline():
    from serve.pipeline.tiny_model import build_tiny_pipeline

    return build_tiny_pipeline(seed=0, variant="df")


def reference_frames(pipe, case: dict, output_type: str = "np") -> np.ndarray:
    torch.manual_seed(addnoise_seed(SEED))  # diffusers draws addnoise_condition's noise from the global RNG
    out = pipe(PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(SEED),
               max_sequence_length=512, output_type=output_type, **SIZE, **case).frames
    pipe.transformer._set_ar_attention(1)  # diffusers leaves causal_block_size on the model
    return out.numpy() if output_type == "latent" else out[0]


def run_loop(pipe, case: dict, **job_kw) -> tuple[DFJob, np.ndarray]:
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt(PROMPT, NEGATIVE, do_classifier_free_guidance=True,
                                              max_sequence_length=512, device=torch.device("cpu"))
    loop = DiffusionForcingLoop(pipe.transformer, dict(pipe.scheduler.config), torch.device("cpu"))
    job = DFJob(seed=SEED, prompt_embeds=embeds.numpy(),
                negative_prompt_embeds=negative.numpy() if case["guidance_scale"] > 1 else None, **job_kw)
    loop.run(job, DFSettings(flow_shift=pipe.scheduler.config.flow_shift, **SIZE, **case))
    video = torch.cat(list(iter_decode(pipe.vae, torch.from_numpy(job.result))), dim=2)
    return job, to_float_frames(video)


@pytest.mark.fast
@pytest.mark.parametrize("name", list(CASES))
def test_frames_equal_diffusers_df_pipeline(df_pipeline, name):
    case = CASES[name]
    plan = plan_windows(case["num_frames"], case["base_num_frames"], case["overlap_history"],
                        case["causal_block_size"])
    assert plan.num_windows == (1 if name == "one-window" else 3)
    expected = reference_frames(df_pipeline, case)
    job, frames = run_loop(df_pipeline, case)
    assert frames.shape == expected.shape == (case["num_frames"], 32, 32, 3)
    assert np.abs(frames - expected).max() <= 1e-5
    # the latents too: the tiny VAE damps differences (another addnoise_condition noise moves the
    # latents by ~3e-3 but the frames by only ~3e-6)
    assert np.abs(job.result - reference_frames(df_pipeline, case, "latent")).max() <= 1e-5
    # causal_block_size is put back on the shared transformer: a T2V job after this one sees none
    assert df_pipeline.transformer.config.num_frame_per_block == 1


def test_steps_count_over_all_windows_and_windows_hand_over_final_latents(df_pipeline):
    case = CASES["async-3-windows"]
    steps, windows = [], []
    job, _ = run_loop(df_pipeline, case, on_step=lambda step, total: steps.append((step, total)),
                      on_window=lambda k, n, latents: windows.append((k, n, latents)))
    total = sum(job.window_steps)
    assert len(job.window_steps) == 3 and total > 3 * SIZE["num_inference_steps"]  # async takes more steps
    assert steps == [(i, total) for i in range(1, total + 1)]
    assert [(k, n) for k, n, _ in windows] == [(0, 3), (1, 3), (2, 3)]
    # the windows' latents, put together, are the video's latents: each window's are final
    assert np.array_equal(np.concatenate([w for _, _, w in windows], axis=2), job.result)
    assert job.result.shape[2] == plan_windows(29, 13, 5, 2).num_latent_frames


def test_cancel_between_steps(df_pipeline):
    case = CASES["sync-3-windows"]
    steps = []
    with pytest.raises(GenerationCancelled):
        run_loop(df_pipeline, case, on_step=lambda step, total: steps.append(step),
                 is_cancelled=lambda: len(steps) >= 4)
    assert len(steps) == 4
    assert df_pipeline.transformer.config.num_frame_per_block == 1


@pytest.mark.parametrize("until", ["step", "window"])
def test_a_job_run_in_slices_with_another_job_in_between_equals_one_run(df_pipeline, until):
    """The resumable loop (what the Transformer interleaves with other jobs): sliced by step or by
    window, with another job (synchronous, one window, its own seed) run on the same transformer
    between slices, the latents are exactly those of one uninterrupted run, and between slices the
    transformer carries no causal_block_size."""
    case = CASES["async-3-windows"]
    alone, _ = run_loop(df_pipeline, case)
    with torch.no_grad():
        embeds, negative = df_pipeline.encode_prompt(PROMPT, NEGATIVE, do_classifier_free_guidance=True,
                                                     max_sequence_length=512, device=torch.device("cpu"))
    loop = DiffusionForcingLoop(df_pipeline.transformer, dict(df_pipeline.scheduler.config), torch.device("cpu"))
    flow_shift = df_pipeline.scheduler.config.flow_shift
    windows = []
    job = DFJob(seed=SEED, prompt_embeds=embeds.numpy(), negative_prompt_embeds=negative.numpy(),
                on_window=lambda k, n, latents: windows.append(k))
    run = loop.start(job, DFSettings(flow_shift=flow_shift, **SIZE, **case))
    slices = 0
    while not run.finished:
        run.advance(until)
        slices += 1
        assert df_pipeline.transformer.config.num_frame_per_block == 1
        other = DFJob(seed=slices, prompt_embeds=embeds.numpy(), negative_prompt_embeds=None)
        loop.run(other, DFSettings(flow_shift=flow_shift, **{**SIZE, **CASES["one-window"], "num_frames": 5,
                                                           "guidance_scale": 1.0}))
    assert slices == (sum(job.window_steps) if until == "step" else 3)
    assert windows == [0, 1, 2]
    assert np.array_equal(job.result, alone.result)
