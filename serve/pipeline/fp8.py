"""FP8 DiT (`levers.transformer_dtype: fp8`): the Linear layers of the DiT's transformer blocks
quantised to float8 once at load, through torchao's float8 configs; everything else in bfloat16
(or float32 where diffusers keeps it: rope, time embedder, norms, modulation tables).

What runs where (`fp8_mode`):
- a CUDA GPU of compute capability >= 8.9 (Ada, Hopper, Blackwell): `Float8DynamicActivationFloat8WeightConfig`
  (per-row scales): the matmuls run in float8 on the tensor cores;
- an older CUDA GPU (A100, ...): `Float8WeightOnlyConfig`: float8 weights (half of bf16's memory),
  dequantised to bf16 for the matmul;
- a CPU, or torchao not installed: refused with `LeverUnavailable` (there are no float8 matmul kernels
  on a CPU; weight-only would only dequantise, slower than float32).

Kept in high precision (`fp8_filter` says no): the patch embedding (a Conv3d), the condition embedder
(time/text/image embedders), every norm, the output head `proj_out`, and any Linear whose in/out
features are not multiples of 16 (float8 GEMMs need them). Approximate: loadtests/bench_gpu.py reports
the PSNR of the frames against the exact (bf16) run.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from serve.errors import LeverUnavailable

logger = logging.getLogger(__name__)

Fp8Mode = Literal["dynamic", "weight_only"]
# The capability from which float8 tensor-core matmuls exist (Ada Lovelace 8.9, Hopper 9.0)
FP8_MATMUL_CAPABILITY = (8, 9)
# float8 GEMMs (torch._scaled_mm) need both matrix dimensions to be multiples of 16
FP8_DIM_MULTIPLE = 16
# Top-level parts of the DiT that are never quantised (embeddings and the output head)
FP8_KEEP_PREFIXES = ("patch_embedding", "condition_embedder", "proj_out", "rope")


def fp8_mode(device: torch.device | str, capability: tuple[int, int] | None = None) -> Fp8Mode:
    """The float8 scheme `device` runs; raises LeverUnavailable naming why where it runs none.
    `capability`: the CUDA compute capability (read from the device when None)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise LeverUnavailable(
            f"levers.transformer_dtype: fp8 needs a CUDA GPU; this model's DiT runs on {device.type!r}, "
            "which has no float8 matmul kernels. Use transformer_dtype: model (and the model's dtype) here.",
            param="levers.transformer_dtype")
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise LeverUnavailable("levers.transformer_dtype: fp8 needs torchao, which is not installed "
                               "(pip install 'cinevivid[gpu]')", param="levers.transformer_dtype") from None
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    return "dynamic" if tuple(capability) >= FP8_MATMUL_CAPABILITY else "weight_only"


def fp8_filter(module: torch.nn.Module, fqn: str) -> bool:
    """torchao's `filter_fn`: True for the modules to quantise: the Linear layers inside the
    transformer blocks whose dimensions float8 GEMMs take; never an embedder, a norm or the head."""
    if not isinstance(module, torch.nn.Linear):
        return False
    if not fqn.startswith("blocks.") or fqn.startswith(FP8_KEEP_PREFIXES):
        return False
    if any(part.startswith("norm") for part in fqn.split(".")):
        return False
    return module.in_features % FP8_DIM_MULTIPLE == 0 and module.out_features % FP8_DIM_MULTIPLE == 0


def torchao_config(mode: Fp8Mode):
    """The torchao quantisation config of `mode`."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow

    if mode == "dynamic":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    if mode == "weight_only":
        return Float8WeightOnlyConfig()
    raise ValueError(f"unknown fp8 mode {mode!r}")


def quantize_fp8(transformer: torch.nn.Module, mode: Fp8Mode) -> int:
    """Cast the DiT to bfloat16 (its fp32-kept modules stay fp32) and quantise the Linear layers that
    `fp8_filter` selects with torchao, once: a second call does nothing. Returns how many Linear
    layers hold float8 weights. `mode` comes from `fp8_mode` (the load path) or a test."""
    from torchao.quantization import quantize_

    from serve.pipeline.dtypes import cast_model, main_dtype

    if getattr(transformer, "_cinevivid_fp8", None):
        return fp8_linear_count(transformer)
    if main_dtype(transformer) != torch.bfloat16:
        cast_model(transformer, torch.bfloat16)
    quantize_(transformer, torchao_config(mode), filter_fn=fp8_filter)
    transformer._cinevivid_fp8 = mode
    n = fp8_linear_count(transformer)
    logger.info("fp8 (%s): %d Linear layers of the DiT hold float8 weights", mode, n)
    return n


def fp8_linear_count(module: torch.nn.Module) -> int:
    """How many Linear layers of `module` hold float8 weights (torchao tensor subclasses)."""
    return sum(1 for m in module.modules() if isinstance(m, torch.nn.Linear) and is_fp8_weight(m.weight))


def is_fp8_weight(weight: torch.Tensor) -> bool:
    """True for a torchao float8 weight (its storage is float8, whatever dtype it presents)."""
    for attr in ("qdata", "float8_data", "_data"):
        inner = getattr(weight, attr, None)
        if isinstance(inner, torch.Tensor) and inner.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return True
    return False
