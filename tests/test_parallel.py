"""One job across several devices (serve.pipeline.parallel).

- In process: the tiny model's DiT split 2-way over a gloo group of two processes with diffusers'
  own context parallelism (Ulysses, `enable_parallelism`, the SkyReels-V2 plan) gives the latents of
  the single-process run (fp32 CPU, <= 1e-5) for a T2V job and for a 3-window diffusion-forcing job.
- Through Serve: a Transformer replica over 4 ranks (ulysses 2 x cfg 2: its placement group's 4
  bundles, 3 ParallelWorker actors) gives the latents of the session app's one-device replica, and a
  rank that dies fails the job in flight as stage_unavailable and gets the replica replaced.
- The plan and KubeRay count every device; what the split cannot run is refused, at deploy or as a 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from serve.config import ParallelConfig, Settings
from serve.errors import unwrap_error
from serve.frames import parallel_refusal
from serve.pipeline.parallel import skyreels_cp_plan

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models():
    from serve.pipeline.loading import TINY_SEED, tiny_model_path
    from serve.pipeline.tiny_model import make_tiny_model

    settings = Settings()
    return {v: make_tiny_model(tiny_model_path(settings, v), seed=TINY_SEED, variant=v) for v in ("t2v", "df")}


def single_process(models, inputs) -> dict:
    from diffusers import SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

    from serve.pipeline.denoising import DenoiseJob, DenoiseLoop, LoopSettings
    from serve.pipeline.diffusion_forcing import DFJob, DFSettings, DiffusionForcingLoop
    from tests.parallel_worker import DF, T2V

    cpu, out = torch.device("cpu"), {}
    for name in ("t2v", "df"):
        folder = models[name]
        transformer = SkyReelsV2Transformer3DModel.from_pretrained(folder / "transformer").eval()
        scheduler = UniPCMultistepScheduler.from_pretrained(folder / "scheduler")
        if name == "t2v":
            job = DenoiseJob(seed=7, prompt_embeds=inputs["cond"], negative_prompt_embeds=inputs["uncond"])
            DenoiseLoop(transformer, scheduler.config, cpu).run([job], LoopSettings(**T2V))
        else:
            job = DFJob(seed=7, prompt_embeds=inputs["df_cond"], negative_prompt_embeds=inputs["df_uncond"])
            DiffusionForcingLoop(transformer, dict(scheduler.config), cpu).run(
                job, DFSettings(flow_shift=scheduler.config.flow_shift, **DF))
        out[name] = job.result
    return out


@pytest.mark.fast
def test_two_way_sequence_parallel_equals_one_process(models, tmp_path):
    from diffusers import SkyReelsV2Transformer3DModel

    rng = np.random.default_rng(0)
    text_dim = SkyReelsV2Transformer3DModel.load_config(models["t2v"] / "transformer")["text_dim"]
    df_dim = SkyReelsV2Transformer3DModel.load_config(models["df"] / "transformer")["text_dim"]
    inputs = {k: rng.standard_normal((1, 16, d)).astype(np.float32)
              for k, d in (("cond", text_dim), ("uncond", text_dim), ("df_cond", df_dim), ("df_uncond", df_dim))}
    np.savez(tmp_path / "inputs.npz", **inputs)

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.parallel_worker", str(rank), "2", str(port), str(tmp_path),
                               str(models["t2v"]), str(models["df"])], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)

    parallel = dict(np.load(tmp_path / "parallel.npz"))
    alone = single_process(models, inputs)
    # each rank's attention saw half of the tokens: T2V 48 -> 24; DF windows of 16, 16, 12 -> 8 and 6
    assert parallel["t2v_tokens_seen"].tolist() == [24] and parallel["df_tokens_seen"].tolist() == [6, 8]
    for name in ("t2v", "df"):
        assert parallel[name].shape == alone[name].shape
        np.testing.assert_allclose(parallel[name], alone[name], atol=1e-5, err_msg=name)


@pytest.mark.fast
def test_plan_and_checks():
    plan = ParallelConfig(ulysses=2, cfg=2)
    assert (plan.sequence_degree, plan.devices) == (2, 4)
    cp = skyreels_cp_plan(3)
    assert set(cp) == {"rope", "norm_out", "blocks.0", "blocks.1", "blocks.2"}
    assert set(cp["blocks.0"]) == {"hidden_states", "temb"} and set(cp["blocks.2"]) == {"temb"}
    # the one rule (serve.frames.parallel_refusal): 64x48 has 4 x 3 = 12 tokens per latent frame
    assert parallel_refusal(64, 48, 2) is None
    width, param = parallel_refusal(48, 48, 2)  # 3 x 3 = 9 tokens per latent frame
    assert param == "width" and "do not split evenly" in width
    assert parallel_refusal(64, 48, 2, causal_block_size=2)[1] == "causal_block_size"
    assert parallel_refusal(48, 48, 1, causal_block_size=2) is None  # one rank: nothing to split


# -- the Serve wiring: a Transformer replica over 4 ranks (2-way Ulysses x CFG parallel) ------------

PAR_APP = "parallel"
# T2V: 32x32 (4 DiT tokens per latent frame), 9 frames = 12 tokens; DF: 25 frames in 3 windows of 16, 16, 12
PAR_T2V = dict(prompt="a lighthouse at dusk", seed=11, width=32, height=32, num_frames=9, num_inference_steps=3,
               guidance_scale=6.0)
PAR_DF = dict(prompt="a long drive through hills", seed=12, width=32, height=32, num_frames=25, num_inference_steps=3,
              guidance_scale=6.0, base_num_frames=13, overlap_history=5, ar_step=0, causal_block_size=1, fps=8)


@pytest.fixture
def parallel_transformer(graph_app):
    """App "parallel": only the tiny model's Transformer, split ulysses 2 x cfg 2 (4 placement-group
    bundles: the replica and 3 ParallelWorker actors), deployed with its options from the plan."""
    from ray import serve

    from serve.app import bind_transformer, deployment_plan, parse_args, transformer_deployment_name
    from conftest import tiny_app_args

    args = parse_args(tiny_app_args(name=PAR_APP, model={"name": "cinevivid-tiny", "parallel": {"ulysses": 2, "cfg": 2}},
                                    deployments={"transformer": {"ray_actor_options": {"num_cpus": 0.1},
                                                                 "torch_threads": 1, "health_check_period_s": 1}}))
    plan = deployment_plan(args)
    name = transformer_deployment_name(args, args.model.name)
    assert plan[name]["placement_group_bundles"] == [{"CPU": 0.1}] * 4
    serve.run(bind_transformer(args, plan, args.model), name=PAR_APP, route_prefix=None)
    try:
        yield serve.get_deployment_handle(name, app_name=PAR_APP)
    finally:
        serve.delete(PAR_APP)


@pytest.mark.fast
async def test_a_replica_over_four_ranks_gives_the_one_replica_latents(parallel_transformer, stage_handle):
    import ray

    from serve.stages import TRANSFORMER
    from stage_calls import denoise as _denoise, prepare as _prepare

    one = stage_handle(TRANSFORMER.deployment)  # the session app's one-device replica of the same weights
    alone_of = {}
    for job_id, job in (("par-t2v", PAR_T2V), ("par-df", PAR_DF)):
        spec, embeds = await _prepare(stage_handle, job)
        assert spec.is_diffusion_forcing == (job is PAR_DF)
        split = await _denoise(parallel_transformer.options(stream=True).denoise.remote(embeds, spec, job_id))
        alone = await _denoise(one.options(stream=True).denoise.remote(embeds, spec, job_id))
        assert split.shape == alone.shape
        np.testing.assert_allclose(split, alone, atol=1e-5, err_msg=job_id)
        alone_of[job_id] = alone
        ranks = await parallel_transformer.parallel_stats.remote()
        # 4 ranks ran every forward: the cond row on ranks 0-1, the uncond row on ranks 2-3, each
        # rank's attention over half of the tokens of the last window (DF: 12 -> 6; T2V: 12 -> 6)
        assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
        assert [r["rows"] for r in ranks] == [1, 1, 1, 1] and {r["tokens"] for r in ranks} == {6}, ranks
        assert len({r["forwards"] for r in ranks}) == 1, ranks

    # four processes in the replica's placement group of four bundles, one rank each
    stats = await parallel_transformer.stats.remote()
    assert stats["parallel"] == {"ulysses": 2, "ring": 1, "cfg": 2, "devices": 4}
    assert len({r["pid"] for r in ranks}) == 4 and len({r["placement_group"] for r in ranks}) == 1
    group = ray.util.placement_group_table()[ranks[0]["placement_group"]]
    assert group["state"] == "CREATED" and group["strategy"] == "PACK"
    assert [b for _, b in sorted(group["bundles"].items())] == [{"CPU": 0.1}] * 4

    # a rank's process dies: the job in flight fails as stage_unavailable (the job service runs such a
    # job again), the replica reports itself unhealthy, and Serve replaces it: new processes, the same latents
    os.kill(ranks[3]["pid"], signal.SIGKILL)
    spec, embeds = await _prepare(stage_handle, PAR_T2V)
    with pytest.raises(Exception) as failed:
        await _denoise(parallel_transformer.options(stream=True).denoise.remote(embeds, spec, "par-broken"))
    assert unwrap_error(failed.value).code == "stage_unavailable", failed.value
    old_pids, deadline = {r["pid"] for r in ranks}, time.monotonic() + 240
    while True:
        with contextlib.suppress(Exception):  # the broken replica's stats fail until it is replaced
            again = await parallel_transformer.parallel_stats.remote()
            if len(again) == 4 and old_pids.isdisjoint(r["pid"] for r in again):
                break
        assert time.monotonic() < deadline, "the broken parallel replica was not replaced"
        await asyncio.sleep(1)
    split = await _denoise(parallel_transformer.options(stream=True).denoise.remote(embeds, spec, "par-again"))
    np.testing.assert_allclose(split, alone_of["par-t2v"], atol=1e-5)


def _parallel_app(parallel: dict, transformer: dict | None = None, **model) -> dict:
    return {"name": "p", "import_path": "serve.app:build_app", "args": {
        "model": {"name": "big", "width": 960, "height": 544, **model, "parallel": parallel},
        "deployments": {"transformer": {"ray_actor_options": {"num_gpus": 1, "num_cpus": 4}, "num_replicas": 1,
                                        **(transformer or {})},
                        "text_encoder": {"ray_actor_options": {"num_gpus": 0.5}},
                        "vae": {"ray_actor_options": {"num_gpus": 0.5}}}}}


@pytest.mark.fast
def test_the_plan_and_kuberay_count_every_device_a_replica_spans():
    from serve.ops.kuberay import worker_group_size
    from serve.ops.plan import PlanDoesNotFit, check_fits, format_plan, pack, plan_rows
    from serve.stages import TEXT_ENCODER, TRANSFORMER, VAE

    config = {"applications": [_parallel_app({"ulysses": 2, "cfg": 2}, {"num_replicas": 2})]}
    rows = {r.deployment: r for r in plan_rows(config)}
    split = rows[TRANSFORMER.deployment]
    assert (split.gpus, split.cpus, split.devices, split.min_gpus) == (4, 16, 4, 8)
    # two replicas of 4 whole GPUs each, then the two halves on a ninth GPU
    packing = pack(list(rows.values()), 9)
    assert packing[:8] == [[(TRANSFORMER.deployment, 1.0)]] * 8
    assert sorted(packing[8]) == sorted([(TEXT_ENCODER.deployment, 0.5), (VAE.deployment, 0.5)])
    with pytest.raises(PlanDoesNotFit, match="the minimum replicas ask 9 GPUs .*Transformer 4 x 2"):
        check_fits(list(rows.values()), {"GPU": 8})
    text = format_plan(list(rows.values()), {"GPU": 9})
    assert "devices" in text.splitlines()[0] and "total: GPUs 9..9" in text
    assert worker_group_size(config)["gpus"] == 9


@pytest.mark.fast
@pytest.mark.parametrize("parallel,transformer,model,refusal", [
    ({"ulysses": 2}, {"ray_actor_options": {"num_gpus": 0.5}}, {}, "num_gpus must be 1"),
    ({"ulysses": 7}, None, {}, "do not split evenly over the model's 7 sequence-parallel ranks"),
    ({"cfg": 2}, None, {"lora": {"adapters_dir": "embedded"}}, "LoRA adapters and parallel"),
])
def test_what_a_split_replica_cannot_run_is_refused_by_the_config(parallel, transformer, model, refusal):
    from serve.ops.plan import plan_rows

    with pytest.raises(Exception, match=refusal):
        plan_rows({"applications": [_parallel_app(parallel, transformer, **model)]})


@pytest.mark.fast
def test_the_step_cache_and_a_split_replica_exclude_each_other():
    from serve.config import AppArgs

    with pytest.raises(ValueError, match="step_cache_threshold > 0 and parallel"):
        AppArgs.model_validate({"model": {"parallel": {"ulysses": 2}}, "levers": {"step_cache_threshold": 0.1}})


@pytest.mark.fast
def test_a_request_the_split_cannot_run_is_a_400_naming_its_field():
    from serve.config import ModelConfig
    from serve.contracts import GenerationSpec
    from serve.errors import InvalidSpecError
    from serve.pipeline.spec import resolve_spec

    model = ModelConfig.model_validate({"parallel": {"ulysses": 2}})
    assert resolve_spec(GenerationSpec(prompt="a cat", width=32, height=32), model).width == 32
    with pytest.raises(InvalidSpecError) as e:  # 48x16: 3 x 1 tokens per latent frame
        resolve_spec(GenerationSpec(prompt="a cat", width=48, height=16), model)
    assert e.value.status == 400 and e.value.param == "width" and "3 DiT tokens per latent frame" in str(e.value)
    with pytest.raises(InvalidSpecError) as e:
        resolve_spec(GenerationSpec(prompt="a cat", num_frames=17, base_num_frames=9, overlap_history=5,
                                    causal_block_size=2), model)
    assert e.value.param == "causal_block_size"
