"""Step-level continuous batching (`serve.pipeline.continuous.ContinuousBatch`) on the tiny model, in
process: jobs with their own seeds, steps, guidance and shift, joining mid-way or cancelled mid-batch,
end with the latents of their solo `DenoiseLoop.run([job])` (CPU fp32, max |d| <= 1e-5)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from serve.pipeline.continuous import ContinuousBatch, job_tokens, shape_key
from serve.pipeline.denoising import DenoiseJob, DenoiseLoop, LoopSettings, clone_scheduler_config
from serve.pipeline.step_cache import StepCache
from serve.pipeline.text_encoding import encode_prompts
from serve.pipeline.tiny_model import build_tiny_pipeline

W, H, F = 64, 64, 9
CPU = torch.device("cpu")
TOL = 1e-5
PROMPTS = ["a cat walks on the grass", "a paper boat on a river", "a kite over a field"]


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(0)


@pytest.fixture(scope="module")
def embeds(pipe):
    cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, PROMPTS, 512, CPU)
    uncond = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["low quality"], 512, CPU)
    return [cond[k:k + 1] for k in range(len(PROMPTS))], uncond


def loop_of(pipe, **kw) -> DenoiseLoop:
    return DenoiseLoop(pipe.transformer, clone_scheduler_config(pipe.scheduler), CPU, **kw)


def settings(steps, guidance, shift=8.0, width=W, height=H, frames=F) -> LoopSettings:
    return LoopSettings(width=width, height=height, num_frames=frames, num_inference_steps=steps,
                        guidance_scale=guidance, flow_shift=shift)


def make_job(embeds, prompt: int, seed: int, guidance: float, log: list | None = None, **kw) -> DenoiseJob:
    conds, uncond = embeds
    on_step = (lambda i, total: log.append((i, total))) if log is not None else (lambda i, total: None)
    return DenoiseJob(seed=seed, prompt_embeds=conds[prompt], negative_prompt_embeds=uncond if guidance > 1 else None,
                      on_step=on_step, **kw)


def solo(pipe, job: DenoiseJob, s: LoopSettings) -> np.ndarray:
    alone = DenoiseJob(seed=job.seed, prompt_embeds=job.prompt_embeds,
                       negative_prompt_embeds=job.negative_prompt_embeds, image_embeds=job.image_embeds,
                       condition=job.condition)
    loop_of(pipe).run([alone], s)
    return alone.result


def run_to_end(batch: ContinuousBatch) -> list[list[DenoiseJob]]:
    """step() until the batch is empty; the jobs that left at each step."""
    out = []
    while not batch.empty:
        out.append(batch.step())
        assert len(out) < 50
    return out


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got is not None and got.shape == want.shape and got.dtype == np.float32
    diff = float(np.abs(got - want).max())
    assert diff <= TOL, diff


# -- exactness -----------------------------------------------------------------------------------

@pytest.mark.fast
@pytest.mark.parametrize("cfg_batch", [False, True])
def test_two_jobs_with_their_own_schedules_equal_their_solo_runs(pipe, embeds, cfg_batch):
    log_a, log_b = [], []
    a, sa = make_job(embeds, 0, seed=1, guidance=1.0, log=log_a), settings(4, 1.0, shift=8.0)
    b, sb = make_job(embeds, 1, seed=2, guidance=5.0, log=log_b), settings(6, 5.0, shift=3.0)
    loop = loop_of(pipe)
    batch = ContinuousBatch(loop, token_budget=10**6, max_size=4, cfg_batch=cfg_batch)
    batch.join(a, sa)
    batch.join(b, sb)
    assert batch.active == [a, b] and batch.tokens == job_tokens(sa) + job_tokens(sb)
    left = run_to_end(batch)
    assert [len(x) for x in left] == [0, 0, 0, 1, 0, 1]
    assert left[3] == [a] and left[5] == [b]
    assert log_a == [(i, 4) for i in range(1, 5)] and log_b == [(i, 6) for i in range(1, 7)]
    assert loop.steps_run == 6 and batch.steps_run == 6
    # rows: steps 1-4 a + 2 b, steps 5-6 2 b
    assert batch.rows_run == 4 * 3 + 2 * 2
    assert not a.cancelled and not b.cancelled
    assert_close(a.result, solo(pipe, a, sa))
    assert_close(b.result, solo(pipe, b, sb))


def test_a_job_joining_mid_way_equals_its_solo_run(pipe, embeds):
    a, sa = make_job(embeds, 0, seed=3, guidance=5.0), settings(5, 5.0, shift=8.0)
    b, sb = make_job(embeds, 2, seed=4, guidance=1.0), settings(3, 1.0, shift=5.0)
    batch = ContinuousBatch(loop_of(pipe), token_budget=10**6, max_size=4)
    batch.join(a, sa)
    assert batch.step() == [] and batch.step() == []  # a has done 2 steps
    assert batch.can_join(b, sb)
    batch.join(b, sb)
    left = run_to_end(batch)  # a: steps 3, 4, 5; b: 1, 2, 3 - both end at the third step
    assert left == [[], [], [a, b]]
    assert_close(a.result, solo(pipe, a, sa))
    assert_close(b.result, solo(pipe, b, sb))


def test_a_job_cancelled_mid_batch_leaves_at_the_next_boundary(pipe, embeds):
    flag = {"b": False}
    log_b = []
    a, sa = make_job(embeds, 0, seed=5, guidance=5.0), settings(4, 5.0)
    b = make_job(embeds, 1, seed=6, guidance=5.0, log=log_b, is_cancelled=lambda: flag["b"])
    loop = loop_of(pipe)
    batch = ContinuousBatch(loop, token_budget=10**6, max_size=4)
    batch.join(a, sa)
    batch.join(b, settings(4, 5.0))
    assert batch.step() == [] and batch.step() == []
    flag["b"] = True  # cancelled while a step is in flight / between steps
    assert batch.step() == [b]  # dropped before the step runs: no third step for b
    assert b.cancelled and b.result is None and log_b == [(1, 4), (2, 4)]
    assert batch.active == [a]
    assert run_to_end(batch) == [[a]]
    assert loop.steps_run == 4
    assert_close(a.result, solo(pipe, a, sa))


def test_every_job_cancelled_empties_the_batch_without_running_the_model(pipe, embeds):
    a = make_job(embeds, 0, seed=7, guidance=1.0, is_cancelled=lambda: True)
    loop = loop_of(pipe)
    batch = ContinuousBatch(loop, token_budget=10**6, max_size=4)
    batch.join(a, settings(3, 1.0))
    assert batch.step() == [a] and a.cancelled and batch.empty and batch.key is None
    assert loop.steps_run == 0


def test_batched_forward_rows_equal_unbatched_forwards(pipe, embeds):
    """The premise: one transformer call over rows at different timesteps gives each row what a
    call of its own gives, to within fp32 matmul rounding on CPU."""
    conds, uncond = embeds
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn((3, 16, 3, H // 8, W // 8), generator=gen)
    timestep = torch.tensor([999, 640, 31])
    text = torch.from_numpy(np.concatenate([conds[0], conds[1], uncond]))
    with torch.no_grad():
        both = pipe.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=text,
                                return_dict=False)[0]
        rows = [pipe.transformer(hidden_states=latents[k:k + 1], timestep=timestep[k:k + 1],
                                 encoder_hidden_states=text[k:k + 1], return_dict=False)[0] for k in range(3)]
    diff = float((both - torch.cat(rows)).abs().max())
    print(f"batched vs unbatched forward: max |d| = {diff:.3g}")
    assert diff <= TOL
    # and the timestep is per row: the same latents at another timestep give another output
    assert float((rows[0] - rows[1]).abs().max()) > 1e-3


def test_the_step_cache_is_not_used(pipe, embeds):
    """Continuous batching and the step cache are exclusive: the engine calls the plain transformer
    even on a loop that has a (here very lossy) cache."""
    a, sa = make_job(embeds, 0, seed=8, guidance=5.0), settings(4, 5.0)
    cache = StepCache(threshold=10.0, warmup_steps=0)
    batch = ContinuousBatch(loop_of(pipe, step_cache=cache), token_budget=10**6, max_size=2)
    batch.join(a, sa)
    run_to_end(batch)
    assert_close(a.result, solo(pipe, a, sa))


@pytest.mark.parametrize("fault", ["error", "oom"])
def test_a_fault_is_raised_from_the_model_call_and_abort_empties_the_batch(pipe, embeds, fault):
    a = make_job(embeds, 0, seed=9, guidance=1.0)
    loop = loop_of(pipe, fault=fault)
    batch = ContinuousBatch(loop, token_budget=10**6, max_size=2)
    batch.join(a, settings(3, 1.0))
    with pytest.raises(torch.OutOfMemoryError if fault == "oom" else RuntimeError, match="injected"):
        batch.step()
    assert batch.active == [a] and a.result is None and loop.steps_run == 0
    assert batch.abort() == [a] and batch.empty


# -- joining -------------------------------------------------------------------------------------

def test_can_join_refuses_another_shape_and_respects_the_budget_and_size(pipe, embeds):
    s = settings(4, 5.0)
    one = job_tokens(s)
    assert one == 2 * 3 * (H // 16) * (W // 16)  # x2 with guidance: 3 latent frames of 4x4 patches
    batch = ContinuousBatch(loop_of(pipe), token_budget=2 * one, max_size=3)
    big = make_job(embeds, 0, seed=1, guidance=5.0)
    # an empty batch takes any one job, even over the budget
    assert ContinuousBatch(loop_of(pipe), token_budget=1, max_size=1).can_join(big, s)
    batch.join(big, s)
    assert batch.key == shape_key(big, s)
    # a different shape: size, frames, prompt length, I2V-ness
    other = make_job(embeds, 1, seed=2, guidance=5.0)
    assert not batch.can_join(other, settings(4, 5.0, width=96))
    assert not batch.can_join(other, settings(4, 5.0, frames=13))
    short = DenoiseJob(seed=2, prompt_embeds=embeds[0][1][:, :256], negative_prompt_embeds=embeds[1][:, :256])
    assert "shape" in batch.refusal(short, s)
    fake_i2v = DenoiseJob(seed=2, prompt_embeds=embeds[0][1], negative_prompt_embeds=embeds[1],
                          image_embeds=np.zeros((1, 17, 32), np.float32),
                          condition=np.zeros((1, 20, 3, H // 8, W // 8), np.float32))
    assert not batch.can_join(fake_i2v, s)
    with pytest.raises(ValueError, match="shape"):
        batch.join(other, settings(4, 5.0, width=96))
    # steps, guidance and shift may differ; the budget counts x2 for guidance
    assert batch.can_join(other, settings(9, 5.0, shift=2.0))
    batch.join(other, settings(9, 5.0, shift=2.0))  # 2 x one: the budget is full
    no_cfg = make_job(embeds, 2, seed=3, guidance=1.0)
    assert "token budget" in batch.refusal(no_cfg, settings(4, 1.0))
    roomy = ContinuousBatch(loop_of(pipe), token_budget=10**6, max_size=2)
    roomy.join(big, s)
    roomy.join(other, s)
    assert "full" in roomy.refusal(no_cfg, settings(4, 1.0))
    # once empty, the batch takes any shape
    assert roomy.abort() == [big, other] and roomy.key is None
    assert roomy.can_join(other, settings(4, 5.0, width=96))


def test_a_job_with_guidance_needs_negative_embeddings(pipe, embeds):
    batch = ContinuousBatch(loop_of(pipe), token_budget=10**6, max_size=2)
    job = DenoiseJob(seed=1, prompt_embeds=embeds[0][0], negative_prompt_embeds=None)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        batch.join(job, settings(3, 5.0))
    assert batch.empty


# -- image-to-video ------------------------------------------------------------------------------

IW, IH = 48, 32


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (IH // 8, IW // 8, 3), dtype=np.uint8)
    return np.asarray(PIL.Image.fromarray(small).resize((IW, IH), PIL.Image.BILINEAR))


def test_image_to_video_jobs_equal_their_solo_runs():
    from serve.pipeline.image_conditioning import clip_image_embeds, i2v_condition

    i2v = build_tiny_pipeline(seed=0, variant="i2v")
    with torch.no_grad():
        cond, uncond = i2v.encode_prompt(PROMPTS[0], "low quality", do_classifier_free_guidance=True,
                                         max_sequence_length=512, device=CPU)
    cond, uncond = cond.numpy(), uncond.numpy()

    def job(image_seed, seed, guidance):
        image = _image(image_seed)
        return DenoiseJob(seed=seed, prompt_embeds=cond, negative_prompt_embeds=uncond if guidance > 1 else None,
                          image_embeds=clip_image_embeds(i2v.image_encoder, i2v.image_processor, image),
                          condition=i2v_condition(i2v.vae, image, F, IH, IW))

    def st(steps, guidance, shift):
        return settings(steps, guidance, shift=shift, width=IW, height=IH)

    a, sa = job(1, seed=11, guidance=5.0), st(3, 5.0, 8.0)
    b, sb = job(2, seed=12, guidance=1.0), st(2, 1.0, 5.0)
    batch = ContinuousBatch(loop_of(i2v), token_budget=10**6, max_size=4)
    batch.join(a, sa)
    assert batch.step() == []
    assert batch.can_join(b, sb)
    t2v_job = DenoiseJob(seed=1, prompt_embeds=cond, negative_prompt_embeds=None)
    assert not batch.can_join(t2v_job, st(2, 1.0, 5.0))
    batch.join(b, sb)
    assert run_to_end(batch) == [[], [a, b]]
    assert_close(a.result, solo(i2v, a, sa))
    assert_close(b.result, solo(i2v, b, sb))
