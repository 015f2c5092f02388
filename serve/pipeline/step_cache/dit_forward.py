"""The pieces of `SkyReelsV2Transformer3DModel.forward` that every step cache backend runs around its own
block loop (the prologue: patch/condition embedding; the epilogue: norm, projection, unpatchify), the
change measure, and the interface a backend offers `DenoiseLoop`.
"""

from __future__ import annotations

from typing import Protocol

import torch


class StepCacheBackend(Protocol):
    """The step-cache protocol, what the engine calls (lockstep batches):
    `cache(transformer, latents, timestep, embeds, branch, image_embeds=)` returns the noise prediction the plain forward would (exactly so when the step is computed);
    `reset(num_steps=)` before a run, `select(idx)` when a batch loses rows, `stats()` for metrics."""

    backend: str

    def __call__(self, transformer, latents: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
                 branch: str, image_embeds: torch.Tensor | None = None) -> torch.Tensor: ...

    def reset(self, num_steps: int | None = None) -> None: ...

    def select(self, idx) -> None: ...

    def stats(self) -> dict: ...


def supported(transformer) -> bool:
    """T2V and I2V configs (the image embeddings only add to the blocks' context); not the
    diffusion forcing ones (causal blocks, fps conditioning, per-frame timesteps)."""
    cfg = transformer.config
    return getattr(cfg, "num_frame_per_block", 1) <= 1 and not getattr(cfg, "inject_sample_info", False)


def relative_change(current: torch.Tensor, previous: torch.Tensor) -> float:
    """max over batch rows of mean|current - previous| / mean|previous|."""
    cur = current.float().flatten(1)
    prev = previous.float().flatten(1)
    num = (cur - prev).abs().mean(dim=1)
    den = prev.abs().mean(dim=1).clamp_min(1e-12)
    return float((num / den).max())


def embed(transformer, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None):
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


def unpatchify(transformer, hidden, temb, shape):
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
