"""A step-cache backend built on cache-dit (PyPI `cache-dit`): its DBCache ("Dual Block Cache":
the first `Fn` blocks probe, the middle blocks are skipped, the last `Bn` blocks always run) with an
optional TaylorSeer calibrator (the skipped blocks' residual is extrapolated by a first-order Taylor
step from the last two computed steps instead of reused as is). Called by `DenoiseLoop` exactly like
`serve.pipeline.step_cache.first_block.FirstBlockCache`: `cache(transformer, latents, timestep, embeds, branch)`,
`reset(num_steps=)`, `select(idx)`, `stats()`.

How cache-dit is used here. cache-dit normally patches a whole pipeline (`cache_dit.enable_cache`):
its registered SkyReels-V2 adapter (`cache_dit/caching/block_adapters/adapters.py`, "SkyReelsV2":
`blocks=transformer.blocks`, `ForwardPattern.Pattern_3`, `has_separate_cfg=True`) swaps
`transformer.blocks` for a `CachedBlocks_Pattern_3_4_5` during the transformer's forward and tells
the CFG branch from the conditional one by the *parity* of the transformer call (call 0, 2, 4 ...
conditional; 1, 3, 5 ... unconditional). CineVivid's loop does not fit that: with `cfg_batch` one
call per step carries both branches, with guidance 1 there is no unconditional call, and a batch
loses rows when a job is cancelled. So this backend builds the same cache-dit objects itself,
without patching the transformer (its plain forward stays as it was, for the diffusion-forcing loop
and the compiled blocks): one `CachedContextManager`, and per branch ("cond", "uncond", "cfg") one
cache-dit context (`enable_separate_cfg=False`: each branch is its own step sequence) and one
`UnifiedBlocks(transformer.blocks, forward_pattern=Pattern_3)` bound to it. Per call it runs
the transformer's prologue (patch/condition embedding, `dit_forward.embed`), cache-dit's cached
blocks, and the epilogue (`dit_forward.unpatchify`): the same ops as the plain forward, so
threshold 0 reproduces it exactly.

Settings mapped onto `DBCacheConfig`: `threshold` -> `residual_diff_threshold` (cache-dit's relative
L1 change of the Fn blocks' residual: mean|now - then| / mean|then|, the same measure as FirstBlockCache's;
cache-dit treats a threshold >= 1 as "always reuse", so it must be < 1 here), `fn`/`bn` ->
`Fn_compute_blocks`/`Bn_compute_blocks`, `warmup_steps` -> `max_warmup_steps`,
`max_consecutive_skips` -> `max_continuous_cached_steps`, and `compute_last_step` -> a
`steps_computation_mask` whose last entry is 1. With fn=1, bn=0, no TaylorSeer and one job it takes
the same decisions as FirstBlockCache (tests check it).

Differences from FirstBlockCache: cache-dit averages the change over the whole batch where
FirstBlockCache takes the worst row (a batch of jobs, or the "cfg" branch's cond+uncond batch, may
skip a step FirstBlockCache would compute). `select` slices cache-dit's buffers and TaylorSeer's derivative ladders by row,
which the library does not do itself (it reads private-ish attributes: `CachedContext.buffers`,
`TaylorSeerCalibrator.states`); an unknown calibrator state makes `select` drop that branch's
context, so the next step is computed in full (safe, not faster).
"""

from __future__ import annotations

import logging

import torch

from serve.pipeline.step_cache.dit_forward import embed, supported, unpatchify

logger = logging.getLogger(__name__)


class CacheDitStepCache:
    """cache-dit's DBCache (+ optional TaylorSeer) as a `DenoiseLoop` step cache."""

    backend = "cache_dit"

    def __init__(self, threshold: float, fn: int = 1, bn: int = 0, taylorseer: bool = False,
                 taylorseer_order: int = 1, warmup_steps: int = 1, max_consecutive_skips: int = 3,
                 compute_last_step: bool = True):
        if not 0 <= threshold < 1:
            raise ValueError("threshold must be in [0, 1) (cache-dit reads >= 1 as 'always reuse')")
        if fn < 1 or bn < 0:
            raise ValueError("fn must be >= 1 and bn >= 0")
        self.threshold = float(threshold)
        self.fn, self.bn = int(fn), int(bn)
        self.taylorseer = bool(taylorseer)
        self.taylorseer_order = int(taylorseer_order)
        self.warmup_steps = max(1, int(warmup_steps))
        self.max_consecutive_skips = max(0, int(max_consecutive_skips))
        self.compute_last_step = compute_last_step
        self.num_steps: int | None = None
        from cache_dit.caching.cache_contexts.cache_manager import CachedContextManager

        self._manager = CachedContextManager(name=f"cinevivid_{id(self)}", persistent_context=False)
        self._blocks: dict[tuple[int, str], torch.nn.Module] = {}  # (id(transformer), branch) -> cached blocks
        self._branches: list[str] = []  # branches with a context in the current loop
        self._plain: dict[str, int] = {}  # calls that ran the plain forward (unsupported configs)
        self.total_computed = 0
        self.total_skipped = 0

    # -- cache-dit objects --------------------------------------------------------------------
    def _context_kwargs(self) -> dict:
        from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

        mask = None
        if self.compute_last_step and self.num_steps is not None and self.num_steps > self.warmup_steps:
            mask = [1] * self.warmup_steps + [0] * (self.num_steps - self.warmup_steps - 1) + [1]
        cache_config = DBCacheConfig(
            Fn_compute_blocks=self.fn,
            Bn_compute_blocks=self.bn,
            residual_diff_threshold=self.threshold,
            max_warmup_steps=self.warmup_steps,
            warmup_interval=1,
            max_cached_steps=-1,
            max_continuous_cached_steps=self.max_consecutive_skips,
            enable_separate_cfg=False,  # one context per branch: each sees one call per step
            num_inference_steps=self.num_steps,
            steps_computation_mask=mask,
            steps_computation_policy="dynamic",
        )
        calibrator = None
        if self.taylorseer:
            calibrator = TaylorSeerCalibratorConfig(taylorseer_order=self.taylorseer_order)
        return {"cache_config": cache_config, "calibrator_config": calibrator}

    def _cached_blocks(self, transformer, branch: str) -> torch.nn.Module:
        n = len(transformer.blocks)
        if self.fn + self.bn > n:
            raise ValueError(f"cache-dit fn={self.fn} + bn={self.bn} exceeds the transformer's {n} blocks")
        key = (id(transformer), branch)
        blocks = self._blocks.get(key)
        if blocks is None or blocks.transformer is not transformer:
            from cache_dit import ForwardPattern
            from cache_dit.caching.cache_blocks import UnifiedBlocks

            blocks = UnifiedBlocks(transformer.blocks, transformer=transformer,
                                   forward_pattern=ForwardPattern.Pattern_3, check_forward_pattern=True,
                                   cache_prefix="blocks", cache_context=branch, context_manager=self._manager)
            self._blocks[key] = blocks
        if branch not in self._branches:
            self._manager.reset_context(branch, **self._context_kwargs())
            self._branches.append(branch)
        return blocks

    def _context(self, branch: str):
        return self._manager.get_context(branch)

    # -- loop hooks ---------------------------------------------------------------------------
    def reset(self, num_steps: int | None = None) -> None:
        """Start of a denoising loop: drop every context (buffers, counters, TaylorSeer state)."""
        self.num_steps = num_steps
        self._manager.clear_contexts()
        self._branches = []
        self._plain = {}

    def select(self, idx: torch.Tensor) -> None:
        """Rows `idx` of the batch stay: slice cache-dit's buffers and TaylorSeer's ladders. The "cfg"
        branch holds [cond rows; uncond rows], so its rows are idx and idx + n."""
        for branch in list(self._branches):
            ctx = self._context(branch)

            def take(t, branch=branch):
                if not isinstance(t, torch.Tensor) or t.dim() == 0:
                    return t
                rows = idx.to(t.device)
                if branch == "cfg":
                    rows = torch.cat([rows, rows + t.shape[0] // 2])
                return t[rows]

            for name, t in list(ctx.buffers.items()):
                ctx.buffers[name] = take(t)
            ok = True
            for cal in (ctx.calibrator, ctx.encoder_calibrator, ctx.cfg_calibrator, ctx.cfg_encoder_calibrator):
                if cal is None:
                    continue
                states = getattr(cal, "states", None)
                if not isinstance(states, dict):
                    ok = False
                    continue
                for st in states.values():
                    ladders = getattr(st, "state", None)
                    if not isinstance(ladders, dict):
                        ok = False
                        continue
                    for key, ladder in ladders.items():
                        ladders[key] = [take(t) for t in ladder]
            if not ok:  # a calibrator this code does not know: forget the branch (next step computes)
                logger.warning("cache-dit: cannot slice the %s calibrator state; branch %s restarts", cal, branch)
                self._manager.remove_context(branch)
                self._branches.remove(branch)

    # -- counters -----------------------------------------------------------------------------
    def _branch_counts(self, branch: str) -> tuple[int, int]:
        ctx = self._context(branch)
        skipped = len(ctx.get_cached_steps())
        return ctx.executed_steps - skipped, skipped

    @property
    def computed(self) -> int:
        return sum(self._branch_counts(b)[0] for b in self._branches) + sum(self._plain.values())

    @property
    def skipped(self) -> int:
        return sum(self._branch_counts(b)[1] for b in self._branches)

    def stats(self) -> dict:
        """Counters of the current (last) loop per branch, plus lifetime totals (FirstBlockCache's keys)."""
        branches = {}
        for b in self._branches:
            computed, skipped = self._branch_counts(b)
            diffs = self._context(b).get_residual_diffs()
            branches[b] = {"computed": computed, "skipped": skipped,
                           "changes": [round(float(diffs[k]), 5) for k in sorted(diffs, key=int) if diffs[k] >= 0],
                           "cached_steps": self._context(b).get_cached_steps()}
        for b, n in self._plain.items():
            branches.setdefault(b, {"computed": 0, "skipped": 0, "changes": []})["computed"] += n
        return {
            "backend": self.backend,
            "threshold": self.threshold,
            "fn": self.fn, "bn": self.bn, "taylorseer": self.taylorseer,
            "computed": self.computed,
            "skipped": self.skipped,
            "branches": branches,
            "total_computed": self.total_computed,
            "total_skipped": self.total_skipped,
        }

    # -- the forward --------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, transformer, latents: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
                 branch: str, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if not supported(transformer):  # diffusion forcing configs: no caching, plain forward
            self._plain[branch] = self._plain.get(branch, 0) + 1
            self.total_computed += 1
            extra = {} if image_embeds is None else {"encoder_hidden_states_image": image_embeds}
            return transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=embeds,
                               return_dict=False, **extra)[0]
        blocks = self._cached_blocks(transformer, branch)
        hidden, enc, timestep_proj, rotary, temb = embed(transformer, latents, timestep, embeds, image_embeds)
        before = len(self._context(branch).get_cached_steps())
        hidden = blocks(hidden, enc, timestep_proj, rotary, None)
        if len(self._context(branch).get_cached_steps()) > before:
            self.total_skipped += 1
        else:
            self.total_computed += 1
        return unpatchify(transformer, hidden, temb, latents.shape)
