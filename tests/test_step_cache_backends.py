"""The step cache's backends in process on the tiny model: cache-dit's DBCache
(`serve.pipeline.step_cache.dbcache.CacheDitStepCache`) beside the hand-written first-block cache, and
`make_step_cache(levers)`, the factory the deployment calls.

cache-dit at threshold 0 reproduces diffusers' SkyReelsV2Pipeline frames (max |Δ| ≤ 1e-5); with a
threshold that skips it reports its PSNR against the exact run as a pytest user property (like the
other approximate levers in tests/test_levers.py) and its stats count the skipped forwards.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from serve.config import LeversConfig
from serve.pipeline.step_cache import StepCache, make_step_cache
from serve.pipeline.step_cache.dbcache import CacheDitStepCache
from test_levers import decode, embeds, loop_latents, pipe, pipeline_frames, psnr  # noqa: F401 (pipe, embeds: fixtures)


@pytest.mark.parametrize("cfg_batch", [False, True])
def test_cache_dit_at_threshold_zero_is_exact(pipe, embeds, cfg_batch):
    steps = 6
    ref = pipeline_frames(pipe, steps)
    cache = CacheDitStepCache(threshold=0.0, taylorseer=True)
    (job,) = loop_latents(pipe, embeds, steps, cache=cache, cfg_batch=cfg_batch)
    assert np.abs(decode(pipe, job.result) - ref).max() <= 1e-5
    assert cache.skipped == 0
    assert cache.computed == (steps if cfg_batch else 2 * steps)
    # the transformer itself is not patched: its plain forward is untouched
    assert not hasattr(pipe.transformer, "_context_manager")


@pytest.mark.parametrize("taylorseer", [False, True])
def test_cache_dit_skips_steps_and_reports_psnr(pipe, embeds, taylorseer, record_property, capsys):
    steps = 10
    (exact,) = loop_latents(pipe, embeds, steps)
    exact_frames = decode(pipe, exact.result)
    cache = make_step_cache(LeversConfig(step_cache_threshold=0.2, step_cache_backend="cache_dit",
                                         cache_dit_taylorseer=taylorseer))
    assert isinstance(cache, CacheDitStepCache)
    (job,) = loop_latents(pipe, embeds, steps, cache=cache)
    frames = decode(pipe, job.result)
    value = psnr(frames, exact_frames)
    tag = "cache_dit_taylorseer" if taylorseer else "cache_dit"
    record_property(f"{tag}_psnr_db", round(value, 2))
    record_property(f"{tag}_skipped", cache.skipped)
    with capsys.disabled():
        print(f"\n[lever] cache-dit DBCache F1B0{' + TaylorSeer' if taylorseer else ''} threshold=0.2, "
              f"{steps} steps: computed {cache.computed} forwards, skipped {cache.skipped}; "
              f"PSNR vs exact {value:.2f} dB")
    st = cache.stats()
    assert st["backend"] == "cache_dit" and st["skipped"] == cache.skipped > 0
    assert np.isfinite(frames).all() and value > 20.0
    for branch in ("cond", "uncond"):  # the first and the last step are always computed
        b = st["branches"][branch]
        assert b["computed"] + b["skipped"] == steps and 0 not in b["cached_steps"]
        assert steps - 1 not in b["cached_steps"]


def test_cache_dit_f1b0_decides_like_the_first_block_cache(pipe, embeds):
    steps = 10
    hand, dit = StepCache(threshold=0.2), CacheDitStepCache(threshold=0.2)
    (a,) = loop_latents(pipe, embeds, steps, cache=hand)
    (b,) = loop_latents(pipe, embeds, steps, cache=dit)
    for branch in ("cond", "uncond"):
        assert hand.stats()["branches"][branch]["skipped"] == dit.stats()["branches"][branch]["skipped"]
    np.testing.assert_allclose(a.result, b.result, atol=1e-6)
    # TaylorSeer: the same skipped steps, but the skipped residual is extrapolated, not reused
    ts = CacheDitStepCache(threshold=0.2, taylorseer=True)
    (c,) = loop_latents(pipe, embeds, steps, cache=ts)
    assert ts.stats()["branches"]["cond"]["cached_steps"] == dit.stats()["branches"]["cond"]["cached_steps"]
    assert np.abs(c.result - b.result).max() > 1e-4


@pytest.mark.parametrize("cfg_batch", [False, True])
def test_cache_dit_follows_the_batch_when_a_job_is_cancelled(pipe, embeds, cfg_batch):
    steps = 6
    (alone,) = loop_latents(pipe, embeds, steps, seeds=(11,))
    jobs = loop_latents(pipe, embeds, steps, cache=CacheDitStepCache(threshold=0.0), cfg_batch=cfg_batch,
                        seeds=(7, 11), cancel_after={7: 3})
    assert jobs[0].cancelled and jobs[0].result is None
    np.testing.assert_allclose(jobs[1].result, alone.result, atol=1e-5)
    # skipping, with TaylorSeer's ladders sliced too: the survivor is its own solo run with the same
    # cache settings (the same steps cached, its own rows of the buffers and ladders reused; the
    # cancelled job's rows instead move the latents by ~2e-2)
    solo_cache = CacheDitStepCache(threshold=0.5, taylorseer=True)
    (solo,) = loop_latents(pipe, embeds, steps, cache=solo_cache, cfg_batch=cfg_batch, seeds=(11,))
    cache = CacheDitStepCache(threshold=0.5, taylorseer=True)
    jobs = loop_latents(pipe, embeds, steps, cache=cache, cfg_batch=cfg_batch, seeds=(7, 11),
                        cancel_after={7: 2})
    assert jobs[0].cancelled and jobs[0].result is None
    cached = {b: st["cached_steps"] for b, st in cache.stats()["branches"].items()}
    assert cached == {b: st["cached_steps"] for b, st in solo_cache.stats()["branches"].items()}
    assert cache.skipped == solo_cache.skipped > 0
    np.testing.assert_allclose(jobs[1].result, solo.result, atol=1e-5)


@pytest.mark.parametrize("make_cache", [StepCache, CacheDitStepCache], ids=["first_block", "cache_dit"])
def test_step_cache_counts_reset_per_loop(pipe, embeds, make_cache):
    cache = make_cache(threshold=0.2)
    loop_latents(pipe, embeds, 4, cache=cache)
    first_total = cache.total_computed + cache.total_skipped
    loop_latents(pipe, embeds, 4, cache=cache)
    assert cache.computed + cache.skipped == 8  # this loop only: 4 steps x 2 branches
    assert cache.total_computed + cache.total_skipped == 2 * first_total == 16


def test_cache_dit_refuses_more_probe_blocks_than_the_model_has(pipe, embeds):
    with pytest.raises(ValueError, match="exceeds"):
        loop_latents(pipe, embeds, 2, cache=CacheDitStepCache(threshold=0.2, fn=2, bn=1))


def test_make_step_cache_and_its_config():
    assert make_step_cache(LeversConfig()) is None  # threshold 0: off
    assert make_step_cache(LeversConfig(step_cache_backend="cache_dit")) is None
    fb = make_step_cache(LeversConfig(step_cache_threshold=0.1, step_cache_backend="first_block"))
    assert isinstance(fb, StepCache) and fb.threshold == 0.1
    cd = make_step_cache(LeversConfig(step_cache_threshold=0.1, step_cache_backend="cache_dit", cache_dit_fn=2,
                                      cache_dit_bn=1, cache_dit_taylorseer=True))
    assert isinstance(cd, CacheDitStepCache) and (cd.fn, cd.bn, cd.taylorseer) == (2, 1, True)
    with pytest.raises(ValidationError):  # cache-dit reads >= 1 as "always reuse"
        LeversConfig(step_cache_threshold=1.0, step_cache_backend="cache_dit")
    with pytest.raises(ValidationError):
        LeversConfig(cache_dit_fn=0)
    with pytest.raises(ValidationError):
        LeversConfig(step_cache_backend="teacache")

