"""Each new mode through the deployed graph (several models in one app, their stages shared where
they can be) gives diffusers' frames (CPU fp32, max |d| <= 1e-5): image-to-video on the I2V model
(`SkyReelsV2ImageToVideoPipeline`: the ImageEncoder deployment's CLIP embeddings and the VAE's
condition), image-to-video on the DF model (`SkyReelsV2DiffusionForcingImageToVideoPipeline`) and
the extension of a video (`SkyReelsV2DiffusionForcingVideoToVideoPipeline`, less the overlap it
shows twice). The calls go through the Python handle client, with the image as an array and the
video as MP4 bytes."""

from __future__ import annotations

import io

import av
import numpy as np
import PIL.Image
import pytest
import torch

from tests.http_fixtures import *  # noqa: F401,F403
from tests.http_fixtures import HTTP_APP

SEED, PROMPT = 5, "a lighthouse at dusk"
_Y, _X = np.mgrid[0:32, 0:32]
IMAGE = np.stack([_X * 8, _Y * 8, (_X + _Y) * 4], axis=-1).astype(np.uint8)
COMMON = {"prompt": PROMPT, "width": 32, "height": 32, "num_frames": 9, "num_inference_steps": 2, "seed": SEED,
          "return_frames": True}


@pytest.fixture(scope="module")
def client(http_env):
    from client.handle import GeneratorClient

    return GeneratorClient(HTTP_APP)


def _pipeline(cls, variant: str, flow_shift: float):
    """A diffusers pipeline on the tiny `variant` model, with the text encoder and the VAE the
    graph shares (the T2V model's: the tiny models build their tokenizers apart) and the scheduler
    at the model config's flow_shift."""
    from diffusers import UniPCMultistepScheduler

    from serve.pipeline.loading import tiny_model_path
    from serve.pipeline.tiny_model import make_tiny_model

    from diffusers import SkyReelsV2Pipeline

    make_tiny_model(tiny_model_path(variant=variant), variant=variant)
    pipe = cls.from_pretrained(tiny_model_path(variant=variant))
    t2v = SkyReelsV2Pipeline.from_pretrained(tiny_model_path())
    shared = cls(**{**pipe.components, "tokenizer": t2v.tokenizer, "text_encoder": t2v.text_encoder, "vae": t2v.vae})
    shared.scheduler = UniPCMultistepScheduler.from_config(shared.scheduler.config, flow_shift=flow_shift)
    shared.set_progress_bar_config(disable=True)
    return shared


def _mp4_frames(mp4: bytes) -> np.ndarray:
    with av.open(io.BytesIO(mp4)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_image_to_video_on_the_i2v_model_equals_diffusers(client):
    from diffusers import SkyReelsV2ImageToVideoPipeline

    result = client.generate({**COMMON, "model": "cinevivid-tiny-i2v"}, image=IMAGE)
    assert result.spec.mode == "image-to-video" and result.frames.shape == (9, 32, 32, 3)
    pipe = _pipeline(SkyReelsV2ImageToVideoPipeline, "i2v", flow_shift=5.0)
    with torch.no_grad():
        expected = pipe(image=PIL.Image.fromarray(IMAGE), prompt=PROMPT, negative_prompt="", height=32, width=32,
                        num_frames=9, num_inference_steps=2, guidance_scale=5.0, max_sequence_length=512,
                        generator=torch.Generator().manual_seed(SEED), output_type="np").frames[0]
    assert np.abs(result.frames - expected).max() <= 1e-5


@pytest.fixture(scope="module")
def df_pipes():
    from diffusers import (
        SkyReelsV2DiffusionForcingImageToVideoPipeline, SkyReelsV2DiffusionForcingVideoToVideoPipeline,
    )

    i2v = _pipeline(SkyReelsV2DiffusionForcingImageToVideoPipeline, "df", flow_shift=8.0)
    v2v = SkyReelsV2DiffusionForcingVideoToVideoPipeline(**i2v.components)
    v2v.set_progress_bar_config(disable=True)
    return i2v, v2v


DF = dict(base_num_frames=17, overlap_history=5, ar_step=0, causal_block_size=1, addnoise_condition=20.0,
          guidance_scale=6.0, fps=8, max_sequence_length=512, num_inference_steps=2, height=32, width=32)


def _df_reference(pipe, **kw) -> np.ndarray:
    from serve.pipeline.diffusion_forcing import addnoise_seed

    torch.manual_seed(addnoise_seed(SEED))  # diffusers draws addnoise_condition's noise from the global RNG
    with torch.no_grad():
        out = pipe(prompt=PROMPT, negative_prompt="", generator=torch.Generator().manual_seed(SEED), output_type="np",
                   **DF, **kw).frames[0]
    pipe.transformer._set_ar_attention(1)
    return out


def test_df_image_to_video_and_extension_equal_diffusers(client, df_pipes):
    i2v, v2v = df_pipes
    first = client.generate({**COMMON, "model": "cinevivid-tiny-df"}, image=IMAGE)
    assert first.spec.mode == "image-to-video" and first.spec.is_diffusion_forcing
    expected = _df_reference(i2v, image=PIL.Image.fromarray(IMAGE), num_frames=9)
    assert np.abs(first.frames - expected).max() <= 1e-5

    # extend what came out (the MP4's frames are the source for both), by 8 frames at the source's rate
    source = _mp4_frames(first.mp4)
    longer = client.generate({"prompt": PROMPT, "num_frames": 9, "num_inference_steps": 2, "seed": SEED,
                              "return_frames": True}, video=first.mp4)
    assert longer.spec.mode == "extend" and longer.spec.model == "cinevivid-tiny-df"
    assert longer.num_frames == 9 + 8 and longer.frames.shape[0] == 8  # float frames: the new ones
    # the source comes first, re-encoded (H.264 again: close, not equal)
    assert np.abs(_mp4_frames(longer.mp4)[:9].astype(float) - source).mean() < 4
    expected = _df_reference(v2v, video=[PIL.Image.fromarray(f) for f in source], num_frames=5 + 8)
    # diffusers: the source, then every generated frame, the first 5 re-making the source's last 5
    assert np.abs(longer.frames - expected[9 + 5:]).max() <= 1e-5
