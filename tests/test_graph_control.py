"""Cancellation, batching in the text encoder, bad input, failing stages."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from ray import serve

from serve.errors import GenerationCancelled, InvalidSpecError, StageError, UnknownModelError

from conftest import GRAPH_APP, tiny_app_args
from serve.stages import TEXT_ENCODER, TRANSFORMER


def _wait_idle(transformer, timeout_s=30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = transformer.stats.remote().result()
        if stats["running"] == 0 and stats["pending"] == 0:
            return stats
        assert time.monotonic() < deadline, f"transformer still busy: {stats}"
        time.sleep(0.02)


def test_cancel_stops_within_one_step_and_replicas_stay_healthy(graph_app, stage_handle):
    transformer = stage_handle(TRANSFORMER.deployment)
    before = _wait_idle(transformer)
    steps = 100
    stream = graph_app.stream({"prompt": "a long slow pan", "seed": 9, "width": 128, "height": 128,
                               "num_frames": 17, "num_inference_steps": steps})
    events = []
    with pytest.raises(GenerationCancelled):  # a cancelled stream ends with GenerationCancelled
        for event in stream:
            events.append(event)
            if event.type == "step" and event.step == 2:
                stream.cancel()
    after = _wait_idle(transformer)
    assert not any(e.type == "result" for e in events)
    # once the cancel reached the Transformer, at most the step already in flight finished
    cancelled = after["cancellations"][len(before["cancellations"]):]
    assert len(cancelled) == 1 and cancelled[0]["steps_after_cancel"] <= 1, cancelled
    assert after["steps_run"] - before["steps_run"] < steps
    # the next request is served normally
    result = graph_app.generate({"prompt": "after the cancel", "seed": 1, "num_inference_steps": 2})
    assert result.mp4[4:8] == b"ftyp"
    status = serve.status().applications[GRAPH_APP].deployments
    assert all(str(d.status).endswith("HEALTHY") and "UN" not in str(d.status) for d in status.values())


def test_leaving_a_stream_early_cancels_the_generation(graph_app, stage_handle):
    transformer = stage_handle(TRANSFORMER.deployment)
    before = _wait_idle(transformer)
    for event in graph_app.stream({"prompt": "left early", "seed": 3, "width": 128, "height": 128,
                                   "num_frames": 17, "num_inference_steps": 100}):
        if event.type == "step":
            break  # leaving the iteration cancels the generation
    after = _wait_idle(transformer)
    assert after["steps_run"] - before["steps_run"] < 100
    assert len(after["cancellations"]) == len(before["cancellations"]) + 1


async def test_concurrent_prompts_are_batched_and_match_unbatched(graph_app, stage_handle):
    encoder = stage_handle(TEXT_ENCODER.deployment)
    prompts = [f"prompt number {i}, a cat on a wall" for i in range(6)]
    single = [await encoder.encode.remote(p) for p in prompts]
    sizes_before = len((await encoder.stats.remote())["batch_sizes"])
    together = await asyncio.gather(*[encoder.encode.remote(p) for p in prompts])
    sizes = (await encoder.stats.remote())["batch_sizes"][sizes_before:]
    assert max(sizes) > 1, sizes  # several prompts went through one encoder call
    assert sum(sizes) == len(prompts)
    for one, batched in zip(single, together):
        assert one.prompt_embeds.shape == (1, 512, 32)
        assert np.abs(one.prompt_embeds - batched.prompt_embeds).max() <= 1e-6


def test_embeddings_are_zero_after_the_real_tokens(stage_handle, tiny_model_dir):
    from transformers import AutoTokenizer

    embeds = stage_handle(TEXT_ENCODER.deployment).encode.remote("a short prompt").result().prompt_embeds[0]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    n = len(tok("a short prompt").input_ids)
    assert np.abs(embeds[:n]).sum(axis=1).min() > 0
    assert not embeds[n:].any()


@pytest.mark.parametrize("field,value,param", [
    ("width", 72, "width"),
    ("height", 40, "height"),
    ("width", 4096, "width"),
    ("num_frames", 10, "num_frames"),
    ("num_frames", 405, "num_frames"),
    ("num_inference_steps", 0, "num_inference_steps"),
    ("num_inference_steps", 101, "num_inference_steps"),
    ("guidance_scale", 0.5, "guidance_scale"),
    ("prompt", "", "prompt"),
    ("prompt", "   ", "prompt"),
    ("prompt", "x" * 2001, "prompt"),
    ("fps", 0, "fps"),
])
def test_bad_input_is_rejected_naming_the_field(graph_app, field, value, param):
    spec = {"prompt": "ok", field: value}
    with pytest.raises(InvalidSpecError) as info:
        graph_app.generate(spec)
    assert info.value.param == param
    assert param.split(".")[-1] in str(info.value)
    # the same check is available without generating anything
    with pytest.raises(InvalidSpecError):
        graph_app.check(spec)


def test_unknown_model_is_rejected(graph_app):
    with pytest.raises(UnknownModelError) as info:
        graph_app.generate({"prompt": "ok", "model": "sora-9000"})
    assert info.value.param == "model" and "sora-9000" in info.value.message


def test_unknown_field_is_rejected_before_sending(graph_app):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        graph_app.generate({"prompt": "ok", "resolution": "4k"})


@pytest.fixture(scope="module")
def faulty_apps(ray_cluster):
    from ray.serve import RunTarget

    from client.handle import GeneratorClient
    from serve.app import build_app

    faults = {"transformer": "oom", "vae": "error"}
    serve.run_many([  # both apps start together
        RunTarget(target=build_app(tiny_app_args(name=f"faulty-{stage}", fault_injection={stage: kind})),
                  name=f"faulty-{stage}", route_prefix=None)
        for stage, kind in faults.items()])
    yield {stage: GeneratorClient(f"faulty-{stage}") for stage in faults}
    for stage in faults:
        serve.delete(f"faulty-{stage}")


@pytest.mark.parametrize("stage,code", [("transformer", "out_of_memory"), ("vae", "stage_failed")])
def test_failing_stage_raises_typed_error_naming_it(faulty_apps, stage, code):
    with pytest.raises(StageError) as info:
        faulty_apps[stage].generate({"prompt": "boom", "num_inference_steps": 2}, timeout_s=60)
    assert info.value.stage == stage and info.value.code == code
    assert stage in str(info.value)
    # the stream form fails the same way and ends (nothing hangs)
    with pytest.raises(StageError):
        list(faulty_apps[stage].stream({"prompt": "boom", "num_inference_steps": 2}))
