"""TextEncoder deployment: tokenizer + UMT5 encoder. Concurrent prompts are encoded as one batch
(`@serve.batch`); an optional LRU cache of prompt embeddings skips the encoder for repeats."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict

import numpy as np
from ray import serve

from serve.config import LeversConfig, ModelConfig, TextEncoderBatching
from serve.errors import StageError, StageOutOfMemory
from serve.contracts import PromptEmbeds
from serve.pipeline.levers import LiveLevers
from serve.pipeline.loading import resolve_subfolder, torch_device, torch_dtype
from serve.pipeline.text_encoding import clean_prompt, encode_prompts
from serve.runtime.replica import replica_id, setup_replica_logging
from serve.stages import TEXT_ENCODER
from serve.runtime.threads import apply_torch_threads

logger = logging.getLogger(__name__)
STAGE = "text_encoder"


class EmbeddingCache:
    """LRU of cleaned prompt -> (L, D) embeddings. Size 0 disables it."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # resize() may come from Serve's reconfigure thread
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        if self.size <= 0:
            return None
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
        self.hits += 1
        return value

    def __len__(self) -> int:
        return len(self._items)

    def put(self, key: str, value: np.ndarray) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            self._trim()

    def resize(self, size: int) -> None:
        """A new capacity; when smaller, the least recently used entries go (0: empty and off)."""
        with self._lock:
            self.size = size
            self._trim()

    def _trim(self) -> None:
        while len(self._items) > max(self.size, 0):
            self._items.popitem(last=False)


@serve.deployment(name=TEXT_ENCODER.deployment)
class TextEncoder:
    def __init__(self, model: dict, batching: dict | None = None, embedding_cache_size: int = 0,
                 torch_threads: int | None = None):
        import torch
        from transformers import AutoTokenizer, UMT5EncoderModel

        setup_replica_logging()
        self.model_cfg = ModelConfig.model_validate(model)
        batching_cfg = TextEncoderBatching.model_validate(batching or {})
        self.device = torch_device(self.model_cfg)
        self.torch_threads = apply_torch_threads(torch_threads, self.device, STAGE)
        dtype = torch_dtype(self.model_cfg.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_subfolder(self.model_cfg, "tokenizer"))
        self.encoder = UMT5EncoderModel.from_pretrained(
            resolve_subfolder(self.model_cfg, "text_encoder"), torch_dtype=dtype).to(self.device).eval()
        self._torch = torch
        self.cache = EmbeddingCache(embedding_cache_size)
        # live levers from reconfigure(): the cache resizes under its own lock, so they apply at once
        self.live = LiveLevers(STAGE, LeversConfig(embedding_cache_size=embedding_cache_size),
                               apply=lambda levers: self.cache.resize(levers.embedding_cache_size), boundary="now")
        self.batch_sizes: list[int] = []  # sizes of the batches actually run (observability)
        self.encoder_calls = 0
        self.threads_in_use: int | None = None
        self._encode_batch.set_max_batch_size(batching_cfg.max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(batching_cfg.batch_wait_timeout_s)
        logger.info("text encoder ready on %s", self.device)

    def reconfigure(self, user_config: dict | None) -> None:
        """Live levers (Serve's `user_config`, `LIVE_LEVERS["text_encoder"]`): the embedding cache's
        size; a smaller one drops the least recently used prompts. A bad value raises, changing nothing."""
        self.live.receive(user_config)
        self.live.apply_pending()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _encode_batch(self, prompts: list[str]) -> list[np.ndarray]:
        self.batch_sizes.append(len(prompts))
        self.encoder_calls += 1
        try:
            embeds = await asyncio.to_thread(self._encode_in_thread, prompts)
        except self._torch.OutOfMemoryError as exc:
            raise StageOutOfMemory(f"out of memory encoding {len(prompts)} prompts", stage=STAGE) from exc
        except Exception as exc:
            raise StageError(f"text encoding failed: {exc}", stage=STAGE) from exc
        return [embeds[i:i + 1] for i in range(len(prompts))]

    def _encode_in_thread(self, prompts: list[str]) -> np.ndarray:
        self.threads_in_use = self._torch.get_num_threads()  # what torch uses in the thread that runs the model
        return encode_prompts(self.tokenizer, self.encoder, prompts, self.model_cfg.max_sequence_length, self.device)

    async def encode_one(self, prompt: str) -> np.ndarray:
        """(1, L, D) fp32 embeddings of one prompt, from the cache or a (batched) encoder run."""
        key = clean_prompt(prompt)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        embeds = await self._encode_batch(prompt)
        self.cache.put(key, embeds)
        return embeds

    async def encode(self, prompt: str, negative_prompt: str | None = None) -> PromptEmbeds:
        """Prompt and (when given) negative prompt, encoded concurrently so they share a batch."""
        hits_before = self.cache.hits
        if negative_prompt is None:
            return PromptEmbeds(prompt_embeds=await self.encode_one(prompt),
                                cache_hits=self.cache.hits - hits_before)
        pos, neg = await asyncio.gather(self.encode_one(prompt), self.encode_one(negative_prompt))
        return PromptEmbeds(prompt_embeds=pos, negative_prompt_embeds=neg, cache_hits=self.cache.hits - hits_before)

    def stats(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes), "encoder_calls": self.encoder_calls,
                "cache_hits": self.cache.hits, "cache_misses": self.cache.misses,
                "cache_size": len(self.cache), "levers": {"embedding_cache_size": self.cache.size}, **self.live.stats(),
                "torch_threads": self.torch_threads,
                "torch_threads_in_use": self.threads_in_use, "replica_id": replica_id(), "time": time.time()}

    def check_health(self) -> None:
        if self.encoder is None:
            raise RuntimeError("text encoder not loaded")
