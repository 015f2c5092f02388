"""The shared denoising step (`serve.pipeline.denoise_step`): the guider's calls and per-row mix,
one `job_tokens` for both batchings, and `cfg_batch` honoured by diffusion forcing too (its
latents equal those of the two-call step, CPU fp32, within 1e-5)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from serve.pipeline.denoise_step import ClassifierFreeGuidance, ModelInput, job_tokens


class FakeForward:
    """A transformer stand-in: the prediction of a row is its latents + its embeddings' mean."""

    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    def __call__(self, inp: ModelInput, embeds: torch.Tensor, branch: str, use_step_cache: bool = True):
        self.calls.append((branch, inp.rows))
        return inp.latents + embeds.mean(dim=(1, 2)).view(-1, 1)


def inputs(n: int) -> tuple[ModelInput, torch.Tensor, torch.Tensor]:
    latents = torch.arange(n, dtype=torch.float32).view(n, 1) * 10
    cond = torch.ones(n, 2, 3)
    return ModelInput(latents=latents, timestep=torch.zeros(n)), cond, -torch.ones(n, 2, 3)


@pytest.mark.fast
@pytest.mark.parametrize("batch", [False, True])
def test_guider_mixes_each_row_with_its_own_scale_and_skips_unguided_rows(batch):
    inp, cond, negative = inputs(3)
    scales = [5.0, 1.0, 2.0]  # the middle row has no unconditional call
    forward = FakeForward()
    pred = ClassifierFreeGuidance(batch_cond_uncond=batch)(forward, inp, cond, negative[[0, 2]], scales)
    assert forward.calls == ([("cfg", 5)] if batch else [("cond", 3), ("uncond", 2)])
    c, u = inp.latents + 1, inp.latents - 1
    expected = torch.stack([u[0] + 5.0 * (c[0] - u[0]), c[1], u[2] + 2.0 * (c[2] - u[2])])
    assert torch.equal(pred, expected)


@pytest.mark.fast
def test_guider_without_guidance_makes_one_conditional_call():
    inp, cond, _ = inputs(2)
    forward = FakeForward()
    pred = ClassifierFreeGuidance(batch_cond_uncond=True)(forward, inp, cond, None, [1.0, 1.0])
    assert forward.calls == [("cond", 2)] and torch.equal(pred, inp.latents + 1)


@pytest.mark.fast
def test_one_job_tokens_for_both_batchings():
    import deployments.transformer as transformer_deployment
    import serve.pipeline.continuous as continuous

    assert transformer_deployment.job_tokens is continuous.job_tokens
    spec = SimpleNamespace(num_frames=9, height=32, width=32, guidance_scale=5.0)
    assert job_tokens(spec) == 2 * job_tokens(SimpleNamespace(**{**vars(spec), "guidance_scale": 1.0}))


@pytest.mark.fast
def test_diffusion_forcing_honours_cfg_batch():
    from serve.pipeline.diffusion_forcing import DFJob, DFSettings, DiffusionForcingLoop
    from serve.pipeline.tiny_model import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0, variant="df")
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt("a red fox", "blurry", do_classifier_free_guidance=True,
                                              max_sequence_length=512, device=torch.device("cpu"))
    calls = []
    results = {}
    for batch in (False, True):
        loop = DiffusionForcingLoop(pipe.transformer, dict(pipe.scheduler.config), torch.device("cpu"))
        real = loop.forward.transformer

        def counting(*args, **kwargs):
            calls.append((batch, kwargs["hidden_states"].shape[0]))
            return real(*args, **kwargs)

        loop.forward.transformer = counting
        job = DFJob(seed=7, prompt_embeds=embeds.numpy(), negative_prompt_embeds=negative.numpy())
        loop.run(job, DFSettings(width=32, height=32, num_frames=29, num_inference_steps=3, guidance_scale=6.0,
                                 flow_shift=pipe.scheduler.config.flow_shift, fps=24, base_num_frames=13,
                                 overlap_history=5, ar_step=2, causal_block_size=2, addnoise_condition=20.0,
                                 cfg_batch=batch))
        results[batch] = job.result
    two_calls = [rows for b, rows in calls if not b]
    one_call = [rows for b, rows in calls if b]
    assert set(two_calls) == {1} and set(one_call) == {2} and len(two_calls) == 2 * len(one_call)
    assert np.abs(results[True] - results[False]).max() <= 1e-5
