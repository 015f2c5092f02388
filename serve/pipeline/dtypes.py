"""A model's dtype, and casting it the way `from_pretrained(torch_dtype=...)` does."""

from __future__ import annotations

from collections import Counter

import torch


def main_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype most of a module's parameters (by element count) have."""
    counts: Counter = Counter()
    for p in module.parameters():
        counts[p.dtype] += p.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast like `from_pretrained(torch_dtype=dtype)` does: everything to `dtype` except the
    parameters under a module named in the class' `_keep_in_fp32_modules`, which stay float32."""
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    torch.nn.Module.to(model, dtype)  # bypass ModelMixin.to's warning: the fp32 modules are restored below
    if dtype != torch.float32 and keep:
        for name, param in model.named_parameters():
            if any(k in name.split(".") for k in keep):
                param.data = param.data.float()
        for name, buf in model.named_buffers():
            if buf.is_floating_point() and any(k in name.split(".") for k in keep):
                buf.data = buf.data.float()
    return model
