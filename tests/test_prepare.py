"""A job that starts from an image or a video, resolved against the model set before any model work
(`serve.media.prepare`): which model runs it, the size an image gives it, what an extension makes,
and each refusal naming its field. No Ray."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

from serve.config import DiffusionForcingConfig, ModelConfig
from serve.contracts import GenerationInputs, GenerationSpec
from serve.errors import InvalidSpecError
from serve.media.prepare import prepare_job

pytestmark = pytest.mark.fast  # the fast tier (make test)

T2V = ModelConfig(name="t2v")
I2V = ModelConfig(name="i2v", pipeline="i2v", width=48, height=32)
DF = ModelConfig(name="df", pipeline="df", diffusion_forcing=DiffusionForcingConfig(
    mode="always", base_num_frames=33, max_base_num_frames=33, overlap_history=17))
MODELS = [T2V, I2V, DF]


def _mp4(frames: int, size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            img = np.full((size[1], size[0], 3), i * 20 % 256, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def test_an_image_goes_to_the_first_model_that_takes_one_and_turns_it_portrait():
    portrait = np.zeros((60, 40, 3), np.uint8)
    spec, inputs = prepare_job(GenerationSpec(prompt="p"), GenerationInputs(image=portrait), MODELS)
    assert (spec.model, spec.mode, spec.width, spec.height) == ("i2v", "image-to-video", 32, 48)
    assert inputs.image.shape == (48, 32, 3)
    spec, _ = prepare_job(GenerationSpec(prompt="p", model="df"), GenerationInputs(image=portrait), MODELS)
    assert spec.is_diffusion_forcing and spec.mode == "image-to-video"


@pytest.mark.parametrize("spec, inputs, param", [
    (GenerationSpec(prompt="p", model="t2v"), GenerationInputs(image=np.zeros((8, 8, 3), np.uint8)), "model"),
    (GenerationSpec(prompt="p", model="i2v"), GenerationInputs(image=np.zeros((8, 8, 3), np.uint8),
                                                               last_image=np.zeros((8, 8, 3), np.uint8)), "last_frame"),
    (GenerationSpec(prompt="p"), GenerationInputs(image=np.zeros((8, 8), np.uint8)), "input_reference"),
    (GenerationSpec(prompt="p", model="i2v"), GenerationInputs(image=b"not an image"), "input_reference"),
    (GenerationSpec(prompt="p", model="t2v", mode="extend"), GenerationInputs(video_mp4=b"x"), "model"),
])
def test_refusals_name_the_field(spec, inputs, param):
    with pytest.raises(InvalidSpecError) as exc:
        prepare_job(spec, inputs, MODELS)
    assert exc.value.param == param


def test_an_extension_keeps_the_source_size_and_rate_and_carries_what_a_short_source_has():
    source = _mp4(9)
    spec, _ = prepare_job(GenerationSpec(prompt="p", num_frames=9), GenerationInputs(video_mp4=source), MODELS)
    # the model carries 17 frames; the source has 9, so all 9 are carried, and 8 frames are added
    assert (spec.model, spec.mode, spec.width, spec.height, spec.fps) == ("df", "extend", 32, 32, 8)
    assert (spec.overlap_history, spec.num_frames, spec.added_frames, spec.output_frames) == (9, 17, 8, 17)
    with pytest.raises(InvalidSpecError) as exc:  # an overlap the request sets must be there
        prepare_job(GenerationSpec(prompt="p", overlap_history=13), GenerationInputs(video_mp4=source), MODELS)
    assert exc.value.param == "video"
    with pytest.raises(InvalidSpecError) as exc:  # a size the model cannot make
        prepare_job(GenerationSpec(prompt="p"), GenerationInputs(video_mp4=_mp4(9, (40, 32))), MODELS)
    assert exc.value.param == "video"
