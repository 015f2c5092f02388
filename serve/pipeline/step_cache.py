"""A first-block step cache for `SkyReelsV2Transformer3DModel` (the idea of ParaAttention's First
Block Cache, itself a simplification of TeaCache), written for this model because diffusers' own
`FirstBlockCache`/`MagCache` hooks refuse `SkyReelsV2TransformerBlock`: it is not in diffusers'
`TransformerBlockRegistry`, and their shared state is keyed by the pipeline's `cache_context`.

Per denoising step the cache runs the patch/condition embedding and the *first* transformer block.
If the first block's residual (its output minus its input) changed, relative to the last step whose
blocks were all computed, by less than `threshold` (mean |Δ| / mean |previous|, worst row of the
batch), the remaining blocks are skipped and the residual they produced at that last computed step is
added instead. Otherwise every block runs and the cache is refreshed. Each branch ("cond", "uncond",
"cfg" = both in one batch) keeps its own state; the first `warmup_steps` steps and the last step
(when `reset(num_steps=...)` told the cache how many there are) are always computed, and at most
`max_consecutive_skips` steps in a row are skipped. Image-to-video transformers are cached the same
way (`image_embeds=`: the projected image embeddings join the blocks' context, as in `forward`);
diffusion forcing configs run the plain forward.

Quality cost: approximate. threshold 0 computes every step and reproduces the plain forward exactly
(same ops, same order); larger thresholds skip more steps and cost PSNR (tests and
loadtests/bench_gpu.py report it). Batched jobs share one decision per step (the worst row decides),
so a batched run with the cache on is not bit-identical to unbatched runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class _BranchState:
    step: int = 0  # calls seen on this branch since reset
    head_residual: torch.Tensor | None = None  # first block's residual at the last computed step
    tail_residual: torch.Tensor | None = None  # (all blocks' output) - (first block's output), same step
    consecutive_skips: int = 0
    computed: int = 0
    skipped: int = 0
    last_change: float | None = None
    changes: list[float] = field(default_factory=list)


class StepCache:
    """The hand-written first-block cache (`step_cache_backend` "first_block"). Callable as
    `cache(transformer, latents, timestep, embeds, branch) -> noise_pred`, the same
    tensor `transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=embeds,
    return_dict=False)[0]` returns (exactly so when the step is computed). Image-to-video passes
    `image_embeds=` too (the transformer's `encoder_hidden_states_image`)."""

    def __init__(self, threshold: float, warmup_steps: int = 1, max_consecutive_skips: int = 3,
                 compute_last_step: bool = True):
        if threshold < 0:
            raise ValueError("threshold must be >= 0")
        self.threshold = float(threshold)
        self.warmup_steps = max(1, int(warmup_steps))
        self.max_consecutive_skips = max(0, int(max_consecutive_skips))
        self.compute_last_step = compute_last_step
        self.backend = "first_block"
        self.num_steps: int | None = None
        self._states: dict[str, _BranchState] = {}
        # lifetime counters (over every reset), for metrics
        self.total_computed = 0
        self.total_skipped = 0

    # -- loop hooks ---------------------------------------------------------------------------
    def reset(self, num_steps: int | None = None) -> None:
        """Start of a denoising loop: forget cached tensors; `num_steps` lets the last step run."""
        self.num_steps = num_steps
        self._states = {}

    def select(self, idx: torch.Tensor) -> None:
        """Rows `idx` of the batch stay (cancelled jobs were dropped): slice the cached tensors.
        The "cfg" branch holds [cond rows; uncond rows], so its rows are idx and idx + n."""
        for branch, st in self._states.items():
            for name in ("head_residual", "tail_residual"):
                t = getattr(st, name)
                if t is None:
                    continue
                rows = idx.to(t.device)
                if branch == "cfg":
                    n = t.shape[0] // 2
                    rows = torch.cat([rows, rows + n])
                setattr(st, name, t[rows])

    # -- counters -----------------------------------------------------------------------------
    @property
    def computed(self) -> int:
        return sum(s.computed for s in self._states.values())

    @property
    def skipped(self) -> int:
        return sum(s.skipped for s in self._states.values())

    def stats(self) -> dict:
        """Counters of the current (last) loop per branch, plus lifetime totals."""
        return {
            "backend": self.backend,
            "threshold": self.threshold,
            "computed": self.computed,
            "skipped": self.skipped,
            "branches": {b: {"computed": s.computed, "skipped": s.skipped,
                             "changes": [round(c, 5) for c in s.changes]}
                         for b, s in self._states.items()},
            "total_computed": self.total_computed,
            "total_skipped": self.total_skipped,
        }

    # -- the forward --------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, transformer, latents: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
                 branch: str, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        st = self._states.setdefault(branch, _BranchState())
        step = st.step
        st.step += 1
        if not _supported(transformer):  # diffusion forcing configs: no caching, plain forward
            self._count(st, computed=True)
            extra = {} if image_embeds is None else {"encoder_hidden_states_image": image_embeds}
            return transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=embeds,
                               return_dict=False, **extra)[0]

        hidden, enc, timestep_proj, rotary, temb = _embed(transformer, latents, timestep, embeds, image_embeds)
        blocks = transformer.blocks
        head_in = hidden
        hidden = blocks[0](hidden, enc, timestep_proj, rotary, None)
        head_residual = hidden - head_in

        skip = False
        if st.head_residual is not None and st.head_residual.shape == head_residual.shape:
            # recorded at every threshold (threshold 0 = a probe that never skips: calibration)
            change = _relative_change(head_residual, st.head_residual)
            st.last_change = change
            st.changes.append(change)
            skip = (self.threshold > 0 and change < self.threshold and st.tail_residual is not None
                    and step >= self.warmup_steps and st.consecutive_skips < self.max_consecutive_skips
                    and not (self.compute_last_step and self.num_steps is not None
                             and step >= self.num_steps - 1))

        if skip:
            hidden = hidden + st.tail_residual
            st.consecutive_skips += 1
            self._count(st, computed=False)
        else:
            head_out = hidden
            for block in blocks[1:]:
                hidden = block(hidden, enc, timestep_proj, rotary, None)
            st.head_residual = head_residual
            st.tail_residual = hidden - head_out
            st.consecutive_skips = 0
            self._count(st, computed=True)
        return _unpatchify(transformer, hidden, temb, latents.shape)

    def _count(self, st: _BranchState, computed: bool) -> None:
        if computed:
            st.computed += 1
            self.total_computed += 1
        else:
            st.skipped += 1
            self.total_skipped += 1


def _supported(transformer) -> bool:
    """T2V and I2V configs (the image embeddings only add to the blocks' context); not the
    diffusion forcing ones (causal blocks, fps conditioning, per-frame timesteps)."""
    cfg = transformer.config
    return getattr(cfg, "num_frame_per_block", 1) <= 1 and not getattr(cfg, "inject_sample_info", False)


def _relative_change(current: torch.Tensor, previous: torch.Tensor) -> float:
    """max over batch rows of mean|current - previous| / mean|previous|."""
    cur = current.float().flatten(1)
    prev = previous.float().flatten(1)
    num = (cur - prev).abs().mean(dim=1)
    den = prev.abs().mean(dim=1).clamp_min(1e-12)
    return float((num / den).max())


def _embed(transformer, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None):
    """The T2V/I2V prologue of `SkyReelsV2Transformer3DModel.forward`, the same ops in the same order
    (I2V: the projected image embeddings go before the text in the blocks' context)."""
    rotary_emb = transformer.rope(hidden_states)
    hidden = transformer.patch_embedding(hidden_states)
    hidden = hidden.flatten(2).transpose(1, 2)
    temb, timestep_proj, enc, image = transformer.condition_embedder(timestep, encoder_hidden_states,
                                                                     encoder_hidden_states_image)
    timestep_proj = timestep_proj.unflatten(-1, (6, -1))
    if image is not None:
        enc = torch.concat([image, enc], dim=1)
    return hidden, enc, timestep_proj, rotary_emb, temb


def _unpatchify(transformer, hidden, temb, shape):
    """The epilogue of `SkyReelsV2Transformer3DModel.forward` (2-D temb: T2V)."""
    batch_size, _, num_frames, height, width = shape
    p_t, p_h, p_w = transformer.config.patch_size
    shift, scale = (transformer.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
    shift = shift.to(hidden.device)
    scale = scale.to(hidden.device)
    hidden = (transformer.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
    hidden = transformer.proj_out(hidden)
    hidden = hidden.reshape(batch_size, num_frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
    hidden = hidden.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return hidden.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def make_step_cache(levers):
    """The step cache `levers` (a `serve.config.LeversConfig`) asks for, or None when it is off
    (`step_cache_threshold` 0). `step_cache_backend` "first_block": `StepCache`; "cache_dit":
    `serve.pipeline.step_cache_dit.CacheDitStepCache` with `cache_dit_fn`/`cache_dit_bn`/
    `cache_dit_taylorseer`. Both take the same `threshold` measure and the same warmup (1 step),
    max consecutive skips (3) and computed last step. What the deployment builds its `DenoiseLoop` with."""
    threshold = float(getattr(levers, "step_cache_threshold", 0.0) or 0.0)
    if threshold <= 0:
        return None
    backend = getattr(levers, "step_cache_backend", "first_block")
    if backend == "first_block":
        return StepCache(threshold=threshold)
    if backend == "cache_dit":
        from serve.pipeline.step_cache_dit import CacheDitStepCache

        return CacheDitStepCache(threshold=threshold, fn=levers.cache_dit_fn, bn=levers.cache_dit_bn,
                                 taylorseer=levers.cache_dit_taylorseer)
    raise ValueError(f"unknown step_cache_backend {backend!r}")
