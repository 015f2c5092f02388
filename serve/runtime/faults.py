"""Chaos testing only: make a stage fail inside its model call the way it would in production,
through the real error path (`AppArgs.fault_injection`), or slow it down without changing its
output so a test can kill its replica mid-call (`AppArgs.chaos_delay_s`)."""

from __future__ import annotations

import time

import torch


def inject_fault(kind: str) -> None:
    if kind == "oom":
        raise torch.OutOfMemoryError("injected: CUDA out of memory. Tried to allocate 20.00 GiB")
    raise RuntimeError(f"injected fault: {kind}")


def chaos_pause(seconds: float) -> None:
    """Block this (worker) thread for `seconds`; nothing when 0."""
    if seconds > 0:
        time.sleep(seconds)
