"""Image-to-video at the pipeline level: the CLIP embeddings, the condition (mask + VAE latents) and
the denoising loop with them equal what diffusers' `SkyReelsV2ImageToVideoPipeline` computes (CPU
fp32, decoded frames max |d| <= 1e-5) on the tiny I2V model: with and without guidance, with a last
image (on the tiny first-last-frame transformer), batched, with the step cache; and the tiny I2V
model round-trips through `save_pretrained` / `from_pretrained`."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from serve.pipeline.denoising import DenoiseJob, DenoiseLoop, LoopSettings, clone_scheduler_config
from serve.pipeline.image_conditioning import clip_image_embeds, i2v_condition
from serve.pipeline.step_cache import StepCache
from serve.pipeline.vae_decode import iter_decode, to_float_frames
from test_levers import psnr

PROMPT, NEGATIVE, SEED = "a cat walks on the grass", "low quality", 1234
W, H, F, STEPS = 48, 32, 9, 3
CPU = torch.device("cpu")


def _image(seed: int) -> np.ndarray:
    """A smooth random uint8 image (H, W, 3), at the video's size."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (H // 8, W // 8, 3), dtype=np.uint8)
    return np.asarray(PIL.Image.fromarray(small).resize((W, H), PIL.Image.BILINEAR))


IMAGE, LAST, OTHER = _image(1), _image(2), _image(3)


@pytest.fixture(scope="module")
def pipe():
    from serve.pipeline.tiny_model import build_tiny_pipeline

    return build_tiny_pipeline(seed=0, variant="i2v")


@pytest.fixture(scope="module")
def flf_pipe():
    from serve.pipeline.tiny_model import build_tiny_pipeline

    return build_tiny_pipeline(seed=0, variant="flf2v")


@pytest.fixture(scope="module")
def embeds(pipe):
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPT, NEGATIVE, do_classifier_free_guidance=True,
                                          max_sequence_length=512, device=CPU)
    return cond.numpy(), uncond.numpy()


def reference(pipe, image, guidance_scale, last_image=None, seed=SEED, output_type="np") -> np.ndarray:
    out = pipe(image=PIL.Image.fromarray(image), prompt=PROMPT, negative_prompt=NEGATIVE,
               last_image=None if last_image is None else PIL.Image.fromarray(last_image),
               height=H, width=W, num_frames=F, num_inference_steps=STEPS, guidance_scale=guidance_scale,
               generator=torch.Generator().manual_seed(seed), max_sequence_length=512, output_type=output_type)
    return out.frames.numpy() if output_type == "latent" else np.asarray(out.frames[0], dtype=np.float32)


def make_job(pipe, embeds, image, guidance_scale, last_image=None, seed=SEED, **kw) -> DenoiseJob:
    cond, uncond = embeds
    return DenoiseJob(
        seed=seed, prompt_embeds=cond, negative_prompt_embeds=uncond if guidance_scale > 1 else None,
        image_embeds=clip_image_embeds(pipe.image_encoder, pipe.image_processor, image, last_image),
        condition=i2v_condition(pipe.vae, image, F, H, W, last_image), **kw)


def run(pipe, jobs, guidance_scale, cfg_batch=False, step_cache=None, steps=STEPS):
    loop = DenoiseLoop(pipe.transformer, clone_scheduler_config(pipe.scheduler), CPU, step_cache=step_cache)
    loop.run(jobs, LoopSettings(width=W, height=H, num_frames=F, num_inference_steps=steps,
                                guidance_scale=guidance_scale, flow_shift=pipe.scheduler.config.flow_shift,
                                cfg_batch=cfg_batch))
    return jobs


def frames(pipe, latents: np.ndarray) -> np.ndarray:
    return to_float_frames(torch.cat(list(iter_decode(pipe.vae, torch.from_numpy(latents))), dim=2))


# -- the inputs ----------------------------------------------------------------------------------

def test_tiny_i2v_config(pipe, flf_pipe):
    cfg = pipe.transformer.config
    tower = pipe.image_encoder.config
    assert (cfg.in_channels, cfg.out_channels) == (36, 16)
    assert cfg.image_dim == tower.hidden_size
    assert cfg.added_kv_proj_dim == cfg.num_attention_heads * cfg.attention_head_dim
    assert cfg.pos_embed_seq_len is None  # as the SkyReels-V2 I2V checkpoints
    tokens = (tower.image_size // tower.patch_size) ** 2 + 1
    assert flf_pipe.transformer.config.pos_embed_seq_len == 2 * tokens
    assert pipe.image_processor.crop_size == {"height": tower.image_size, "width": tower.image_size}


@pytest.mark.parametrize("last", [False, True])
def test_clip_embeds_and_condition_equal_the_pipeline(pipe, last):
    last_image = LAST if last else None
    ours = clip_image_embeds(pipe.image_encoder, pipe.image_processor, IMAGE, last_image)
    with torch.no_grad():
        theirs = pipe.encode_image(PIL.Image.fromarray(IMAGE) if not last
                                   else [PIL.Image.fromarray(IMAGE), PIL.Image.fromarray(LAST)], CPU)
        vp = pipe.video_processor
        image = vp.preprocess(PIL.Image.fromarray(IMAGE), height=H, width=W).to(CPU, torch.float32)
        last_t = None if not last else vp.preprocess(PIL.Image.fromarray(LAST), height=H, width=W).float()
        _, condition = pipe.prepare_latents(image, 1, 16, H, W, F, torch.float32, CPU,
                                            torch.Generator().manual_seed(0), None, last_t)
    assert ours.shape == (2 if last else 1, 17, 32) and ours.dtype == np.float32
    assert np.array_equal(ours, theirs.numpy())
    cond = i2v_condition(pipe.vae, IMAGE, F, H, W, last_image)
    assert cond.shape == (1, 20, 3, H // 8, W // 8) and cond.dtype == np.float32
    assert np.array_equal(cond, condition.numpy())
    # the mask: 1 on the first frame (4 channels of latent frame 0), and on the last frame (the
    # last of the 4 frames folded into the last latent frame) with a last image
    assert (cond[0, :4, 0] == 1).all() and (cond[0, :3, 1:] == 0).all()
    assert (cond[0, 3, -1] == (1 if last else 0)).all()


def test_condition_refuses_an_image_of_another_size(pipe):
    with pytest.raises(ValueError, match="resize"):
        i2v_condition(pipe.vae, IMAGE[:, :32], F, H, W)


# -- the loop against the pipeline ---------------------------------------------------------------

@pytest.mark.fast
@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_frames_equal_diffusers_i2v_pipeline(pipe, embeds, guidance_scale):
    job, = run(pipe, [make_job(pipe, embeds, IMAGE, guidance_scale)], guidance_scale)
    assert job.result.shape == (1, 16, 3, H // 8, W // 8)
    assert np.abs(job.result - reference(pipe, IMAGE, guidance_scale, output_type="latent")).max() <= 1e-5
    expected = reference(pipe, IMAGE, guidance_scale)
    got = frames(pipe, job.result)
    assert got.shape == expected.shape == (F, H, W, 3)
    assert np.abs(got - expected).max() <= 1e-5


def test_frames_with_a_last_image_equal_diffusers(flf_pipe, embeds):
    job, = run(flf_pipe, [make_job(flf_pipe, embeds, IMAGE, 5.0, last_image=LAST)], 5.0)
    expected = reference(flf_pipe, IMAGE, 5.0, last_image=LAST)
    assert np.abs(frames(flf_pipe, job.result) - expected).max() <= 1e-5
    # the last image does condition the video
    other, = run(flf_pipe, [make_job(flf_pipe, embeds, IMAGE, 5.0, last_image=OTHER)], 5.0)
    assert np.abs(other.result - job.result).max() > 1e-2


def test_a_last_image_needs_a_first_last_frame_transformer(pipe, embeds):
    with pytest.raises(ValueError, match="pos_embed_seq_len"):
        run(pipe, [make_job(pipe, embeds, IMAGE, 5.0, last_image=LAST)], 5.0)


# -- batching, cancelling, the step cache --------------------------------------------------------

@pytest.mark.parametrize("cfg_batch", [False, True])
def test_a_batch_of_two_equals_two_single_runs(pipe, embeds, cfg_batch):
    singles = [run(pipe, [make_job(pipe, embeds, img, 5.0, seed=seed)], 5.0)[0].result
               for img, seed in ((IMAGE, SEED), (OTHER, SEED + 1))]
    batch = run(pipe, [make_job(pipe, embeds, IMAGE, 5.0, seed=SEED),
                       make_job(pipe, embeds, OTHER, 5.0, seed=SEED + 1)], 5.0, cfg_batch=cfg_batch)
    for job, single in zip(batch, singles):
        assert np.abs(frames(pipe, job.result) - frames(pipe, single)).max() <= 1e-5
    assert np.abs(batch[0].result - batch[1].result).max() > 1e-2  # different images, different videos


def test_a_cancelled_job_leaves_the_other_one_exact(pipe, embeds):
    single = run(pipe, [make_job(pipe, embeds, OTHER, 5.0, seed=SEED + 1)], 5.0)[0].result
    steps = []
    first = make_job(pipe, embeds, IMAGE, 5.0, on_step=lambda i, n: steps.append(i),
                     is_cancelled=lambda: len(steps) >= 1)
    second = make_job(pipe, embeds, OTHER, 5.0, seed=SEED + 1)
    run(pipe, [first, second], 5.0)
    assert first.cancelled and first.result is None
    assert np.abs(frames(pipe, second.result) - frames(pipe, single)).max() <= 1e-5


@pytest.mark.parametrize("cfg_batch", [False, True])
def test_step_cache_at_threshold_zero_is_exact_for_i2v(pipe, embeds, cfg_batch):
    plain, = run(pipe, [make_job(pipe, embeds, IMAGE, 5.0)], 5.0, cfg_batch=cfg_batch)
    cache = StepCache(threshold=0.0)
    cached, = run(pipe, [make_job(pipe, embeds, IMAGE, 5.0)], 5.0, cfg_batch=cfg_batch, step_cache=cache)
    assert np.array_equal(cached.result, plain.result)
    assert cache.skipped == 0 and cache.computed == (1 if cfg_batch else 2) * STEPS
    assert all(cache.stats()["branches"][b]["changes"] for b in cache.stats()["branches"])  # it did probe


def test_step_cache_skips_i2v_steps_and_reports_psnr(pipe, embeds, record_property, capsys):
    exact, = run(pipe, [make_job(pipe, embeds, IMAGE, 5.0)], 5.0, steps=4)
    cache = StepCache(threshold=10.0, warmup_steps=1, max_consecutive_skips=1)
    job, = run(pipe, [make_job(pipe, embeds, IMAGE, 5.0)], 5.0, step_cache=cache, steps=4)
    value = psnr(frames(pipe, job.result), frames(pipe, exact.result))
    record_property("i2v_step_cache_psnr_db", round(value, 2))
    with capsys.disabled():
        print(f"\n[lever] I2V step cache threshold=10 (one skip in a row), 4 steps: computed {cache.computed} "
              f"forwards, skipped {cache.skipped}; PSNR vs exact {value:.2f} dB")
    # step 1 of each branch is skipped (step 0 is the warmup, step 3 the last, step 2 follows a skip)
    assert {b: st["skipped"] for b, st in cache.stats()["branches"].items()} == {"cond": 1, "uncond": 1}
    assert not np.array_equal(job.result, exact.result)  # a step really was skipped ...
    # ... at a cost far below what a broken skip costs: 131.5 dB measured (CPU fp32; the tiny VAE
    # damps the latents' ~2e-4 mean change), ~50 dB when a skip reuses no residual, ~29 dB when the
    # skipped steps lose the image embeddings, ~28 dB for another seed
    assert value > 120.0


def test_mixed_or_incomplete_jobs_are_refused(pipe, embeds):
    cond, uncond = embeds
    t2v = DenoiseJob(seed=SEED, prompt_embeds=cond, negative_prompt_embeds=uncond)
    with pytest.raises(ValueError, match="mix"):
        run(pipe, [make_job(pipe, embeds, IMAGE, 5.0), t2v], 5.0)
    with pytest.raises(ValueError, match="image condition"):
        run(pipe, [t2v], 5.0)
    half = make_job(pipe, embeds, IMAGE, 5.0)
    half.image_embeds = None
    with pytest.raises(ValueError, match="both"):
        run(pipe, [half], 5.0)


# -- the folder ----------------------------------------------------------------------------------

def test_tiny_i2v_model_round_trips_through_from_pretrained(pipe, tmp_path):
    from diffusers import SkyReelsV2ImageToVideoPipeline

    from serve.pipeline.tiny_model import make_tiny_model

    folder = make_tiny_model(tmp_path / "tiny-i2v", seed=0, variant="i2v")
    assert (folder / "image_encoder").is_dir() and (folder / "image_processor").is_dir()
    loaded = SkyReelsV2ImageToVideoPipeline.from_pretrained(folder)
    for name in ("text_encoder", "image_encoder", "transformer", "vae"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name  # same seed, same weights
    assert type(loaded.image_processor) is type(pipe.image_processor)
    assert loaded.image_processor.to_dict() == pipe.image_processor.to_dict()
    assert loaded.transformer.config.in_channels == 36
    assert np.array_equal(clip_image_embeds(loaded.image_encoder, loaded.image_processor, IMAGE),
                          clip_image_embeds(pipe.image_encoder, pipe.image_processor, IMAGE))
