"""The fragmented-MP4 preview (no Ray): each cut appends whole fragments, so the bytes so far are
always a valid MP4 of the frames so far, and with a voice-over each carries the audio fitted to the
whole video up to its playable point."""

from __future__ import annotations

import numpy as np
import pytest

from serve.media.fmp4 import FragmentedPreview
from tests.media_probe import decode_rgb_frames, probe_mp4

pytestmark = pytest.mark.fast  # the fast tier (make test)


def test_preview_grows_by_whole_fragments_with_the_audio_so_far():
    rng = np.random.default_rng(0)
    rate, fps, windows = 22050, 8, [9, 8, 8]
    speech = rng.uniform(-0.3, 0.3, rate * 4).astype(np.float32)  # longer than the video: cut to its length
    preview = FragmentedPreview(32, 32, fps, audio=speech, audio_rate=rate, total_frames=sum(windows))
    data, frames = b"", 0
    try:
        for n in windows:
            preview.add(rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8), keyframe=True)
            new = preview.cut()
            assert data == b"" or new[4:8] == b"moof"  # appended fragments only; the first has the init segment
            data += new
            frames += n
            info = probe_mp4(data)
            assert info["video"][0]["frames"] == len(decode_rgb_frames(data)) == frames
            assert preview.playable_s == frames / fps
            audio_s = info["audio"][0]["duration_s"]
            assert frames / fps <= audio_s < frames / fps + 2 * 1024 / rate  # up to the playable point (whole AAC frames)
    finally:
        preview.close()
    assert data[4:8] == b"ftyp"
