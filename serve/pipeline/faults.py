"""Chaos testing only (`AppArgs.fault_injection`): make a stage fail inside its model call the way
it would in production, through the real error path."""

from __future__ import annotations

import torch


def inject_fault(kind: str) -> None:
    if kind == "oom":
        raise torch.OutOfMemoryError("injected: CUDA out of memory. Tried to allocate 20.00 GiB")
    raise RuntimeError(f"injected fault: {kind}")
