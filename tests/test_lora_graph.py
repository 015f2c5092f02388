"""LoRA adapters per request through the deployed graph: the frames equal diffusers' pipeline with
the same adapter loaded; Serve's model multiplexing sends a request to the Transformer replica that
already holds its adapter; an adapter's own defaults (a step-distilled adapter's steps and guidance)
apply when the request sets none."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ray import serve

from conftest import tiny_app_args
from serve.stages import TRANSFORMER

APP = "lora"
SHAPE = dict(width=64, height=64, num_frames=9, num_inference_steps=3, guidance_scale=5.0)


@pytest.fixture(scope="module")
def loras(tiny_model_dir):
    from serve.pipeline.tiny_model import make_tiny_loras

    return make_tiny_loras(tiny_model_dir)


@pytest.fixture(scope="module")
def adapters_dir(loras, tmp_path_factory):
    """A folder of adapters (the tiny LoRAs, copied) that a test may add to while the app runs."""
    import shutil

    folder = tmp_path_factory.mktemp("loras")
    for name, path in loras.items():
        shutil.copytree(path, folder / name)
    return folder


@pytest.fixture(scope="module")
def lora_app(ray_cluster, loras, adapters_dir):
    from client.handle import GeneratorClient
    from serve.app import build_app

    lora = {"adapters_dir": str(adapters_dir), "max_loaded": 2,
            # a listed adapter with its own defaults, as a step-distilled one would have
            "adapters": [{"name": "style-a-fast", "path": str(loras["style-a"]), "scale": 0.5,
                          "num_inference_steps": 2, "guidance_scale": 1.0}]}
    args = tiny_app_args(name=APP, model={"lora": lora},
                         deployments={"transformer": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.1}}})
    serve.run(build_app(args), name=APP, route_prefix=None)
    yield GeneratorClient(APP)
    serve.delete(APP)


async def _run(client, spec: dict):
    """The job's result and the Transformer replica that denoised it."""
    replica = result = None
    async for event in client.astream(spec):
        if event.type == "stage" and event.stage == "transformer" and event.stage_status == "started":
            replica = event.replica
        if event.type == "result":
            result = event.result
    assert replica and result is not None
    return result, replica


async def test_frames_with_an_adapter_equal_diffusers_with_it_loaded(lora_app, graph_app, tiny_model_dir, loras):
    from diffusers import SkyReelsV2Pipeline

    spec = {"prompt": "a paper lantern over a lake", "negative_prompt": "", "seed": 3, "return_frames": True,
            **SHAPE}
    got, _ = await _run(lora_app, {**spec, "lora": {"name": "style-a", "scale": 0.8}})
    assert got.spec.lora.name == "style-a" and got.spec.lora.scale == 0.8

    pipe = SkyReelsV2Pipeline.from_pretrained(tiny_model_dir)
    pipe.load_lora_weights(str(loras["style-a"]), adapter_name="style-a")
    pipe.set_adapters(["style-a"], [0.8])
    expected = pipe(spec["prompt"], negative_prompt="", generator=torch.Generator().manual_seed(3),
                    max_sequence_length=512, **SHAPE).frames[0]
    assert np.abs(got.frames - expected).max() <= 1e-5
    # and the adapter does change the video: the base model's frames are another video
    base = await graph_app.agenerate(spec)
    assert np.abs(base.frames - got.frames).max() > 0.05
    # the same app without an adapter is the base model again, exactly
    again, _ = await _run(lora_app, spec)
    assert np.abs(again.frames - base.frames).max() <= 1e-5


def _transformer_replicas() -> set[str]:
    details = serve.context._get_global_client().get_serve_details()["applications"][APP]["deployments"]
    return {r["replica_id"] for r in details[TRANSFORMER.deployment]["replicas"] if r["state"] == "RUNNING"}


async def test_a_request_goes_to_the_replica_that_holds_its_adapter(lora_app):
    """Whichever Transformer replica an adapter's first job lands on (Serve's choice: the other
    replica, or the same one, which holds up to two adapters) loads it; Serve's router then knows
    which replica holds which adapter, and every later job naming it goes there."""
    spec = {"prompt": "a windmill", "seed": 1, **SHAPE, "num_inference_steps": 1}
    first = {}
    for name in ("style-a", "style-b"):
        _, first[name] = await _run(lora_app, {**spec, "lora": {"name": name}})
    assert set(first.values()) <= _transformer_replicas()  # the ids the events name are the app's replicas
    for _ in range(3):
        for name in ("style-a", "style-b"):
            _, replica = await _run(lora_app, {**spec, "lora": {"name": name}})
            assert replica == first[name], (name, replica, first)


async def test_an_adapters_own_defaults_apply_when_the_request_sets_none(lora_app):
    got, _ = await _run(lora_app, {"prompt": "a fast sketch", "seed": 2, "lora": {"name": "style-a-fast"}})
    assert (got.spec.num_inference_steps, got.spec.guidance_scale, got.spec.lora.scale) == (2, 1.0, 0.5)
    # what the request sets wins over the adapter's defaults
    got, _ = await _run(lora_app, {"prompt": "a fast sketch", "seed": 2, "num_inference_steps": 3,
                                   "lora": {"name": "style-a-fast", "scale": 1.0}})
    assert (got.spec.num_inference_steps, got.spec.guidance_scale, got.spec.lora.scale) == (3, 1.0, 1.0)


async def test_an_adapter_added_to_the_folder_while_the_app_runs_is_served(lora_app, adapters_dir, loras):
    import shutil

    spec = {"prompt": "a copper kettle", "seed": 4, "return_frames": True, **SHAPE, "num_inference_steps": 2}
    shutil.copytree(loras["style-a"], adapters_dir / "style-c")  # the same weights under a new name
    added, _ = await _run(lora_app, {**spec, "lora": {"name": "style-c", "scale": 0.6}})
    same, _ = await _run(lora_app, {**spec, "lora": {"name": "style-a", "scale": 0.6}})
    assert added.spec.lora.name == "style-c"
    assert np.abs(added.frames - same.frames).max() <= 1e-5


def test_jobs_with_different_adapters_never_share_a_batch():
    from serve.config import ModelConfig
    from serve.contracts import GenerationSpec
    from serve.errors import InvalidSpecError
    from serve.pipeline.spec import resolve_spec

    model = ModelConfig(lora={"adapters_dir": "embedded"})
    a, b, none = (resolve_spec(GenerationSpec(prompt="x", seed=1, **({"lora": {"name": n}} if n else {})), model)
                  for n in ("style-a", "style-b", None))
    assert len({a.request_batch_key(), b.request_batch_key(), none.request_batch_key()}) == 3
    scaled = resolve_spec(GenerationSpec(prompt="x", seed=1, lora={"name": "style-a", "scale": 0.3}), model)
    assert scaled.request_batch_key() != a.request_batch_key()
    with pytest.raises(InvalidSpecError, match="style-a") as err:
        resolve_spec(GenerationSpec(prompt="x", lora={"name": "nope"}), model)
    assert err.value.param == "lora"
