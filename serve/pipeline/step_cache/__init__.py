"""Step caches for the denoising loop: the hand-written first-block cache (`first_block.FirstBlockCache`)
and cache-dit's DBCache (`dbcache.CacheDitStepCache`), both over the shared forward pieces in
`dit_forward` and both offering its `StepCacheBackend` interface (the step-cache protocol).
`make_step_cache` picks one. `StepCache` is `FirstBlockCache`'s former name."""

from __future__ import annotations

from serve.pipeline.step_cache.dit_forward import StepCacheBackend
from serve.pipeline.step_cache.first_block import FirstBlockCache, StepCache

__all__ = ["FirstBlockCache", "StepCache", "StepCacheBackend", "make_step_cache"]


def make_step_cache(levers):
    """The step cache `levers` (a `serve.config.LeversConfig`) asks for, or None when it is off
    (`step_cache_threshold` 0). `step_cache_backend` "first_block": `FirstBlockCache`; "cache_dit":
    `serve.pipeline.step_cache.dbcache.CacheDitStepCache` with `cache_dit_fn`/`cache_dit_bn`/
    `cache_dit_taylorseer`. Both take the same `threshold` measure and the same warmup (1 step),
    max consecutive skips (3) and computed last step. What the deployment builds its `DenoiseLoop` with."""
    threshold = float(getattr(levers, "step_cache_threshold", 0.0) or 0.0)
    if threshold <= 0:
        return None
    backend = getattr(levers, "step_cache_backend", "first_block")
    if backend == "first_block":
        return FirstBlockCache(threshold=threshold)
    if backend == "cache_dit":
        from serve.pipeline.step_cache.dbcache import CacheDitStepCache

        return CacheDitStepCache(threshold=threshold, fn=levers.cache_dit_fn, bn=levers.cache_dit_bn,
                                 taylorseer=levers.cache_dit_taylorseer)
    raise ValueError(f"unknown step_cache_backend {backend!r}")
