"""Approximate speed levers switched on in config, through the deployed graph: the step cache,
torch.compile of the DiT, VAE tiling, and a bf16 DiT. Each app still answers, and the PSNR of its
frames against diffusers' own pipeline (fp32, same seed) is reported (printed and recorded as a
pytest property); the assertions are loose sanity floors, not quality targets.

The exact levers (CFG batching, the embedding cache, request batching) keep the fidelity rule and
are held to it in tests/test_request_batching.py; the in-process lever tests are tests/test_levers.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ray import serve

from conftest import tiny_app_args
from serve.stages import TRANSFORMER, VAE

SHAPE = dict(width=64, height=64, num_frames=9, num_inference_steps=10, guidance_scale=6.0)
PROMPT, SEED = "a hot air balloon over a valley", 5


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    from diffusers import SkyReelsV2Pipeline

    pipe = SkyReelsV2Pipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, negative_prompt="", generator=torch.Generator().manual_seed(SEED), max_sequence_length=512,
                **SHAPE).frames[0]


def _deploy(name: str, **overrides):
    from client.handle import GeneratorClient
    from serve.app import build_app

    serve.run(build_app(tiny_app_args(name=name, **overrides)), name=name, route_prefix=None)
    return GeneratorClient(name)


def _report(record_property, capsys, label: str, value: float) -> None:
    record_property(f"psnr_db[{label}]", "inf" if math.isinf(value) else round(value, 2))
    with capsys.disabled():
        print(f"\n[lever/graph] {label}: PSNR vs diffusers {value:.2f} dB")


def test_step_cache_compile_and_vae_tiling_switched_on_in_config(ray_cluster, expected, record_property, capsys):
    name = "approx-levers"
    # 32 px tiles over 64 px frames: the VAE really decodes tile by tile
    client = _deploy(name, levers={"step_cache_threshold": 0.2, "compile_transformer": True, "vae_tiling": True,
                                   "vae_tile_px": 32, "vae_tile_stride_px": 16, "cfg_batch": True})
    try:
        result = client.generate({"prompt": PROMPT, "negative_prompt": "", "seed": SEED, "return_frames": True,
                                  **SHAPE})
        stats = serve.get_deployment_handle(TRANSFORMER.deployment, app_name=name).stats.remote().result()
        vae = serve.get_deployment_handle(VAE.deployment, app_name=name).stats.remote().result()
        value = psnr(result.frames, expected)
        _report(record_property, capsys, "step cache 0.2 + compile + VAE tiling + CFG batch", value)
        assert result.mp4 and result.frames.shape == expected.shape
        assert stats["step_cache"]["skipped"] > 0  # the cache did skip forwards
        # each lever is in effect in the replicas, read from the loaded models
        assert stats["levers"]["compiled_blocks"] == stats["levers"]["blocks"] > 0, stats["levers"]
        assert vae["levers"]["vae_tiling"] and vae["levers"]["vae_tile_px"] == 32, vae
        assert vae["tiled_decodes"] == vae["decodes"] >= 1, vae  # and this job's decode was tiled
        assert value > 20.0
    finally:
        serve.delete(name)


def test_bf16_dit_switched_on_in_config(ray_cluster, expected, record_property, capsys):
    name = "bf16-lever"
    client = _deploy(name, model={"dtype": "bfloat16"})
    try:
        result = client.generate({"prompt": PROMPT, "negative_prompt": "", "seed": SEED, "return_frames": True,
                                  **SHAPE})
        levers = serve.get_deployment_handle(TRANSFORMER.deployment, app_name=name).stats.remote().result()["levers"]
        vae = serve.get_deployment_handle(VAE.deployment, app_name=name).stats.remote().result()["levers"]
        value = psnr(result.frames, expected)
        _report(record_property, capsys, "bf16 DiT + encoder, fp32 VAE", value)
        assert levers["transformer_dtype"] == "bfloat16" and levers["compiled_blocks"] == 0, levers
        assert vae["vae_dtype"] == "float32" and not vae["vae_tiling"], vae
        assert result.frames.shape == expected.shape and np.isfinite(result.frames).all()
        assert value > 20.0
    finally:
        serve.delete(name)
