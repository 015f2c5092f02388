"""Calling the stages of the session app directly through their Serve handles, as the Generator
does: a job's spec resolved and its prompt encoded (`prepare`), and a Transformer stream run to its
latents (`denoise`)."""

from __future__ import annotations

import numpy as np

from serve.contracts import DenoisedLatents, ResolvedSpec
from serve.stages import GENERATOR, TEXT_ENCODER


async def prepare(stage_handle, spec: dict):
    resolved = ResolvedSpec.model_validate(await stage_handle(GENERATOR.deployment).check.remote(spec))
    embeds = await stage_handle(TEXT_ENCODER.deployment).encode.remote(
        resolved.prompt, resolved.negative_prompt if resolved.do_cfg else None)
    return resolved, embeds


async def denoise(stream, on_step=None) -> np.ndarray:
    """Runs a Transformer stream until it has delivered its latents (a DF job's windows, joined),
    then closes it, as the Generator does (the stream holds the latents while it is open)."""
    parts = []
    try:
        async for event in stream:
            if isinstance(event, DenoisedLatents):
                parts.append(await event.ref[0])
                if event.window is None or event.window == event.num_windows - 1:
                    break
            elif event.type == "step" and on_step is not None:
                on_step(event)
    finally:
        stream.cancel()
    return np.concatenate(parts, axis=2) if parts else None
