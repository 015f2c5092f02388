"""VAEDecoder deployment: de-normalise latents (`latents * std + mean`), `vae.decode`, and
post-process to frames: uint8 (F, H, W, 3), plus the float32 [0, 1] frames when asked."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import ray
from pydantic import BaseModel, ConfigDict
from ray import serve

from serve.config import LeversConfig, ModelConfig
from serve.denoising import denormalize_and_decode, inject_fault, to_float_frames, to_uint8
from serve.errors import StageError
from serve.levers import apply_levers
from serve.models import resolve_subfolder, torch_device, torch_dtype

logger = logging.getLogger(__name__)
STAGE = "vae"


class DecodedFrames(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    frames: np.ndarray  # uint8 (F, H, W, 3)
    float_frames: np.ndarray | None = None  # float32 (F, H, W, 3) in [0, 1]


@serve.deployment(name="VAEDecoder")
class VAEDecoder:
    def __init__(self, model: dict, levers: dict | None = None, fault: str | None = None):
        import torch
        from diffusers import AutoencoderKLWan

        self.model_cfg = ModelConfig.model_validate(model)
        levers_cfg = LeversConfig.model_validate(levers or {})
        self.device = torch_device(self.model_cfg)
        self._torch = torch
        self.vae = AutoencoderKLWan.from_pretrained(
            resolve_subfolder(self.model_cfg, "vae"), torch_dtype=torch_dtype(self.model_cfg.vae_dtype)
        ).to(self.device).eval()
        apply_levers(None, self.vae, levers_cfg)  # VAE tiling when switched on
        self.fault = fault  # chaos testing only
        self._lock = asyncio.Lock()  # one decode at a time per replica: decoding is memory-bound
        logger.info("vae ready on %s (%s)", self.device, self.model_cfg.vae_dtype)

    def _decode(self, latents: np.ndarray, want_float: bool) -> DecodedFrames:
        if self.fault:
            inject_fault(self.fault)
        video = denormalize_and_decode(self.vae, self._torch.from_numpy(np.array(latents)).to(self.device))
        frames = to_float_frames(video)
        return DecodedFrames(frames=to_uint8(frames), float_frames=frames if want_float else None)

    async def decode(self, latents, return_float: bool = False) -> DecodedFrames:
        """`latents`: normalised fp32 (1, C, T, h, w) as numpy, or an ObjectRef to it."""
        if isinstance(latents, list) and latents and isinstance(latents[0], ray.ObjectRef):
            latents = latents[0]
        if isinstance(latents, ray.ObjectRef):
            latents = await latents
        async with self._lock:
            try:
                return await asyncio.to_thread(self._decode, latents, return_float)
            except self._torch.OutOfMemoryError as exc:
                raise StageError(f"out of memory decoding latents {tuple(latents.shape)}", stage=STAGE,
                                 code="out_of_memory") from exc
            except Exception as exc:
                raise StageError(f"decoding failed: {type(exc).__name__}: {exc}", stage=STAGE) from exc

    def check_health(self) -> None:
        if self.vae is None:
            raise RuntimeError("vae not loaded")
