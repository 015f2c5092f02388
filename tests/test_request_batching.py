"""Exact speed levers on the Serve graph: request batching in the Transformer, CFG as one batched
forward, the prompt-embedding cache. Each keeps the fidelity rule. They are live levers: the session
app runs with them switched on for this module (a redeploy that reconfigures its replicas), and the
"alone" runs go through the same app one at a time."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from ray import serve

from conftest import GRAPH_APP
from tests.http_fixtures import session_app_levers
from serve.stages import TEXT_ENCODER, TRANSFORMER

APP = GRAPH_APP
LEVERS = {"cfg_batch": True, "embedding_cache_size": 16, "batch_max_size": 4, "batch_wait_timeout_s": 0.2}
SHAPE = dict(width=96, height=64, num_frames=9, num_inference_steps=3, guidance_scale=5.0)


@pytest.fixture(scope="module")
def levers_app(http_env):
    from client.handle import GeneratorClient

    with session_app_levers(http_env, **LEVERS):
        yield GeneratorClient(APP)


def _handle(name):
    return serve.get_deployment_handle(name, app_name=APP)


def test_exact_levers_keep_frames_equal_to_diffusers(levers_app, tiny_model_dir):
    from diffusers import SkyReelsV2Pipeline

    pipe = SkyReelsV2Pipeline.from_pretrained(tiny_model_dir)
    expected = pipe("a paper boat on a river", negative_prompt="", generator=torch.Generator().manual_seed(21),
                    max_sequence_length=512, **SHAPE).frames[0]
    result = levers_app.generate({"prompt": "a paper boat on a river", "negative_prompt": "", "seed": 21,
                                  "return_frames": True, **SHAPE})
    assert np.abs(result.frames - expected).max() <= 1e-5


async def test_same_shape_jobs_run_as_one_batch_with_unbatched_results(levers_app, graph_app):
    prompts = [("a snail on a leaf", 1), ("a kite over a field", 2), ("a train in the hills", 3)]
    before = (await _handle(TRANSFORMER.deployment).stats.remote())["batches_run"]
    batched = await asyncio.gather(*[
        levers_app.agenerate({"prompt": p, "seed": s, "return_frames": True, **SHAPE}) for p, s in prompts])
    after = (await _handle(TRANSFORMER.deployment).stats.remote())["batches_run"][len(before):]
    assert max(after) >= 2, after  # jobs shared a denoising batch
    for (prompt, seed), got in zip(prompts, batched):
        alone = await graph_app.agenerate({"prompt": prompt, "seed": seed, "return_frames": True, **SHAPE})
        assert np.abs(got.frames - alone.frames).max() <= 1e-5


async def test_different_shapes_are_not_batched_together(levers_app):
    before = len((await _handle(TRANSFORMER.deployment).stats.remote())["batches_run"])
    await asyncio.gather(
        levers_app.agenerate({"prompt": "small", "seed": 1, **SHAPE}),
        levers_app.agenerate({"prompt": "wide", "seed": 1, **{**SHAPE, "width": 128}}))
    after = (await _handle(TRANSFORMER.deployment).stats.remote())["batches_run"][before:]
    assert after == [1, 1]


async def test_embedding_cache_returns_identical_embeddings_and_skips_the_encoder(levers_app):
    encoder = _handle(TEXT_ENCODER.deployment)
    first = await encoder.encode.remote("a unique prompt about a glass whale", None)
    calls = (await encoder.stats.remote())["encoder_calls"]
    second = await encoder.encode.remote("a unique prompt about a glass whale", None)
    stats = await encoder.stats.remote()
    assert stats["encoder_calls"] == calls  # served from the cache
    assert second.cache_hits == 1
    assert np.array_equal(first.prompt_embeds, second.prompt_embeds)


async def test_step_level_batching_joins_mid_way_drops_a_cancelled_job_and_keeps_each_result(levers_app, graph_app,
                                                                                              http_env):
    """levers.continuous_batching switched on live (same app, a redeploy that changes only live levers):
    jobs with their own steps, guidance and seeds join the running batch between steps; one cancelled
    mid-batch leaves it; every finished job's frames equal the same job run alone afterwards."""
    from tests.http_fixtures import deploy_http_app

    deploy_http_app(APP, http_env.data_dir, http_env.url, levers={**LEVERS, "continuous_batching": True})
    transformer = _handle(TRANSFORMER.deployment)
    stats = await transformer.stats.remote()  # received; in effect from the next batch boundary
    assert stats["levers"]["continuous_batching"] or stats["levers_pending"]
    long = {"prompt": "a lighthouse at dusk", "seed": 5, "return_frames": True, **SHAPE,
            "num_inference_steps": 40}  # long enough for the others to arrive mid-way on a loaded box
    joiner = {"prompt": "a red kite", "seed": 6, "return_frames": True, **SHAPE, "num_inference_steps": 3,
              "guidance_scale": 1.0}
    doomed = {"prompt": "a job that is cancelled", "seed": 7, **SHAPE, "num_inference_steps": 16}

    async def cancelled_after_two_steps():
        steps = 0
        gen = levers_app.astream(doomed)
        async for event in gen:
            steps += event.type == "step"
            if steps == 2:
                break  # the caller goes away mid-batch
        await gen.aclose()

    joined = doomed_task = None
    last = None
    async for event in levers_app.astream(long):
        if event.type == "step" and event.step == 1:  # the batch is running: two more jobs come in
            joined = asyncio.ensure_future(levers_app.agenerate(joiner))
            doomed_task = asyncio.ensure_future(cancelled_after_two_steps())
        last = event
    assert last.type == "result", last
    long_result, joined_result = last.result, await joined
    await doomed_task
    stats = await transformer.stats.remote()
    assert stats["continuous"]["joined_mid_batch"] >= 1, stats["continuous"]
    assert stats["continuous"]["max_active"] >= 2, stats["continuous"]
    assert any(c["steps_after_cancel"] <= 1 for c in stats["cancellations"]), stats["cancellations"]
    for spec, got in ((long, long_result), (joiner, joined_result)):
        alone = await graph_app.agenerate(spec)
        assert np.abs(got.frames - alone.frames).max() <= 1e-5
