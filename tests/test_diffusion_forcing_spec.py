"""Validation of the diffusion-forcing fields (`resolve_spec`): when a job is a DF job, the model's
defaults, and a clear error naming the field for each bad value. No Ray, no models."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve.config import DiffusionForcingConfig, ModelConfig
from serve.contracts import GenerationSpec
from serve.errors import InvalidSpecError
from serve.pipeline.spec import resolve_spec

pytestmark = pytest.mark.fast  # the fast tier (make test)

TINY = ModelConfig()  # the embedded default: windows of 65 frames carrying 17, up to 401 frames
DF_PRESET = ModelConfig(name="df", num_frames=97, max_frames=1457, max_width=960, max_height=960,
                        diffusion_forcing=DiffusionForcingConfig(mode="always", base_num_frames=97))


def resolve(model=TINY, **fields):
    return resolve_spec(GenerationSpec(prompt="a fox", **fields), model)


def test_t2v_until_the_window_then_diffusion_forcing_with_the_models_defaults():
    t2v = resolve(num_frames=65)
    assert not t2v.is_diffusion_forcing and t2v.base_num_frames is None and t2v.ar_step is None
    df = resolve(num_frames=401)
    assert df.is_diffusion_forcing
    assert (df.base_num_frames, df.overlap_history, df.ar_step, df.causal_block_size, df.addnoise_condition) == (
        65, 17, 0, 1, 20.0)
    # any DF field makes a short video a DF job (one window)
    assert resolve(num_frames=9, ar_step=0).is_diffusion_forcing
    # DF weights: every job
    assert resolve(DF_PRESET).is_diffusion_forcing
    assert resolve(DF_PRESET, num_frames=1457).num_frames == 1457  # 60 s at 24 fps


def test_a_model_without_diffusion_forcing_names_the_field():
    t2v_only = ModelConfig(diffusion_forcing=None, max_frames=65)
    with pytest.raises(InvalidSpecError) as err:
        resolve(t2v_only, overlap_history=17)
    assert err.value.param == "overlap_history" and "diffusion forcing" in err.value.message


@pytest.mark.parametrize("fields, param, words", [
    ({"num_frames": 405}, "num_frames", "at most 401"),
    ({"base_num_frames": 16}, "base_num_frames", "4k+1"),
    ({"base_num_frames": 1}, "base_num_frames", "at least 5"),
    ({"base_num_frames": 69}, "base_num_frames", "at most 65"),
    ({"overlap_history": 18}, "overlap_history", "4k+1"),
    ({"overlap_history": 0}, "overlap_history", "4k+1"),
    ({"base_num_frames": 17, "overlap_history": 17}, "overlap_history", "shorter than base_num_frames"),
    ({"base_num_frames": 17, "overlap_history": 14}, "overlap_history", "4k+1"),
    ({"ar_step": -1}, "ar_step", "between 0"),
    ({"ar_step": 101}, "ar_step", "and 100"),
    ({"causal_block_size": 0}, "causal_block_size", "at least 1"),
    # 65 frames = 17 latent frames: no block of 2 divides them
    ({"causal_block_size": 2}, "causal_block_size", "latent frames of base_num_frames"),
    # 33 frames = 9 latent frames: blocks of 3 fit; 17 carried = 5 latent frames do not
    ({"base_num_frames": 33, "causal_block_size": 3}, "causal_block_size", "overlap_history"),
    # windows of 8 latent frames carrying 2 (blocks of 2): 25 frames = 7 latent leave a last window of 3
    ({"num_frames": 25, "base_num_frames": 29, "overlap_history": 5, "causal_block_size": 2}, "num_frames",
     "not a multiple of causal_block_size"),
    ({"addnoise_condition": -1}, "addnoise_condition", "between 0 and 60"),
    ({"addnoise_condition": 61}, "addnoise_condition", "between 0 and 60"),
])
def test_each_bad_value_is_an_error_naming_its_field(fields, param, words):
    with pytest.raises(InvalidSpecError) as err:
        resolve(**fields)
    assert err.value.param == param
    assert words in err.value.message


def test_the_num_frames_error_suggests_lengths_that_fit():
    with pytest.raises(InvalidSpecError) as err:
        resolve(num_frames=25, base_num_frames=29, overlap_history=5, causal_block_size=2)
    suggested = [int(n) for n in err.value.message.split("fit: [")[1].rstrip("]").split(", ")]
    assert suggested and all(resolve(num_frames=n, base_num_frames=29, overlap_history=5,
                                     causal_block_size=2).num_frames == n for n in suggested)


def test_async_settings_of_the_skyreels_docs_resolve():
    spec = resolve(DF_PRESET, num_frames=257, ar_step=5, causal_block_size=5, addnoise_condition=20)
    assert (spec.base_num_frames, spec.overlap_history, spec.ar_step, spec.causal_block_size) == (97, 17, 5, 5)


def test_a_df_spec_remixes_into_the_same_df_spec():
    spec = resolve(num_frames=129, base_num_frames=33, overlap_history=17, ar_step=2, seed=3)
    again = resolve(**{k: v for k, v in spec.as_request().items() if k not in ("prompt", "model")})
    assert again == spec


def test_config_rejects_windows_that_cannot_work():
    for bad in ({"base_num_frames": 96}, {"overlap_history": 97}, {"causal_block_size": 2},
                {"base_num_frames": 121, "max_base_num_frames": 97}):
        with pytest.raises(ValidationError):
            DiffusionForcingConfig(**bad)
