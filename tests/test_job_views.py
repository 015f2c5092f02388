"""What GET /v1/videos/{id} shows of a job record (serve.jobs.views), for a long video: its mode
and its windows once it has completed; and the window count the view uses is the one the
diffusion-forcing loop runs."""

from __future__ import annotations

import json

import pytest

from serve.frames import df_window_count
from serve.jobs.views import video_view
from serve.pipeline.diffusion_forcing import plan_windows

pytestmark = pytest.mark.fast


CASES = [(base, overlap, frames, mode) for base in (5, 9, 17, 33) for overlap in (1, 5, 9)
         for frames in (5, 9, 17, 33, 57, 97, 113) for mode in ("t2v", "v2v")
         if overlap < base and not (mode == "v2v" and frames <= overlap)]


@pytest.mark.parametrize("base, overlap, frames, mode", CASES)
def test_window_count_is_the_loops(base, overlap, frames, mode):
    assert df_window_count(frames, base, overlap, extend=mode == "v2v") == \
        plan_windows(frames, base, overlap, mode=mode).num_windows


def _job(status: str, **spec) -> dict:
    spec = {"width": 64, "height": 64, "num_frames": 33, "fps": 8, "seed": 1, "num_inference_steps": 2,
            "mode": "text-to-video", **spec}
    return {"id": "video_1", "created_at": 0, "status": status, "model": "tiny-df", "progress": 100,
            "prompt": "x", "completed_at": 1 if status == "completed" else None, "error_code": None,
            "error_message": None, "error_param": None, "remixed_from": None, "stage": None, "has_audio": 0,
            "duration_s": None, "spec": json.dumps(spec)}


def test_a_completed_long_video_shows_its_windows_and_mode():
    df = {"base_num_frames": 17, "overlap_history": 5}
    done = video_view(_job("completed", **df))
    assert done["mode"] == "long-video"
    assert done["windows_done"] == done["windows_total"] == plan_windows(33, 17, 5).num_windows == 3
    assert done["playable_seconds"] == pytest.approx(33 / 8)
    queued = video_view(_job("queued", **df))  # no preview yet: no window counts, the mode already
    assert queued["mode"] == "long-video" and queued["windows_done"] is None
    running = video_view(_job("in_progress", **df), {"windows_done": 1, "windows_total": 3, "playable_s": 2.1})
    assert (running["windows_done"], running["windows_total"], running["playable_seconds"]) == (1, 3, 2.1)


def test_a_plain_video_has_no_windows():
    v = video_view(_job("completed"))
    assert v["mode"] == "text-to-video" and v["windows_done"] is None and v["playable_seconds"] is None
