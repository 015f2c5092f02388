"""The VAE side of the pipeline: de-normalise latents (`latents * std + mean`), `vae.decode` (whole,
or streamed one latent frame at a time through the Wan VAE's causal cache), and post-process to
frames exactly as `SkyReelsV2Pipeline` does. Used by the `VAEDecoder` deployment and the benchmarks.
"""

from __future__ import annotations

import numpy as np
import torch


def denormalize(vae, latents: torch.Tensor) -> torch.Tensor:
    """The pipeline's `latents * std + mean` (as `latents / (1 / std) + mean`, bit for bit)."""
    latents = latents.to(vae.dtype)
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
    return latents / inv_std + mean


@torch.no_grad()
def denormalize_and_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Pipeline's decode: `latents * std + mean`, then `vae.decode`; returns (B, 3, F, H, W) in [-1, 1]."""
    return vae.decode(denormalize(vae, latents), return_dict=False)[0]


def is_tiled(vae, latents: torch.Tensor) -> bool:
    """Whether `vae.decode` will decode these latents tile by tile (tiling on, frames over a tile)."""
    return bool(getattr(vae, "use_tiling", False)) and (
        latents.shape[-1] > vae.tile_sample_min_width // vae.spatial_compression_ratio
        or latents.shape[-2] > vae.tile_sample_min_height // vae.spatial_compression_ratio)


def _can_stream(vae, latents: torch.Tensor) -> bool:
    """Frame-by-frame decoding follows `AutoencoderKLWan._decode`'s own loop; where that loop is not
    what `decode` would run (tiling, slicing a batch, patchified VAEs, another VAE class) the whole
    video is decoded at once instead."""
    cfg = vae.config
    return (type(vae).__name__ == "AutoencoderKLWan" and latents.shape[0] == 1 and not is_tiled(vae, latents)
            and getattr(cfg, "patch_size", None) is None
            and all(hasattr(vae, a) for a in ("clear_cache", "post_quant_conv", "decoder")))


@torch.no_grad()
def iter_decode(vae, latents: torch.Tensor):
    """`denormalize_and_decode` one latent frame at a time: yields (1, 3, f, H, W) chunks in [-1, 1]
    (1 frame, then 4 per latent frame for the Wan VAE) whose concatenation is exactly what
    `denormalize_and_decode` returns. This is the loop of `AutoencoderKLWan._decode` with its
    causal feature cache, yielding each chunk instead of concatenating them, so the video can be
    encoded while later frames are still being decoded."""
    if not _can_stream(vae, latents):
        yield denormalize_and_decode(vae, latents)
        return
    vae.clear_cache()
    try:
        x = vae.post_quant_conv(denormalize(vae, latents))
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            out = vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                              first_chunk=(i == 0))
            yield torch.clamp(out, min=-1.0, max=1.0)
    finally:
        vae.clear_cache()


def to_float_frames(video: torch.Tensor) -> np.ndarray:
    """(1, 3, F, H, W) in [-1, 1] -> float32 (F, H, W, 3) in [0, 1], as VideoProcessor does for "np"."""
    from diffusers.video_processor import VideoProcessor

    frames = VideoProcessor().postprocess_video(video.detach(), output_type="np")
    return np.ascontiguousarray(frames[0], dtype=np.float32)


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float [0, 1] frames -> uint8, rounding as diffusers' numpy_to_pil does."""
    return (frames * 255).round().astype(np.uint8)


@torch.no_grad()
def video_to_uint8(video: torch.Tensor) -> np.ndarray:
    """(1, 3, F, H, W) in [-1, 1] -> uint8 (F, H, W, 3): `to_uint8(to_float_frames(video))` with the
    same float32 operations (so the same bytes), done in torch on the video's device with its
    threads, without materialising the float frames."""
    x = (video[0].float() / 2 + 0.5).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous().cpu().numpy()


class CausalDecodeSession:
    """`iter_decode` across calls: the latents of one video arriving in parts (diffusion forcing's
    windows) are decoded as they come, through the Wan VAE's causal feature cache kept here between
    parts, so the frames of all parts together are exactly `denormalize_and_decode` of all latents.
    Memory is the cache (a few frames of features per causal conv), not the video. Several sessions
    can share one VAE (each `decode` swaps its own cache in; calls must not interleave)."""

    def __init__(self, vae):
        self.vae = vae
        self.latent_frames_done = 0
        self.parts_done = 0
        self._feat_map: list | None = None
        if not _can_stream(vae, torch.zeros(1, 1, 1, 1, 1)):
            raise ValueError(f"{type(vae).__name__} cannot decode a video in parts (tiling or another VAE)")

    @torch.no_grad()
    def decode(self, latents: torch.Tensor):
        """Yields (1, 3, f, H, W) chunks in [-1, 1] for these latent frames (the next part of the video)."""
        if is_tiled(self.vae, latents):
            raise ValueError("a tiled VAE cannot decode a video in parts")
        vae = self.vae
        vae.clear_cache()
        if self._feat_map is not None:
            vae._feat_map = self._feat_map
        try:
            x = vae.post_quant_conv(denormalize(vae, latents))  # a 1x1x1 conv: no context across frames
            for i in range(x.shape[2]):
                vae._conv_idx = [0]
                out = vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                  first_chunk=(self.latent_frames_done == 0))
                self.latent_frames_done += 1
                yield torch.clamp(out, min=-1.0, max=1.0)
            self.parts_done += 1
        finally:
            self._feat_map = vae._feat_map
            vae.clear_cache()

    def close(self) -> None:
        self._feat_map = None
