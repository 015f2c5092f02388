"""The VAE's other direction: pixels in, normalised latents out, exactly as the SkyReels-V2
image-to-video and video-to-video pipelines of diffusers compute their conditioning latents
(`retrieve_latents(vae.encode(x), sample_mode="argmax")`, then `(latents - mean) * (1 / std)`).
Used by the VAE deployment's `encode` and by the fidelity tests. No Serve in here."""

from __future__ import annotations

import numpy as np
import torch


def normalize(vae, latents: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The pipelines' `(latents - mean) * (1 / std)`, in `dtype` (they normalise in the latents' fp32)."""
    latents = latents.to(dtype)
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents.device, dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents.device, dtype)
    return (latents - mean) * inv_std


@torch.no_grad()
def encode(vae, video: torch.Tensor) -> torch.Tensor:
    """`video` (B, 3, F, H, W) in [-1, 1] -> normalised fp32 latents (B, C, (F-1)//4+1, H/8, W/8):
    the mode of the VAE's posterior, as the pipelines take it."""
    out = vae.encode(video.to(vae.device, vae.dtype))
    latents = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latents
    return normalize(vae, latents)


def to_model_input(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames (F, H, W, 3) -> (1, 3, F, H, W) fp32 in [-1, 1], as diffusers' VideoProcessor
    preprocesses an image or video that already has the target size (`x / 255 * 2 - 1`)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float() / 255.0
    return (x * 2.0 - 1.0).permute(3, 0, 1, 2).unsqueeze(0).contiguous()
