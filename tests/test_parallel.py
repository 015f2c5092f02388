"""One job across several devices (serve.pipeline.parallel): the tiny model's DiT split 2-way over a
gloo group of two processes with diffusers' own context parallelism (Ulysses, `enable_parallelism`,
the SkyReels-V2 plan) gives the latents of the single-process run (fp32 CPU, <= 1e-5) for a T2V job
and for a 3-window diffusion-forcing job; the plan's checks refuse what the split cannot run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from serve.config import Settings
from serve.errors import ConfigError
from serve.pipeline.parallel import ParallelPlan, check_parallel_job, skyreels_cp_plan

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
    plan = ParallelPlan(ulysses=2, cfg=2)
    assert (plan.sequence_degree, plan.devices) == (2, 4)
    cp = skyreels_cp_plan(3)
    assert set(cp) == {"rope", "norm_out", "blocks.0", "blocks.1", "blocks.2"}
    assert set(cp["blocks.0"]) == {"hidden_states", "temb"} and set(cp["blocks.2"]) == {"temb"}
    check_parallel_job(48, ParallelPlan(ulysses=2))
    with pytest.raises(ConfigError, match="do not split evenly"):
        check_parallel_job(45, ParallelPlan(ulysses=2))
    with pytest.raises(ConfigError, match="causal_block_size"):
        check_parallel_job(48, ParallelPlan(ulysses=2), causal_block_size=2)
