"""Fair sharing between long and short jobs on one Transformer replica: a diffusion-forcing job
runs window by window and a short job submitted during it runs between two windows, finishing
first, while the long job's latents stay exactly those of the same job run alone; and a DF job
cancelled mid-window stops within one step."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from serve.stages import TRANSFORMER
from stage_calls import denoise as _denoise, prepare as _prepare

# 8 windows of 4 latent frames carrying 2 (69 frames), 6 iterations per window
LONG = dict(prompt="a long walk along the coast", negative_prompt="blurry", seed=21, width=32, height=32,
            num_frames=69, num_inference_steps=6, guidance_scale=6.0, base_num_frames=13, overlap_history=5,
            ar_step=0, causal_block_size=1, addnoise_condition=20.0, fps=8)
SHORT = dict(prompt="a short clip of a cat", seed=3, width=32, height=32, num_frames=5, num_inference_steps=2,
             guidance_scale=1.0)


async def test_short_job_runs_between_windows_of_a_long_one_and_leaves_it_unchanged(graph_app, stage_handle):
    transformer = stage_handle(TRANSFORMER.deployment)
    long_spec, long_embeds = await _prepare(stage_handle, LONG)
    short_spec, short_embeds = await _prepare(stage_handle, SHORT)
    assert long_spec.is_diffusion_forcing and not short_spec.is_diffusion_forcing
    alone = await _denoise(transformer.options(stream=True).denoise.remote(long_embeds, long_spec, "df-alone"))
    before = await transformer.stats.remote()

    finished: list[str] = []
    long_started = asyncio.Event()

    async def run(name, stream, on_step=None):
        latents = await _denoise(stream, on_step)
        finished.append(name)
        return latents

    long_task = asyncio.create_task(run("long", transformer.options(stream=True).denoise.remote(
        long_embeds, long_spec, "df-long"), on_step=lambda event: long_started.set()))
    await long_started.wait()  # the long job is part-way through its first window
    short = await run("short", transformer.options(stream=True).denoise.remote(short_embeds, short_spec, "short"))
    interleaved = await long_task

    assert finished == ["short", "long"]
    assert short.shape[2] == 2 and interleaved.shape == alone.shape and alone.shape[2] == 18
    assert np.array_equal(interleaved, alone)  # bit-identical despite the short job in between
    after = await transformer.stats.remote()
    assert after["df_interleaved"] == before["df_interleaved"] + 1
    assert after["df_slices_run"] - before["df_slices_run"] == 8  # one slice per window


async def test_df_job_cancelled_mid_window_stops_within_one_step(graph_app, stage_handle):
    transformer = stage_handle(TRANSFORMER.deployment)
    spec, embeds = await _prepare(stage_handle, LONG)
    before = await transformer.stats.remote()
    stream = transformer.options(stream=True).denoise.remote(embeds, spec, "df-cancelled")
    async for event in stream:
        if event.type == "step":
            if event.step == 3:  # the first window has 6 iterations
                stream.cancel()
                break
    deadline = time.monotonic() + 60
    while True:
        stats = await transformer.stats.remote()
        cancelled = [c for c in stats["cancellations"] if c["job_id"] == "df-cancelled"]
        if cancelled and stats["running"] == 0:
            break
        assert time.monotonic() < deadline, f"the cancelled DF job is still running: {stats}"
        await asyncio.sleep(0.02)
    assert cancelled[0]["steps_after_cancel"] <= 1, cancelled
    assert stats["steps_run"] - before["steps_run"] < 8 * 6  # it did not run to its end
    assert stats["df_running"] == 0
