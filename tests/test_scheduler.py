"""The Transformer's scheduler (`serve.pipeline.scheduler.DenoiseScheduler`) without Serve or Ray,
with the object store and event delivery injected (a dict and a list) and the model work run
inline: admission order, lockstep vs step-level grouping, fairness between a DF job and short jobs,
cancels at a step boundary, live levers at a turn, and a model failure.

The engine, the UniPC schedulers and the DF windows run for real, over a fake transformer (a fixed
function of its inputs) so each test takes milliseconds; the last test runs the tiny model through
the scheduler and compares with the engine run alone (CPU fp32, within 1e-5)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from serve.config import LeversConfig
from serve.contracts import CANCELLED, DenoisedLatents, ProgressEvent, PromptEmbeds, ResolvedSpec
from serve.errors import GenerationCancelled, StageError
from serve.pipeline.denoise_step import job_tokens
from serve.pipeline.denoising import DenoiseJob, DenoiseLoop, LoopSettings
from serve.pipeline.diffusion_forcing import DiffusionForcingLoop
from serve.pipeline.levers import LiveLevers
from serve.pipeline.scheduler import DenoiseScheduler, JobDone, Ticket
from serve.pipeline.tiny_model import build_tiny_pipeline

CPU = torch.device("cpu")
SHIFT = 5.0
# UniPC's config as the tiny (and the real) SkyReels-V2 models ship it: flow matching
SCHEDULER_CONFIG = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": SHIFT,
                    "num_train_timesteps": 1000, "solver_order": 2, "predict_x0": True}


class FakeTransformer:
    """A stand-in for the DiT: the prediction of a row is a fixed function of its latents, its
    timestep and its text embeddings (so the cond and uncond rows differ), in microseconds."""

    def __init__(self, channels: int = 4):
        self.config = SimpleNamespace(in_channels=channels, out_channels=channels, num_frame_per_block=1)
        self.dtype = torch.float32

    def _set_ar_attention(self, causal_block_size: int) -> None:  # diffusion forcing sets it per job
        self.config.num_frame_per_block = causal_block_size

    def __call__(self, hidden_states, timestep, encoder_hidden_states, return_dict=False, **kwargs):
        t = timestep.float().reshape(timestep.shape[0], -1).mean(dim=1).view(-1, 1, 1, 1, 1) / 1000
        text = encoder_hidden_states.float().mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        return (0.5 * hidden_states + t + text,)


class FakePipe:
    transformer = FakeTransformer()
    scheduler = SimpleNamespace(config=SCHEDULER_CONFIG)


@pytest.fixture(scope="module")
def pipe():
    return FakePipe()


@pytest.fixture(scope="module")
def df_pipe():
    return FakePipe()


@pytest.fixture(scope="module")
def embeds() -> PromptEmbeds:
    rng = np.random.default_rng(0)
    return PromptEmbeds(prompt_embeds=rng.standard_normal((1, 8, 4), dtype=np.float32),
                        negative_prompt_embeds=rng.standard_normal((1, 8, 4), dtype=np.float32))


def spec(seed: int, steps: int = 2, guidance: float = 5.0, width: int = 16, height: int = 16, frames: int = 5,
         **df) -> ResolvedSpec:
    return ResolvedSpec(prompt="a red fox", negative_prompt="blurry", model="tiny", width=width, height=height,
                        num_frames=frames, fps=8, num_inference_steps=steps, guidance_scale=guidance,
                        flow_shift=SHIFT, seed=seed, **df)


def df_spec(seed: int) -> ResolvedSpec:
    """3 windows (29 frames in windows of 13, 5 overlapping) of 16x16, 2 iterations each."""
    return spec(seed, steps=2, guidance=5.0, frames=29, base_num_frames=13, overlap_history=5, ar_step=0,
                causal_block_size=1, addnoise_condition=20.0)


async def inline(fn, *args):
    return fn(*args)


class Harness:
    """A scheduler on the tiny model; `events` is every (job id, event) emitted, in order."""

    def __init__(self, pipe, embeds, fault: str | None = None, df_pipe=None, **levers):
        self.embeds = embeds
        self.loop = DenoiseLoop(pipe.transformer, dict(pipe.scheduler.config), CPU, fault=fault)
        df_pipe = df_pipe or pipe
        df_loop = DiffusionForcingLoop(df_pipe.transformer, dict(df_pipe.scheduler.config), CPU)
        self.live = LiveLevers("transformer", LeversConfig(**{"batch_wait_timeout_s": 0, **levers}),
                               apply=self.loop.configure_step_cache)
        self.store: dict[int, np.ndarray] = {}
        self.events: list[tuple[str, object]] = []
        self.hooks: list = []  # called with (ticket, event) on each emit
        self.sched = DenoiseScheduler(self.loop, df_loop, self.live, put=self.put, emit=self.emit,
                                      offload=inline, replica="r1")

    def put(self, array: np.ndarray) -> int:
        self.store[len(self.store)] = array
        return len(self.store) - 1

    def emit(self, ticket: Ticket, event) -> None:
        self.events.append((ticket.job_id, event))
        for hook in self.hooks:
            hook(ticket, event)

    def submit(self, job_id: str, s: ResolvedSpec) -> Ticket:
        ticket = Ticket(spec=s, embeds=self.embeds, job_id=job_id)
        self.sched.submit(ticket)
        return ticket

    def run(self) -> None:
        asyncio.run(self.sched.run_until_idle())

    def of(self, job_id: str) -> list:
        return [e for j, e in self.events if j == job_id]

    def order(self, kind) -> list[str]:
        """Job ids in the order they got their first event matching `kind`."""
        seen = []
        for j, e in self.events:
            if kind(e) and j not in seen:
                seen.append(j)
        return seen

    def result(self, job_id: str) -> np.ndarray:
        (done,) = [e for e in self.of(job_id) if isinstance(e, JobDone)]
        return self.store[done.ref]


def started(e) -> bool:
    return isinstance(e, ProgressEvent) and e.type == "stage" and e.stage_status == "started"


def done(e) -> bool:
    return isinstance(e, JobDone)


def solo(pipe, embeds, s: ResolvedSpec) -> np.ndarray:
    job = DenoiseJob(seed=s.seed, prompt_embeds=embeds.prompt_embeds,
                     negative_prompt_embeds=embeds.negative_prompt_embeds)
    DenoiseLoop(pipe.transformer, dict(pipe.scheduler.config), CPU).run([job], LoopSettings.from_spec(s))
    return job.result


@pytest.mark.fast
def test_request_batching_runs_jobs_of_one_schedule_in_lockstep(pipe, embeds):
    """Lockstep: the jobs of one shape AND schedule share a batch; a job of another step count waits."""
    h = Harness(pipe, embeds, batch_max_size=4)
    h.submit("a", spec(1, steps=2))
    h.submit("b", spec(2, steps=3))  # same shape, another schedule
    h.submit("c", spec(3, steps=2))
    h.run()
    assert h.sched.batches_run == [2, 1]
    assert h.order(started) == ["a", "c", "b"] and h.order(done) == ["a", "c", "b"]
    assert [e.step for e in h.of("b") if isinstance(e, ProgressEvent) and e.type == "step"] == [1, 2, 3]
    assert all(e.replica == "r1" for e in h.of("a") if started(e))
    assert np.abs(h.result("c") - solo(pipe, embeds, spec(3, steps=2))).max() <= 1e-5


@pytest.mark.fast
def test_step_level_batching_runs_jobs_of_one_shape_together_whatever_their_schedules(pipe, embeds):
    h = Harness(pipe, embeds, batch_max_size=4, continuous_batching=True)
    h.submit("a", spec(1, steps=2))
    h.submit("b", spec(2, steps=3))
    h.submit("c", spec(3, steps=2, guidance=1.0))
    h.run()
    stats = h.sched.stats()["continuous"]
    assert stats["max_active"] == 3 and stats["steps_run"] == 3 and stats["joined_mid_batch"] == 0
    assert h.order(done) == ["a", "c", "b"]  # each leaves when its own schedule ends
    assert np.abs(h.result("b") - solo(pipe, embeds, spec(2, steps=3))).max() <= 1e-5


@pytest.mark.fast
def test_a_job_joins_a_running_step_batch_at_the_next_step_boundary(pipe, embeds):
    h = Harness(pipe, embeds, batch_max_size=4, continuous_batching=True)

    async def scenario():
        h.submit("long", spec(1, steps=4))
        await h.sched.turn()  # its first step
        h.submit("joiner", spec(2, steps=2, guidance=1.0))
        await h.sched.run_until_idle()

    asyncio.run(scenario())
    stats = h.sched.stats()["continuous"]
    assert stats["joined_mid_batch"] == 1 and stats["max_active"] == 2 and stats["steps_run"] == 4
    assert h.order(done) == ["joiner", "long"]
    assert np.abs(h.result("long") - solo(pipe, embeds, spec(1, steps=4))).max() <= 1e-5


@pytest.mark.fast
def test_step_level_admission_is_first_come_first_served_across_shapes(pipe, embeds):
    """A job of another shape stops the admissions: the job after it waits, though it fits the batch."""
    h = Harness(pipe, embeds, batch_max_size=4, continuous_batching=True)
    h.submit("a", spec(1))
    h.submit("wide", spec(2, width=32))
    h.submit("c", spec(3))
    h.run()
    assert h.order(started) == ["a", "wide", "c"]
    ids = [j for j, e in h.events if started(e) or done(e)]
    assert ids.index("c") > ids.index("a", ids.index("a") + 1)  # c starts after a is done
    assert h.sched.stats()["continuous"]["max_active"] == 1


@pytest.mark.fast
def test_request_batching_takes_later_jobs_of_the_first_ones_key_ahead_of_another_shape(pipe, embeds):
    h = Harness(pipe, embeds, batch_max_size=4)
    h.submit("a", spec(1))
    h.submit("wide", spec(2, width=32))
    h.submit("c", spec(3))
    h.run()
    assert h.order(started) == ["a", "c", "wide"] and h.sched.batches_run == [2, 1]


@pytest.mark.fast
def test_the_token_budget_and_the_size_bound_split_a_batch(pipe, embeds):
    one = job_tokens(spec(1))
    h = Harness(pipe, embeds, batch_max_size=2, batch_token_budget=2 * one)
    for k in range(5):
        h.submit(f"j{k}", spec(k))
    h.run()
    assert h.sched.batches_run == [2, 2, 1]
    h = Harness(pipe, embeds, batch_max_size=4, batch_token_budget=one)
    for k in range(2):
        h.submit(f"j{k}", spec(k))
    h.run()
    assert h.sched.batches_run == [1, 1]


@pytest.mark.fast
@pytest.mark.parametrize("continuous", [False, True])
def test_a_short_job_runs_between_slices_of_a_df_job(pipe, df_pipe, embeds, continuous):
    """Fairness: a short job submitted while a long video runs finishes before it, between two of its
    windows, and the long video's windows still all come out."""
    h = Harness(pipe, embeds, df_pipe=df_pipe, continuous_batching=continuous)

    async def scenario():
        h.submit("long", df_spec(7))
        await h.sched.turn()  # the DF job starts and runs its first window
        h.submit("short", spec(1))
        await h.sched.run_until_idle()

    asyncio.run(scenario())
    windows = [e for e in h.of("long") if isinstance(e, DenoisedLatents)]
    assert len(windows) == 3 and [w.window for w in windows] == [0, 1, 2]
    ids = [j for j, e in h.events if done(e) or isinstance(e, DenoisedLatents)]
    windows_after_short = ids[ids.index("short"):].count("long") - 1  # (the last "long" is its JobDone)
    # request batching: the short job's whole batch runs between the 1st and 2nd windows; step-level
    # batching: one step of it between two windows (2 steps: done before the last window)
    assert windows_after_short == (1 if continuous else 2)
    assert h.order(done) == ["short", "long"]
    stats = h.sched.stats()
    assert stats["df_interleaved"] >= 1 and stats["df_slices_run"] == 3 and stats["running"] == 0


@pytest.mark.fast
@pytest.mark.parametrize("continuous", [False, True])
def test_a_cancel_takes_effect_at_the_next_step_boundary(pipe, embeds, continuous):
    h = Harness(pipe, embeds, batch_max_size=2, continuous_batching=continuous)
    a = h.submit("a", spec(1, steps=4))
    h.submit("b", spec(2, steps=4))

    def cancel_a_after_its_first_step(ticket, event):
        if ticket is a and isinstance(event, ProgressEvent) and event.type == "step" and event.step == 1:
            a.cancel()

    h.hooks.append(cancel_a_after_its_first_step)
    h.run()
    a_steps = [e.step for e in h.of("a") if isinstance(e, ProgressEvent) and e.type == "step"]
    assert a_steps == [1]  # dropped before its second step
    assert isinstance(h.of("a")[-1], GenerationCancelled) and not any(done(e) for e in h.of("a"))
    assert h.sched.cancellations[0] == {"job_id": "a", "steps_after_cancel": 0, "reason": CANCELLED}
    assert np.abs(h.result("b") - solo(pipe, embeds, spec(2, steps=4))).max() <= 1e-5


@pytest.mark.fast
def test_a_job_cancelled_while_it_waits_never_starts(pipe, embeds):
    h = Harness(pipe, embeds)
    h.submit("a", spec(1)).cancel()
    h.submit("b", spec(2))
    h.run()
    assert h.of("a") == [] and h.order(done) == ["b"]


@pytest.mark.fast
def test_a_df_job_cancelled_mid_window_stops_within_one_step(pipe, df_pipe, embeds):
    h = Harness(pipe, embeds, df_pipe=df_pipe, df_yield_every="step")
    long = h.submit("long", df_spec(7))
    h.hooks.append(lambda t, e: isinstance(e, ProgressEvent) and e.type == "step" and e.step == 3 and long.cancel())
    h.run()
    steps = [e.step for e in h.of("long") if isinstance(e, ProgressEvent) and e.type == "step"]
    assert steps[-1] <= 4 and isinstance(h.of("long")[-1], GenerationCancelled)
    assert h.sched.cancellations[0]["steps_after_cancel"] <= 1


@pytest.mark.fast
def test_levers_received_between_turns_apply_at_the_next_one(pipe, embeds):
    h = Harness(pipe, embeds, batch_max_size=4)

    async def scenario():
        h.live.receive({"continuous_batching": True})
        assert h.live.pending and not h.sched.levers.continuous_batching
        h.submit("a", spec(1, steps=2))
        h.submit("b", spec(2, steps=3))  # another schedule: only step-level batching runs them together
        await h.sched.run_until_idle()

    asyncio.run(scenario())
    assert not h.live.pending and h.sched.levers.continuous_batching
    assert h.sched.stats()["continuous"]["max_active"] == 2 and h.sched.batches_run == []


@pytest.mark.fast
def test_a_model_failure_fails_the_jobs_of_its_batch_and_the_scheduler_goes_on(pipe, embeds):
    h = Harness(pipe, embeds, fault="error", batch_max_size=2)
    h.submit("a", spec(1))
    h.submit("b", spec(2))
    h.run()
    for job_id in ("a", "b"):
        error = h.of(job_id)[-1]
        assert isinstance(error, StageError) and "denoising failed" in str(error)
    h.loop.forward.fault = None
    h.submit("c", spec(3))
    h.run()
    assert h.order(done) == ["c"]


def test_jobs_run_through_the_scheduler_on_the_tiny_model_equal_the_engine_run_alone():
    """The real transformer through the scheduler: a step batch of two schedules, and a lockstep batch."""
    tiny = build_tiny_pipeline(seed=0)
    with torch.no_grad():
        cond, negative = tiny.encode_prompt("a red fox", "blurry", do_classifier_free_guidance=True,
                                            max_sequence_length=512, device=CPU)
    real = PromptEmbeds(prompt_embeds=cond.numpy(), negative_prompt_embeds=negative.numpy())
    for continuous in (True, False):
        h = Harness(tiny, real, batch_max_size=2, continuous_batching=continuous)
        h.submit("a", spec(1, steps=2))
        h.submit("b", spec(2, steps=3 if continuous else 2))
        h.run()
        assert h.order(done) == ["a", "b"]
        for job_id, s in (("a", spec(1, steps=2)), ("b", spec(2, steps=3 if continuous else 2))):
            assert np.abs(h.result(job_id) - solo(tiny, real, s)).max() <= 1e-5
