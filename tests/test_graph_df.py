"""Diffusion forcing through the deployed graph (TextEncoder -> Transformer window by window -> VAE):
the frames equal diffusers' `SkyReelsV2DiffusionForcingPipeline` on the embedded tiny model (whose
transformer has the DF-14B config), and the step events count every window's iterations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve.pipeline.diffusion_forcing import addnoise_seed

# 3 windows of 4 latent frames carrying 2, asynchronous: blocks of 2 latent frames, 2 steps apart
DF = dict(width=32, height=32, num_frames=29, num_inference_steps=2, base_num_frames=13, overlap_history=5,
          ar_step=2, causal_block_size=2, addnoise_condition=20.0, fps=8)


@pytest.fixture(scope="module")
def df_pipeline(tiny_model_dir):
    from diffusers import SkyReelsV2DiffusionForcingPipeline

    return SkyReelsV2DiffusionForcingPipeline.from_pretrained(tiny_model_dir)


def test_long_video_frames_equal_diffusers_df_pipeline(graph_app, df_pipeline):
    prompt, negative, seed = "a red fox running through snow", "blurry, low quality", 77
    torch.manual_seed(addnoise_seed(seed))  # diffusers draws addnoise_condition's noise from the global RNG
    expected = df_pipeline(prompt, negative_prompt=negative, guidance_scale=6.0, max_sequence_length=512,
                           generator=torch.Generator().manual_seed(seed), **DF).frames[0]
    events = list(graph_app.stream({"prompt": prompt, "negative_prompt": negative, "seed": seed,
                                    "guidance_scale": 6.0, "return_frames": True, **DF}))
    result = events[-1].result
    assert result.frames.shape == expected.shape == (29, 32, 32, 3)
    assert np.abs(result.frames - expected).max() <= 1e-5
    assert result.num_frames == 29 and result.spec.is_diffusion_forcing and result.spec.ar_step == 2

    steps = [e for e in events if e.type == "step"]
    total = steps[0].total_steps
    assert total > 3 * DF["num_inference_steps"]  # 3 windows, each block 2 steps behind the one before
    assert [e.step for e in steps] == list(range(1, total + 1)) and {e.total_steps for e in steps} == {total}
    progress = [e.progress for e in events]
    assert progress == sorted(progress) and progress[-1] == 100


def test_a_t2v_job_after_a_df_job_is_plain_t2v(graph_app, tiny_model_dir):
    """The DF job's causal_block_size does not stay on the shared transformer: a T2V job after it
    still equals diffusers' SkyReelsV2Pipeline."""
    from diffusers import SkyReelsV2Pipeline

    t2v = dict(width=32, height=32, num_frames=9, num_inference_steps=2)
    graph_app.generate({"prompt": "a tram", "seed": 1, **DF})
    result = graph_app.generate({"prompt": "a lighthouse at dusk", "seed": 5, "guidance_scale": 1.0,
                                 "return_frames": True, **t2v})
    assert not result.spec.is_diffusion_forcing
    expected = SkyReelsV2Pipeline.from_pretrained(tiny_model_dir)(
        "a lighthouse at dusk", guidance_scale=1.0, generator=torch.Generator().manual_seed(5),
        max_sequence_length=512, **t2v).frames[0]
    assert np.abs(result.frames - expected).max() <= 1e-5


def test_long_video_is_delivered_window_by_window(graph_app):
    """Each window's frames come out as a "window" event once final: playable seconds grow, the
    fragments appended make a valid MP4 of the frames so far, and the windows' frames are the video's."""
    import io

    import av

    events = list(graph_app.stream({"prompt": "a long walk", "seed": 3, "guidance_scale": 1.0,
                                    "return_frames": True, **DF}))
    windows = [e for e in events if e.type == "window"]
    assert [(e.window, e.num_windows) for e in windows] == [(0, 3), (1, 3), (2, 3)]
    assert windows[0].fragment[4:8] == b"ftyp"  # the first carries the init segment
    preview, decoded = b"", []
    for e in windows:
        preview += e.fragment
        with av.open(io.BytesIO(preview)) as container:
            decoded.append(sum(1 for _ in container.decode(video=0)))
        assert e.playable_s == decoded[-1] / DF["fps"]
        assert "fragment" not in e.to_json() and '"window"' in e.to_json()
    assert decoded == [13, 21, 29]  # 4 latent frames, then 2 new ones per window (4 pixel frames each)
    result = events[-1].result
    frames = np.concatenate([e.frames for e in windows])
    assert frames.shape == (29, 32, 32, 3)
    assert np.array_equal(frames, (result.frames * 255).round().astype(np.uint8))
    with av.open(io.BytesIO(result.mp4)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 29
