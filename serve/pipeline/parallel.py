"""One job across several devices: diffusers' own context parallelism (Ulysses / ring sequence
parallel, `ModelMixin.enable_parallelism` with `ContextParallelConfig`) on the SkyReels-V2 DiT.

diffusers 0.42.1 gives `WanTransformer3DModel` a `_cp_plan` but not `SkyReelsV2Transformer3DModel`
(same blocks, same rope). `skyreels_cp_plan` is Wan's plan fitted to SkyReels-V2, declared the way
diffusers declares plans (no hand-written attention sharding; the all-to-all / ring attention is
diffusers' dispatcher's):

- `rope`: both outputs (cos, sin: (1, S, 1, d)) split on the sequence, once per forward;
- `blocks.0`: the token sequence split on entry (each rank holds S / N tokens from there on);
- `blocks.<i>`: the per-token modulation of diffusion forcing (`temb` (B, 6, S, D), 4-D) split
  for every block; the T2V one ((B, 6, D), 3-D) has no sequence and is left whole (diffusers' hook
  skips an input whose dimensions are not the expected ones);
- `norm_out`: gathered back to the whole sequence before the output modulation, whose diffusion-
  forcing shift/scale are per token over the whole sequence (Wan gathers at `proj_out`; gathering
  one module earlier costs the tiny head on every rank and serves T2V and DF with one plan).

The text (cross-attention keys/values) is not split. A causal-block mask (DF `causal_block_size`
> 1) is a full-sequence attention mask, which diffusers' context-parallel attention does not take:
`check_parallel_job` refuses it.

On a CPU the group runs over gloo. diffusers' `_resolve_parallel_config` computes the rank's device
as `rank % torch.accelerator.device_count()`, which is 0 on a CPU-only torch (ZeroDivisionError,
diffusers/models/modeling_utils.py, `_resolve_parallel_config`); `enable_context_parallel` counts
the CPU as one device there (`_cpu_device_count`), nothing else changes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from serve.errors import ConfigError


@dataclass(frozen=True)
class ParallelPlan:
    """A replica's split: `ulysses` x `ring` ranks share one forward's sequence; `cfg` 2 puts the
    conditional and unconditional branches on two such groups. Devices = ulysses x ring x cfg."""

    ulysses: int = 1
    ring: int = 1
    cfg: int = 1

    @property
    def sequence_degree(self) -> int:
        return self.ulysses * self.ring

    @property
    def devices(self) -> int:
        return self.sequence_degree * self.cfg


def skyreels_cp_plan(num_layers: int) -> dict:
    """The context-parallel plan of a `SkyReelsV2Transformer3DModel` with `num_layers` blocks."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    plan: dict = {
        "rope": {0: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
                 1: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True)},
        "norm_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }
    for i in range(num_layers):
        block = {"temb": ContextParallelInput(split_dim=2, expected_dims=4, split_output=False)}
        if i == 0:
            block["hidden_states"] = ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)
        plan[f"blocks.{i}"] = block
    return plan


@contextlib.contextmanager
def _cpu_device_count():
    """On a CPU-only torch, count the CPU as one accelerator device while diffusers builds its mesh."""
    if torch.cuda.is_available() or torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def enable_context_parallel(transformer, plan: ParallelPlan) -> None:
    """Split `transformer`'s sequence over the initialised torch.distributed group (its world size
    must be `plan.sequence_degree`) with diffusers' `enable_parallelism`; attention on a backend
    that supports it ("native" unless one that does is set)."""
    from diffusers import ContextParallelConfig
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    if not torch.distributed.is_initialized():
        raise ConfigError("context parallelism needs an initialised torch.distributed group")
    world = torch.distributed.get_world_size()
    if world != plan.sequence_degree:
        raise ConfigError(f"parallel: ulysses {plan.ulysses} x ring {plan.ring} = {plan.sequence_degree} ranks, "
                          f"but the group has {world}")
    heads = transformer.config.num_attention_heads
    if heads % plan.ulysses:
        raise ConfigError(f"parallel.ulysses {plan.ulysses} must divide the model's {heads} attention heads",
                          param="parallel.ulysses")
    backend = getattr(transformer, "_cinevivid_attention_backend", None) or "native"
    if backend not in _AttentionBackendRegistry._supports_context_parallel:
        raise ConfigError(f"attention backend {backend!r} does not support context parallelism; use one of "
                          f"{sorted(_AttentionBackendRegistry._supports_context_parallel)}", param="attention_backend")
    with _cpu_device_count():
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=plan.ulysses, ring_degree=plan.ring),
                                       cp_plan=skyreels_cp_plan(len(transformer.blocks)))


def check_parallel_job(tokens: int, plan: ParallelPlan, causal_block_size: int = 1) -> None:
    """Refuse what the split cannot run: a sequence the ranks cannot share evenly, a causal-block mask."""
    if tokens % plan.sequence_degree:
        raise ConfigError(f"{tokens} DiT tokens do not split evenly over {plan.sequence_degree} ranks")
    if causal_block_size > 1 and plan.sequence_degree > 1:
        raise ConfigError("diffusion forcing with causal_block_size > 1 attends through a full-sequence mask, "
                          "which diffusers' context-parallel attention does not take; use causal_block_size 1",
                          param="causal_block_size")
