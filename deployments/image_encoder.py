"""ImageEncoder deployment: the CLIP vision tower of the SkyReels-V2 I2V models.

`encode(image)` takes the reference image, already checked and fitted to the job's size by the
request layer (uint8 (H, W, 3)), and returns the image embeddings the I2V Transformer attends to
(`encoder_hidden_states_image`), computed as `SkyReelsV2ImageToVideoPipeline.encode_image` does.
Its own deployment: the CLIP tower is ~0.6 B parameters on the real models, with its own GPU
fraction, and only I2V jobs call it.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
from ray import serve

from serve.config import ModelConfig
from serve.errors import StageError
from serve.pipeline.loading import resolve_subfolder, torch_device, torch_dtype
from serve.runtime.replica import replica_id, setup_replica_logging
from serve.stages import IMAGE_ENCODER
from serve.runtime.threads import apply_torch_threads

logger = logging.getLogger(__name__)


@serve.deployment(name=IMAGE_ENCODER.deployment)
class ImageEncoder:
    def __init__(self, model: dict, torch_threads: int | None = None):
        import torch
        from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

        setup_replica_logging()
        self.model_cfg = ModelConfig.model_validate(model)
        self.device = torch_device(self.model_cfg)
        self.torch_threads = apply_torch_threads(torch_threads, self.device, "image_encoder")
        # the processor class the folder names (the tiny model's is the PIL one: the same pixels everywhere)
        self.processor = AutoImageProcessor.from_pretrained(resolve_subfolder(self.model_cfg, "image_processor"))
        self.encoder = CLIPVisionModelWithProjection.from_pretrained(
            resolve_subfolder(self.model_cfg, "image_encoder"),
            torch_dtype=torch_dtype(self.model_cfg.dtype)).to(self.device).eval()
        self._lock = asyncio.Lock()
        self.calls = 0
        del torch
        logger.info("image encoder ready on %s", self.device)

    def _encode(self, image: np.ndarray) -> np.ndarray:
        from serve.pipeline.image_conditioning import clip_image_embeds

        return clip_image_embeds(self.encoder, self.processor, image)

    async def encode(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> fp32 image embeddings (1, N, D)."""
        try:
            async with self._lock:
                out = await asyncio.to_thread(self._encode, np.asarray(image))
        except Exception as exc:  # noqa: BLE001
            raise StageError(f"image encoding failed: {type(exc).__name__}: {exc}", stage="image_encoder") from exc
        self.calls += 1
        return out

    def stats(self) -> dict:
        return {"calls": self.calls, "torch_threads": self.torch_threads, "replica_id": replica_id()}

    def check_health(self) -> None:
        if self.encoder is None:
            raise RuntimeError("image encoder not loaded")
