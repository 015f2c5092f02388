"""The image side of SkyReels-V2 image-to-video, computed exactly as diffusers'
`SkyReelsV2ImageToVideoPipeline` does it, as numpy arrays a deployment can hand on:

- `clip_image_embeds`: the CLIP vision tower's embeddings of the first (and last) frame, the
  pipeline's `encode_image` (the ImageEncoder deployment);
- `i2v_condition`: the (1, 4 + 16, T, h, w) tensor the pipeline concatenates to the noise at every
  step, its `prepare_latents` (mask + normalised VAE latents of [image, zeros..., (last image)];
  the VAE deployment, with `serve.pipeline.vae_encode`).

The images come in already at the video's size (the request layer resizes and crops them), so the
pipeline's `VideoProcessor.preprocess` has nothing to resize: it only maps uint8 to [-1, 1], as
`vae_encode.to_model_input` does. The denoising loop that consumes both is
`serve.pipeline.denoising` (`DenoiseJob.image_embeds`, `DenoiseJob.condition`). No Serve in here.
"""

from __future__ import annotations

import numpy as np
import torch

from serve.contracts import VAE_SPATIAL_FACTOR, VAE_TEMPORAL_FACTOR, latent_frames
from serve.pipeline.vae_encode import encode, to_model_input


def _pil(image_uint8: np.ndarray):
    import PIL.Image

    image = np.asarray(image_uint8)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    return PIL.Image.fromarray(np.ascontiguousarray(image))


@torch.no_grad()
def clip_image_embeds(image_encoder, image_processor, image_uint8: np.ndarray,
                      last_image_uint8: np.ndarray | None = None) -> np.ndarray:
    """The pipeline's `encode_image(image)` (or `encode_image([image, last_image])`): the image
    processor (resize, centre crop, CLIP normalisation) on the PIL image(s), then the vision tower's
    second-to-last hidden states. Returns float32 (n, tokens, hidden) with n = 1, or 2 with a last
    image (first image's row first); the loop casts them to the transformer's dtype, as the pipeline
    does (the float32 detour is exact for fp16/bf16 towers)."""
    images = [_pil(image_uint8)] if last_image_uint8 is None else [_pil(image_uint8), _pil(last_image_uint8)]
    param = next(image_encoder.parameters())
    inputs = image_processor(images=images if len(images) > 1 else images[0], return_tensors="pt").to(param.device)
    out = image_encoder(**inputs, output_hidden_states=True)
    return out.hidden_states[-2].float().cpu().numpy()


def condition_mask(num_frames: int, height: int, width: int, last_image: bool = False) -> torch.Tensor:
    """The pipeline's `mask_lat_size`: 1 on the given frames (the first; the last too with a last
    image), 0 elsewhere, the first frame repeated 4 times and the frames folded 4 per latent frame
    into channels -> float32 (1, 4, T, h, w)."""
    lh, lw = height // VAE_SPATIAL_FACTOR, width // VAE_SPATIAL_FACTOR
    mask = torch.ones(1, 1, num_frames, lh, lw)
    if last_image:
        mask[:, :, list(range(1, num_frames - 1))] = 0
    else:
        mask[:, :, list(range(1, num_frames))] = 0
    first = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=VAE_TEMPORAL_FACTOR)
    mask = torch.concat([first, mask[:, :, 1:, :]], dim=2)
    mask = mask.view(1, -1, VAE_TEMPORAL_FACTOR, lh, lw)
    return mask.transpose(1, 2)


@torch.no_grad()
def i2v_condition(vae, image_uint8: np.ndarray, num_frames: int, height: int, width: int,
                  last_image_uint8: np.ndarray | None = None) -> np.ndarray:
    """The condition the pipeline concatenates to the noise (`prepare_latents`' second output):
    the mask (4 channels) then the normalised VAE latents (posterior mode) of the video
    [image, zeros x (num_frames - 1)] or [image, zeros x (num_frames - 2), last image], zeros being
    0 in [-1, 1]. The images are uint8 (height, width, 3), already at the video's size. Returns
    float32 (1, 4 + z_dim, latent_frames(num_frames), height / 8, width / 8)."""
    for name, img in (("image", image_uint8), ("last_image", last_image_uint8)):
        if img is not None and tuple(np.asarray(img).shape[:2]) != (height, width):
            raise ValueError(f"{name} is {np.asarray(img).shape[:2]}, expected (height, width) = {(height, width)}: "
                             "resize it before conditioning")
    if last_image_uint8 is not None and num_frames < 2:
        raise ValueError("a last image needs at least 2 frames")
    image = to_model_input(np.array(image_uint8)[None])  # (1, 3, 1, H, W) in [-1, 1]
    parts = [image]
    if last_image_uint8 is None:
        parts.append(image.new_zeros(1, 3, num_frames - 1, height, width))
    else:
        parts += [image.new_zeros(1, 3, num_frames - 2, height, width),
                  to_model_input(np.array(last_image_uint8)[None])]
    latents = encode(vae, torch.cat(parts, dim=2))  # normalised fp32, as the pipeline's
    mask = condition_mask(num_frames, height, width, last_image=last_image_uint8 is not None)
    out = torch.concat([mask.to(latents.device), latents], dim=1)
    assert out.shape[2] == latent_frames(num_frames)
    return out.cpu().numpy()
