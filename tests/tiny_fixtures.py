"""Fixtures of the in-process tests on the tiny pipeline (no Ray): import them into a module
(`from tests.tiny_fixtures import one_thread, pipe  # noqa: F401`) to use them there."""

from __future__ import annotations

import pytest
import torch

from serve.pipeline.tiny_model import build_tiny_pipeline


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's tensors are too small for intra-op threads to pay; on a busy machine they
    only wait on each other (tests/test_lora.py ran ~20x slower with 2 threads under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe():
    """The tiny SkyReels-V2 pipeline, built once per module (seed 0)."""
    return build_tiny_pipeline(0)
