"""Speed levers in process on the tiny model: the exact ones reproduce diffusers' SkyReelsV2Pipeline
frames (max |Δ| ≤ 1e-5, CPU fp32); the approximate ones report their PSNR against the exact run.

The PSNR each approximate lever reaches is written as a pytest user property (`-rA` / junit xml)
and printed; the thresholds asserted here are loose sanity floors, not quality targets.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from serve.config import LeversConfig, ModelConfig
from serve.pipeline.denoising import DenoiseJob, DenoiseLoop, LoopSettings, clone_scheduler_config
from serve.pipeline.vae_decode import denormalize_and_decode, to_float_frames
from serve.pipeline.levers import apply_levers, cast_model, main_dtype
from serve.pipeline.step_cache import StepCache
from serve.pipeline.text_encoding import encode_prompts
from serve.pipeline.tiny_model import build_tiny_pipeline

W, H, F = 64, 64, 9
PROMPT, NEGATIVE, SEED = "a cat walks on the grass", "low quality", 7
CPU = torch.device("cpu")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(0)


@pytest.fixture(scope="module")
def embeds(pipe):
    cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, [PROMPT], 512, CPU)
    uncond = encode_prompts(pipe.tokenizer, pipe.text_encoder, [NEGATIVE], 512, CPU)
    return cond, uncond


def pipeline_frames(pipe, steps: int, seed: int = SEED) -> np.ndarray:
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=H, width=W, num_frames=F,
               num_inference_steps=steps, guidance_scale=6.0, generator=torch.Generator().manual_seed(seed),
               output_type="np")
    return np.asarray(out.frames[0], dtype=np.float32)


def loop_latents(pipe, embeds, steps: int, *, cache=None, cfg_batch=False, seeds=(SEED,), transformer=None,
                 cancel_after: dict | None = None):
    cond, uncond = embeds
    loop = DenoiseLoop(transformer or pipe.transformer, clone_scheduler_config(pipe.scheduler), CPU,
                       step_cache=cache)
    jobs = []
    for seed in seeds:
        state = {"step": 0}
        limit = (cancel_after or {}).get(seed)

        def on_step(i, total, state=state):
            state["step"] = i

        jobs.append(DenoiseJob(seed=seed, prompt_embeds=cond, negative_prompt_embeds=uncond, on_step=on_step,
                               is_cancelled=(lambda st=state, lim=limit: lim is not None and st["step"] >= lim)))
    loop.run(jobs, LoopSettings(width=W, height=H, num_frames=F, num_inference_steps=steps, guidance_scale=6.0,
                                flow_shift=8.0, cfg_batch=cfg_batch))
    return jobs


def decode(pipe, latents: np.ndarray) -> np.ndarray:
    return to_float_frames(denormalize_and_decode(pipe.vae, torch.from_numpy(latents)))


# -- step cache ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg_batch", [False, True])
def test_step_cache_at_threshold_zero_is_exact(pipe, embeds, cfg_batch):
    steps = 6
    ref = pipeline_frames(pipe, steps)
    cache = StepCache(threshold=0.0)
    (job,) = loop_latents(pipe, embeds, steps, cache=cache, cfg_batch=cfg_batch)
    frames = decode(pipe, job.result)
    assert np.abs(frames - ref).max() <= 1e-5
    assert cache.skipped == 0
    assert cache.computed == (steps if cfg_batch else 2 * steps)


def test_step_cache_skips_steps_and_reports_psnr(pipe, embeds, record_property, capsys):
    steps = 10
    (exact,) = loop_latents(pipe, embeds, steps)
    exact_frames = decode(pipe, exact.result)
    cache = StepCache(threshold=0.2)
    (job,) = loop_latents(pipe, embeds, steps, cache=cache)
    frames = decode(pipe, job.result)
    value = psnr(frames, exact_frames)
    record_property("step_cache_psnr_db", round(value, 2))
    record_property("step_cache_skipped", cache.skipped)
    with capsys.disabled():
        print(f"\n[lever] step cache threshold=0.2, {steps} steps: computed {cache.computed} forwards, "
              f"skipped {cache.skipped}; PSNR vs exact {value:.2f} dB")
    assert cache.skipped > 0
    assert np.isfinite(frames).all()
    assert value > 20.0
    # the first and the last step of each branch are always computed
    for branch in ("cond", "uncond"):
        st = cache.stats()["branches"][branch]
        assert st["computed"] >= 2 and st["computed"] + st["skipped"] == steps


def test_step_cache_decides_the_same_with_and_without_cfg_batch(pipe, embeds):
    steps = 10
    separate, batched = StepCache(threshold=0.2), StepCache(threshold=0.2)
    (a,) = loop_latents(pipe, embeds, steps, cache=separate)
    (b,) = loop_latents(pipe, embeds, steps, cache=batched, cfg_batch=True)
    assert batched.skipped == separate.stats()["branches"]["cond"]["skipped"]
    np.testing.assert_allclose(a.result, b.result, atol=1e-5)


@pytest.mark.parametrize("cfg_batch", [False, True])
def test_step_cache_follows_the_batch_when_a_job_is_cancelled(pipe, embeds, cfg_batch):
    steps = 6
    (alone,) = loop_latents(pipe, embeds, steps, seeds=(11,))
    jobs = loop_latents(pipe, embeds, steps, cache=StepCache(threshold=0.0), cfg_batch=cfg_batch,
                        seeds=(SEED, 11), cancel_after={SEED: 3})
    assert jobs[0].cancelled and jobs[0].result is None
    np.testing.assert_allclose(jobs[1].result, alone.result, atol=1e-5)
    # with a threshold that skips, the survivor is its own solo run with the same cache settings:
    # the same steps skipped, and each skip reuses the survivor's own row of the sliced residuals
    # (the cancelled job's row instead moves the latents by ~2e-2)
    solo_cache = StepCache(threshold=0.5)
    (solo,) = loop_latents(pipe, embeds, steps, cache=solo_cache, cfg_batch=cfg_batch, seeds=(11,))
    cache = StepCache(threshold=0.5)
    jobs = loop_latents(pipe, embeds, steps, cache=cache, cfg_batch=cfg_batch, seeds=(SEED, 11),
                        cancel_after={SEED: 2})
    assert jobs[0].cancelled and jobs[0].result is None
    skipped = {b: st["skipped"] for b, st in cache.stats()["branches"].items()}
    assert skipped == {b: st["skipped"] for b, st in solo_cache.stats()["branches"].items()}
    assert all(n > 0 for n in skipped.values()), skipped
    np.testing.assert_allclose(jobs[1].result, solo.result, atol=1e-5)


# (the counters of both step-cache backends: tests/test_step_cache_backends.py)


# -- model levers (serve.pipeline.levers.apply_levers) ----------------------------------------------------

def test_apply_levers_with_defaults_changes_nothing(pipe):
    applied = apply_levers(pipe.transformer, pipe.vae, LeversConfig(), ModelConfig())
    assert applied == {"transformer_dtype": "float32", "attention_backend": "native", "vae_dtype": "float32"}
    assert not pipe.vae.use_tiling


def test_compile_lever_reproduces_the_pipeline(embeds):
    steps = 3
    pipe = build_tiny_pipeline(0)
    ref = pipeline_frames(pipe, steps)
    applied = apply_levers(pipe.transformer, pipe.vae, LeversConfig(compile_transformer=True), ModelConfig())
    assert applied["compile"] == "compile_repeated_blocks"
    assert apply_levers(pipe.transformer, None, LeversConfig(compile_transformer=True))["compile"] == "already"
    (job,) = loop_latents(pipe, embeds, steps)
    assert np.abs(decode(pipe, job.result) - ref).max() <= 1e-5
    # the step cache calls the (compiled) blocks itself
    (cached,) = loop_latents(pipe, embeds, steps, cache=StepCache(threshold=0.0))
    assert np.abs(decode(pipe, cached.result) - ref).max() <= 1e-5


def test_bf16_lever_keeps_fp32_modules_and_reports_psnr(embeds, record_property, capsys):
    steps = 6
    exact_pipe = build_tiny_pipeline(0)
    ref = pipeline_frames(exact_pipe, steps)
    pipe = build_tiny_pipeline(0)
    applied = apply_levers(pipe.transformer, pipe.vae, LeversConfig(), ModelConfig(dtype="bfloat16"))
    assert applied["transformer_dtype"] == "bfloat16" and applied["vae_dtype"] == "float32"
    assert main_dtype(pipe.transformer) == torch.bfloat16 and pipe.transformer.dtype == torch.bfloat16
    kept = {n for n, p in pipe.transformer.named_parameters() if p.dtype == torch.float32}
    assert "scale_shift_table" in kept and "blocks.0.norm2.weight" in kept
    assert "blocks.0.attn1.to_q.weight" not in kept
    (job,) = loop_latents(pipe, embeds, steps)
    frames = decode(pipe, job.result)
    # CineVivid's loop in bf16 equals diffusers' pipeline in bf16 ...
    assert np.abs(frames - pipeline_frames(pipe, steps)).max() <= 1e-5
    # ... and costs this much against fp32
    value = psnr(frames, ref)
    record_property("bf16_psnr_db", round(value, 2))
    with capsys.disabled():
        print(f"\n[lever] bf16 DiT (fp32 VAE), {steps} steps: PSNR vs fp32 {value:.2f} dB")
    assert value > 20.0


def test_cast_model_matches_from_pretrained(tmp_path):
    from diffusers import SkyReelsV2Transformer3DModel

    pipe = build_tiny_pipeline(0)
    pipe.transformer.save_pretrained(tmp_path / "t")
    loaded = SkyReelsV2Transformer3DModel.from_pretrained(tmp_path / "t", torch_dtype=torch.bfloat16)
    cast = cast_model(pipe.transformer, torch.bfloat16)
    want = {n: p.dtype for n, p in loaded.named_parameters()}
    got = {n: p.dtype for n, p in cast.named_parameters()}
    assert got == want


def test_vae_tiling_lever(pipe, embeds, record_property, capsys):
    (job,) = loop_latents(pipe, embeds, 3)
    exact = decode(pipe, job.result)
    vae = build_tiny_pipeline(0).vae
    apply_levers(None, vae, LeversConfig(vae_tiling=True), ModelConfig())
    assert vae.use_tiling
    # frames smaller than one tile (256 px): tiling is a no-op, exact
    tiled = to_float_frames(denormalize_and_decode(vae, torch.from_numpy(job.result)))
    assert np.abs(tiled - exact).max() <= 1e-5
    # force tiles smaller than the frame to exercise the seams, and report the cost
    vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=16,
                      tile_sample_stride_width=16)
    tiled = to_float_frames(denormalize_and_decode(vae, torch.from_numpy(job.result)))
    value = psnr(tiled, exact)
    record_property("vae_tiling_psnr_db", round(value, 2))
    with capsys.disabled():
        print(f"\n[lever] VAE tiling with 32 px tiles on {W}x{H}: PSNR vs untiled {value:.2f} dB")
    assert tiled.shape == exact.shape and value > 15.0
