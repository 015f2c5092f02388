"""Apply the model-level speed levers of `LeversConfig` to loaded models: the DiT's and VAE's dtypes,
`torch.compile` of the DiT (regional: each repeated transformer block), and VAE tiling.

The request-level levers (CFG as one batched forward, the prompt-embedding LRU, request batching)
live in the deployments; the step cache is `serve.pipeline.step_cache.make_step_cache` (the hand-written
first-block `FirstBlockCache`, or cache-dit's DBCache in `serve.pipeline.step_cache.dbcache`).

Quality cost of each lever (measured in tests/test_levers.py and loadtests/bench_gpu.py):
- dtype bfloat16/float16 for the DiT: approximate (PSNR against fp32 reported); the modules diffusers
  keeps in fp32 when loading (`_keep_in_fp32_modules`: rope, time embedder, norms, modulation
  tables) stay fp32, exactly as `from_pretrained(torch_dtype=...)` leaves them.
- VAE dtype: keep float32 (the default) unless memory is short; the decode is where bf16 shows.
- compile_transformer: exact up to floating-point reassociation by the compiler (~1e-6 on CPU fp32).
- transformer_dtype fp8: approximate; the DiT blocks' Linear layers in float8 (torchao), the rest in
  bf16; GPUs only (`serve.pipeline.fp8`). A restart lever.
- model.attention_backend: the DiT's attention kernel (`serve.pipeline.attention_backend`): exact
  backends equal native's frames (fp32 CPU <= 1e-5), sage is approximate. Set at load.
- vae_tiling: lowers peak memory of decode for large frames; tiles are blended at the seams, so it
  is approximate once the frames are larger than one tile (PSNR reported), exact below that.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import torch

from serve.config import LeversConfig, validate_live_levers
from serve.pipeline.dtypes import cast_model, main_dtype  # noqa: F401 - also imported from here
from serve.pipeline.loading import resolve_subfolder, torch_dtype

logger = logging.getLogger(__name__)


class PendingLevers:
    """A stage's live-levers handshake. Serve's `reconfigure()` (on its own thread) hands the stage's
    `user_config` to `receive`, which validates it over the levers in effect (a bad value raises and
    changes nothing) and keeps the result pending; the stage calls `take` at its own boundary (between
    batches, before a decode), when nothing runs with the old levers, and applies what it gets back."""

    def __init__(self, stage: str):
        self.stage = stage
        self._next: LeversConfig | None = None
        self._lock = threading.Lock()
        self.received = 0  # user_configs received (observability)

    def receive(self, current: LeversConfig, user_config: dict | None) -> LeversConfig:
        """`user_config` over the stage's live levers in `current`, validated and kept until `take`."""
        new = validate_live_levers(self.stage, current.live_for(self.stage), user_config)
        with self._lock:
            self._next = new
        self.received += 1
        return new

    def take(self, current: LeversConfig) -> LeversConfig | None:
        """`current` with the pending live levers in, and nothing pending any more; None when none were."""
        with self._lock:
            new, self._next = self._next, None
        if new is None:
            return None
        return current.model_copy(update=new.live_for(self.stage))

    @property
    def pending(self) -> bool:
        return self._next is not None


class LiveLevers:
    """A stage's live levers, the one handshake of every stage (Transformer, VAE, TextEncoder): the
    levers in effect (`current`), a `PendingLevers` for what `reconfigure()` receives, and how the
    stage applies them (`apply(new_levers)`, called by `apply_pending` at the stage's boundary: between
    batches, before a decode, or at once when the stage has no boundary to wait for)."""

    def __init__(self, stage: str, levers: LeversConfig, apply: Callable[[LeversConfig], None] | None = None,
                 boundary: str = "the next batch"):
        self.stage = stage
        self.current = levers
        self._apply = apply
        self.boundary = boundary
        self._pending = PendingLevers(stage)

    def receive(self, user_config: dict | None) -> LeversConfig:
        """Serve's `reconfigure(user_config)`: validated over the levers in effect (a bad value raises
        and changes nothing), pending until `apply_pending`."""
        new = self._pending.receive(self.current, user_config)
        logger.info("%s: live levers received (in effect from %s): %s", self.stage, self.boundary,
                    new.live_for(self.stage))
        return new

    def apply_pending(self) -> bool:
        """At the stage's boundary: apply the pending levers (if any) and make them current."""
        levers = self._pending.take(self.current)
        if levers is None:
            return False
        if self._apply is not None:
            self._apply(levers)
        self.current = levers
        logger.info("%s: live levers in effect: %s", self.stage, levers.live_for(self.stage))
        return True

    @property
    def pending(self) -> bool:
        return self._pending.pending

    @property
    def received(self) -> int:
        return self._pending.received

    def stats(self) -> dict:
        return {"levers_pending": self.pending, "reconfigures": self.received}


def compile_transformer(transformer: torch.nn.Module, **compile_kwargs: Any) -> str:
    """Regional compilation: `torch.compile` each repeated block (diffusers' `compile_repeated_blocks`),
    which compiles once for all blocks and keeps the model's own forward (and the step cache, which
    calls the blocks directly) working. Falls back to compiling the blocks one by one."""
    compile_kwargs.setdefault("dynamic", False)
    if hasattr(transformer, "compile_repeated_blocks") and getattr(transformer, "_repeated_blocks", None):
        transformer.compile_repeated_blocks(**compile_kwargs)
        return "compile_repeated_blocks"
    for block in getattr(transformer, "blocks", []):
        block.compile(**compile_kwargs)
    return "blocks"


def apply_levers(transformer, vae, levers, model_cfg=None) -> dict:
    """Apply dtype, compile and VAE-tiling levers in place; returns what was done (for logs/health).

    `levers` is a `serve.config.LeversConfig`; `model_cfg` a `serve.config.ModelConfig` (its `dtype`
    and `vae_dtype`) or None to leave dtypes alone. Call it after loading the models and before
    building the `DenoiseLoop` (which reads the DiT's dtype). Idempotent for dtypes and tiling."""
    applied: dict[str, Any] = {}
    if transformer is not None and model_cfg is not None:
        want = torch_dtype(model_cfg.dtype)
        if main_dtype(transformer) != want and not getattr(transformer, "_cinevivid_fp8", None):
            cast_model(transformer, want)
        applied["transformer_dtype"] = str(want).removeprefix("torch.")
    if transformer is not None and model_cfg is not None:
        from serve.pipeline.attention_backend import set_attention_backend

        applied["attention_backend"] = set_attention_backend(
            transformer, model_cfg.attention_backend, _device_of(transformer),
            masked=model_cfg.diffusion_forcing is not None)  # DF's causal blocks attend through a mask
    if transformer is not None and getattr(levers, "transformer_dtype", "model") == "fp8":
        from serve.pipeline.fp8 import fp8_mode, quantize_fp8

        mode = fp8_mode(_device_of(transformer))  # LeverUnavailable on a CPU / without torchao
        applied["fp8"] = {"mode": mode, "linears": quantize_fp8(transformer, mode)}
        applied["transformer_dtype"] = "fp8"
    if vae is not None and model_cfg is not None:
        want = torch_dtype(model_cfg.vae_dtype)
        if main_dtype(vae) != want:
            vae.to(want)
        applied["vae_dtype"] = str(want).removeprefix("torch.")
    if vae is not None and getattr(levers, "vae_tiling", False):
        vae.enable_tiling(tile_sample_min_height=levers.vae_tile_px, tile_sample_min_width=levers.vae_tile_px,
                          tile_sample_stride_height=levers.vae_tile_stride_px,
                          tile_sample_stride_width=levers.vae_tile_stride_px)
        applied["vae_tiling"] = True
    if transformer is not None and getattr(levers, "compile_transformer", False):
        if getattr(transformer, "_cinevivid_compiled", False):
            applied["compile"] = "already"
        else:
            applied["compile"] = compile_transformer(transformer)
            transformer._cinevivid_compiled = True
    if applied:
        logger.info("levers applied: %s", applied)
    return applied


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def lever_state(transformer=None, vae=None) -> dict:
    """What is in effect in these loaded models, read from the models themselves (not from the
    config): the dtypes, how many DiT blocks are compiled, whether the VAE tiles and its tile size."""
    state: dict[str, Any] = {}
    if transformer is not None:
        blocks = list(getattr(transformer, "blocks", []))
        state["transformer_dtype"] = str(main_dtype(transformer)).removeprefix("torch.")
        state["compiled_blocks"] = sum(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
        state["blocks"] = len(blocks)
        from serve.pipeline.attention_backend import attention_backend_of
        from serve.pipeline.fp8 import fp8_linear_count

        state["attention_backend"] = attention_backend_of(transformer)
        state["fp8_linears"] = fp8_linear_count(transformer)
    if vae is not None:
        state["vae_dtype"] = str(main_dtype(vae)).removeprefix("torch.")
        state["vae_tiling"] = bool(getattr(vae, "use_tiling", False))
        state["vae_tile_px"] = getattr(vae, "tile_sample_min_width", None)
    return state


def load_transformer(model: ModelConfig, levers, device, before_compile=None):
    """The model's DiT on `device`, in eval mode, with its load-time levers (`levers`: a
    LeversConfig: dtype, attention backend, fp8; torch.compile last). `before_compile(transformer)`
    runs before the compile: the context-parallel split of a replica that spans several devices
    (`serve.pipeline.parallel`), whose hooks the compiled blocks must see. The Transformer
    deployment and each of its parallel workers load through here."""
    from diffusers import SkyReelsV2Transformer3DModel

    transformer = SkyReelsV2Transformer3DModel.from_pretrained(
        resolve_subfolder(model, "transformer"), torch_dtype=torch_dtype(model.dtype))
    transformer = transformer.to(device).eval()
    apply_levers(transformer, None, levers.model_copy(update={"compile_transformer": False}), model_cfg=model)
    if before_compile is not None:
        before_compile(transformer)
    if levers.compile_transformer:
        apply_levers(transformer, None, levers.model_copy(update={"transformer_dtype": "model"}))
    return transformer
