"""The attention kernel of a model's DiT (`model.attention_backend`), through diffusers' attention
dispatcher (`ModelMixin.set_attention_backend`), set once at load.

- "auto": the fastest exact backend available on the device: on a CUDA GPU FlashAttention-3
  ("_flash_3", Hopper, when installed), then flash-attn 2 ("flash", when installed), else "native"
  (torch SDPA, which itself dispatches to cuDNN / flash / memory-efficient kernels); on a CPU
  "native". A model that does diffusion forcing gets "native" (see MASK_BACKENDS).
- diffusion forcing with `causal_block_size` > 1 attends through a mask; only MASK_BACKENDS take
  one, so a DF-capable model naming another backend is refused at load (not a failed job later).
- exact backends (every one but "sage") compute the same attention: on a CPU in fp32 their frames
  equal native's within 1e-5 (tests/test_attention_backend.py); on a GPU within the rounding of bf16.
- "sage" (SageAttention, int8 Q·K) is approximate: loadtests/bench_gpu.py reports its PSNR.

A backend that is not installed, or cannot run on the device (cuDNN or flash on a CPU), is refused at
load with `LeverUnavailable`, naming what is available.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from serve.config import APPROXIMATE_ATTENTION_BACKENDS
from serve.errors import LeverUnavailable

logger = logging.getLogger(__name__)

# Exact backends in the order "auto" prefers them on a CUDA GPU (the first available wins)
CUDA_PREFERENCE = ("_flash_3", "flash", "native")
# Backends that take an attention mask (diffusion forcing's causal blocks)
MASK_BACKENDS = ("native", "_native_math", "_native_efficient")
# Backends that run on any device torch SDPA runs on (CPU included); "_native_flash" is torch's own
# flash kernel, which has a CPU implementation
PORTABLE = ("native", "_native_math", "_native_flash")
CUDA_ONLY_NATIVE = ("_native_cudnn", "_native_efficient")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def available_backends(device: torch.device | str, capability: tuple[int, int] | None = None) -> list[str]:
    """The backends CineVivid can set on `device`, in "auto"'s order of preference where it has one."""
    device = torch.device(device)
    if device.type != "cuda":
        return list(PORTABLE) + (["flex"] if _flex_ok() else [])
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    out: list[str] = []
    if _installed("flash_attn_interface") and tuple(capability) >= (9, 0):
        out.append("_flash_3")
    if _installed("flash_attn"):
        out.append("flash")
    out += ["_native_cudnn", "native", "_native_flash", "_native_efficient", "_native_math"]
    if _flex_ok():
        out.append("flex")
    if _installed("sageattention"):
        out.append("sage")
    return out


def _flex_ok() -> bool:
    return hasattr(torch.nn.attention, "flex_attention") or _installed("torch.nn.attention.flex_attention")


def resolve_backend(name: str, device: torch.device | str, capability: tuple[int, int] | None = None,
                    masked: bool = False) -> str:
    """The backend `name` ("auto" or a backend) means on `device`; LeverUnavailable when it cannot run.
    `masked`: the model runs attention with a mask (diffusion forcing's causal blocks)."""
    have = available_backends(device, capability)
    if name == "auto":
        if torch.device(device).type != "cuda" or masked:
            return "native"
        return next(b for b in CUDA_PREFERENCE if b in have)
    if masked and name not in MASK_BACKENDS:
        raise LeverUnavailable(
            f"model.attention_backend {name!r} takes no attention mask, which this model's diffusion forcing "
            f"(causal_block_size > 1) needs; use auto or one of {list(MASK_BACKENDS)}", param="attention_backend")
    if name not in have:
        raise LeverUnavailable(
            f"model.attention_backend {name!r} is not available on {torch.device(device).type!r} here "
            f"(not installed, or no kernel for this device); available: {have}", param="attention_backend")
    return name


def set_attention_backend(transformer: torch.nn.Module, name: str, device: torch.device | str,
                          capability: tuple[int, int] | None = None, masked: bool = False) -> str:
    """Resolve `name` for `device` and set it on every attention module of `transformer` through
    diffusers' dispatcher; returns the backend set (and records it on the model for `lever_state`)."""
    backend = resolve_backend(name, device, capability, masked)
    try:
        transformer.set_attention_backend(backend)
    except (RuntimeError, ValueError) as exc:  # diffusers' own requirement check (package, version)
        raise LeverUnavailable(f"model.attention_backend {backend!r}: {exc}", param="attention_backend") from exc
    transformer._cinevivid_attention_backend = backend
    if backend in APPROXIMATE_ATTENTION_BACKENDS:
        logger.info("attention backend %s is approximate (its PSNR: loadtests/RESULTS.md)", backend)
    return backend


def attention_backend_of(transformer: torch.nn.Module) -> str:
    """The backend set on `transformer` ("native" when none was set): what diffusers' processors hold."""
    set_ = getattr(transformer, "_cinevivid_attention_backend", None)
    if set_:
        return set_
    for module in transformer.modules():
        backend = getattr(getattr(module, "processor", None), "_attention_backend", None)
        if backend is not None:
            return getattr(backend, "value", str(backend))
    return "native"
