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

from serve.pipeline.step_cache.dit_forward import embed, relative_change, supported, unpatchify


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


class FirstBlockCache:
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
        if not supported(transformer):  # diffusion forcing configs: no caching, plain forward
            self._count(st, computed=True)
            extra = {} if image_embeds is None else {"encoder_hidden_states_image": image_embeds}
            return transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=embeds,
                               return_dict=False, **extra)[0]

        hidden, enc, timestep_proj, rotary, temb = embed(transformer, latents, timestep, embeds, image_embeds)
        blocks = transformer.blocks
        head_in = hidden
        hidden = blocks[0](hidden, enc, timestep_proj, rotary, None)
        head_residual = hidden - head_in

        skip = False
        if st.head_residual is not None and st.head_residual.shape == head_residual.shape:
            # recorded at every threshold (threshold 0 = a probe that never skips: calibration)
            change = relative_change(head_residual, st.head_residual)
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
        return unpatchify(transformer, hidden, temb, latents.shape)

    def _count(self, st: _BranchState, computed: bool) -> None:
        if computed:
            st.computed += 1
            self.total_computed += 1
        else:
            st.skipped += 1
            self.total_skipped += 1


StepCache = FirstBlockCache  # the former name (tests and benchmarks still construct it by it)
