"""The generation graph through Serve handles: fidelity to diffusers, the MP4, progress events."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from media_probe import probe_mp4

pytestmark = pytest.mark.fast  # the fast tier (make test)

SETTINGS = dict(width=96, height=64, num_frames=9, num_inference_steps=3)


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir):
    from diffusers import SkyReelsV2Pipeline

    return SkyReelsV2Pipeline.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("guidance_scale", [6.0, 1.0], ids=["cfg", "no-cfg"])
def test_frames_equal_diffusers_pipeline(graph_app, pipeline, guidance_scale):
    prompt, negative, seed = "a red fox running through snow", "blurry, low quality", 1234
    expected = pipeline(prompt, negative_prompt=negative, guidance_scale=guidance_scale,
                        generator=torch.Generator().manual_seed(seed), max_sequence_length=512,
                        **SETTINGS).frames[0]
    result = graph_app.generate({"prompt": prompt, "negative_prompt": negative, "seed": seed,
                                 "guidance_scale": guidance_scale, "return_frames": True, **SETTINGS})
    assert result.frames.shape == expected.shape == (9, 64, 96, 3)
    assert np.abs(result.frames - expected).max() <= 1e-5
    assert result.spec.seed == seed


def test_mp4_and_thumbnail_are_what_was_asked(graph_app):
    result = graph_app.generate({"prompt": "waves on a beach", "seed": 5, "fps": 12, "width": 128,
                                 "height": 80, "num_frames": 13, "num_inference_steps": 2})
    info = probe_mp4(result.mp4)
    assert len(info["video"]) == 1 and info["audio"] == []
    video = info["video"][0]
    assert (video["codec"], video["width"], video["height"], video["frames"]) == ("h264", 128, 80, 13)
    assert video["fps"] == pytest.approx(12)
    thumb = Image.open(io.BytesIO(result.thumbnail_jpeg))
    assert thumb.format == "JPEG" and thumb.size == (128, 80)
    assert (result.width, result.height, result.num_frames, result.fps) == (128, 80, 13, 12)
    assert result.duration_s == pytest.approx(13 / 12)
    assert [t.stage for t in result.timings] == ["text_encoder", "transformer", "vae", "mux"]


def test_same_seed_same_video_different_seed_different_video(graph_app):
    spec = {"prompt": "a lighthouse at dusk", "num_inference_steps": 2, "return_frames": True}
    a = graph_app.generate({**spec, "seed": 11})
    b = graph_app.generate({**spec, "seed": 11})
    c = graph_app.generate({**spec, "seed": 12})
    assert np.array_equal(a.frames, b.frames)
    assert not np.allclose(a.frames, c.frames)


def test_one_step_event_per_denoising_step_then_result(graph_app):
    steps = 5
    events = list(graph_app.stream({"prompt": "a hot air balloon", "seed": 2, "num_inference_steps": steps}))
    step_events = [e for e in events if e.type == "step"]
    assert [e.step for e in step_events] == list(range(1, steps + 1))
    assert all(e.total_steps == steps for e in step_events)
    progress = [e.progress for e in events]
    assert progress == sorted(progress) and progress[-1] == 100
    assert events[-1].type == "result" and events[-1].result.mp4[4:8] == b"ftyp"
    assert sum(e.type == "result" for e in events) == 1
    stages = [(e.stage, e.stage_status) for e in events if e.type == "stage"]
    assert stages == [("text_encoder", "started"), ("text_encoder", "finished"), ("transformer", "started"),
                      ("transformer", "finished"), ("vae", "started"), ("vae", "finished"), ("mux", "started"),
                      ("mux", "finished")]


async def test_async_client_generate_and_stream(graph_app):
    result = await graph_app.agenerate({"prompt": "a tram in the rain", "seed": 3, "num_inference_steps": 2})
    assert result.mp4[4:8] == b"ftyp"
    kinds = [e.type async for e in graph_app.astream({"prompt": "a tram", "seed": 3, "num_inference_steps": 2})]
    assert kinds.count("step") == 2 and kinds[-1] == "result"
