"""Live levers and torch threads, through the path `cinevivid up` uses (serve_config.yaml deployed
by `serve.ops.deploy.deploy_serve_config`).

- Redeploying the same config with changed live levers (step-cache threshold, embedding-cache size,
  VAE tiling) reconfigures the running replicas: same replica ids, a job in flight during the
  redeploy completes, the next job runs with the new levers. A bad lever value fails the redeploy,
  naming the field, and the running app is untouched.
- Each model stage's torch thread count follows `deployments.<stage>.torch_threads`, and the default
  on a CPU is the node's cores (what docs/performance.md and serve_config.yaml say).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from pydantic import ValidationError
from ray import serve

from serve.ops.deploy import deploy_serve_config, load_serve_config
from serve.runtime.threads import node_cpus
from serve.stages import GENERATOR, TEXT_ENCODER, TRANSFORMER, VAE

ROOT = Path(__file__).resolve().parent.parent
APP = "live-levers"
STAGES = (TEXT_ENCODER.deployment, TRANSFORMER.deployment, VAE.deployment, GENERATOR.deployment)
JOB = {"prompt": "a lighthouse in a storm", "negative_prompt": "", "width": 64, "height": 64, "num_frames": 9,
       "num_inference_steps": 10, "guidance_scale": 6.0}


def _config(**levers) -> dict:
    """serve_config.yaml as shipped, as its own app on the session's Serve, with `levers` changed."""
    config = copy.deepcopy(load_serve_config(ROOT / "serve_config.yaml"))
    config.pop("http_options")  # keep the session's Serve instance as it is
    config.pop("proxy_location")
    app = config["applications"][0]
    app.update(name=APP, route_prefix=None)
    args = app["args"]
    args.update(name=APP, with_ingress=False, tts={"providers": ["none"]})
    args["models"] = args["models"][:1]  # the T2V model is enough: the levers are the same for every Transformer
    args["deployments"].pop("tts")
    args["deployments"].pop("ingress")
    for stage in args["deployments"].values():  # fit the session cluster next to the other apps
        stage["ray_actor_options"] = {"num_cpus": 0.1}
    args["deployments"]["transformer"]["torch_threads"] = 1  # set: the others keep the default
    args["levers"].update(levers)
    return config


def _replica_ids() -> dict[str, list[str]]:
    details = serve.context._get_global_client().get_serve_details()["applications"][APP]["deployments"]
    return {name: sorted(r["replica_id"] for r in details[name]["replicas"] if r["state"] == "RUNNING")
            for name in STAGES}


def _stats(deployment: str) -> dict:
    return serve.get_deployment_handle(deployment, app_name=APP).stats.remote().result()


@pytest.fixture(scope="module")
def live_app(ray_cluster):
    from client.handle import GeneratorClient

    deploy_serve_config(_config(step_cache_threshold=0.0, embedding_cache_size=0), wait_timeout_s=240)
    yield GeneratorClient(APP)
    serve.delete(APP)


def test_torch_threads_follow_the_config_and_default_to_the_nodes_cores(live_app):
    live_app.generate({**JOB, "num_inference_steps": 1})
    assert _stats(TRANSFORMER.deployment)["torch_threads"] == 1  # deployments.transformer.torch_threads: 1
    for deployment in (TEXT_ENCODER.deployment, VAE.deployment):  # unset: on a CPU, every core of the node
        stats = _stats(deployment)
        assert stats["torch_threads"] == node_cpus(), (deployment, stats)
        # and that is what torch uses in the thread that runs the model (not Ray's OMP_NUM_THREADS=1)
        assert stats["torch_threads_in_use"] == node_cpus(), (deployment, stats)


def test_a_lever_changed_by_redeploy_applies_to_running_replicas(live_app):
    first = live_app.generate(JOB)
    assert first.mp4[4:8] == b"ftyp"
    before = _replica_ids()
    assert all(before.values()), before
    transformer = _stats(TRANSFORMER.deployment)
    assert transformer["step_cache"] is None and transformer["levers"]["step_cache_threshold"] == 0.0
    encoder = _stats(TEXT_ENCODER.deployment)
    assert encoder["levers"]["embedding_cache_size"] == 0 and encoder["cache_size"] == 0

    # a job in flight while the same config is deployed again with other levers
    stream = live_app.stream({**JOB, "prompt": "a job in flight", "num_inference_steps": 60})
    first_step = next(e for e in stream if e.type == "step")
    deploy_serve_config(_config(step_cache_threshold=0.2, embedding_cache_size=8, vae_tiling=True, vae_tile_px=32,
                                vae_tile_stride_px=16), wait_timeout_s=240)
    rest = list(stream)
    assert first_step.step == 1
    assert rest[-1].type == "result" and rest[-1].result.mp4[4:8] == b"ftyp"  # it completed
    assert [e.step for e in rest if e.type == "step"][-1] == 60

    assert _replica_ids() == before  # reconfigured in place: no replica was replaced

    # the next jobs run with the new levers
    live_app.generate(JOB)
    again = live_app.generate(JOB)  # same prompts: from the embedding cache now
    transformer = _stats(TRANSFORMER.deployment)
    assert transformer["levers"]["step_cache_threshold"] == 0.2
    assert transformer["step_cache"]["skipped"] > 0, transformer["step_cache"]
    encoder = _stats(TEXT_ENCODER.deployment)
    assert encoder["levers"]["embedding_cache_size"] == 8 and encoder["cache_hits"] >= 2, encoder
    assert again.mp4[4:8] == b"ftyp"
    vae = _stats(VAE.deployment)
    assert vae["levers"]["vae_tiling"] and vae["levers"]["vae_tile_px"] == 32 and vae["tiled_decodes"] >= 1, vae
    assert _replica_ids() == before

    # and back: a smaller cache drops the oldest prompts, threshold 0 drops the step cache
    deploy_serve_config(_config(step_cache_threshold=0.0, embedding_cache_size=1), wait_timeout_s=240)
    live_app.generate({**JOB, "num_inference_steps": 2})
    transformer, encoder = _stats(TRANSFORMER.deployment), _stats(TEXT_ENCODER.deployment)
    assert transformer["step_cache"] is None and transformer["levers"]["step_cache_threshold"] == 0.0
    assert encoder["cache_size"] == 1
    assert not _stats(VAE.deployment)["levers"]["vae_tiling"]
    assert _replica_ids() == before


def test_a_bad_lever_value_fails_the_redeploy_and_leaves_the_app_running(live_app):
    before = _replica_ids()
    with pytest.raises(ValidationError, match="step_cache_threshold"):
        deploy_serve_config(_config(step_cache_threshold=-1.0), wait_timeout_s=240)
    # Serve's own per-deployment user_config is checked the same way, before any replica sees it
    config = _config()
    config["applications"][0]["deployments"] = [{"name": TRANSFORMER.deployment, "user_config": {"batch_max_size": 0}}]
    with pytest.raises(ValidationError, match="batch_max_size"):
        deploy_serve_config(config, wait_timeout_s=240)
    config["applications"][0]["deployments"] = [{"name": TRANSFORMER.deployment,
                                                 "user_config": {"compile_transformer": True}}]
    with pytest.raises(ValueError, match="not live levers"):
        deploy_serve_config(config, wait_timeout_s=240)
    assert _replica_ids() == before
    assert live_app.generate({**JOB, "num_inference_steps": 1}).mp4[4:8] == b"ftyp"
