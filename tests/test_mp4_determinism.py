"""Same frames, same MP4 bytes, whatever the process's heap held before: the encoder is a pure
function of its input. x264's MB-tree rate control (on by default) reads memory it never wrote, so
with it the same frames encoded to different videos from one process to the next, and a retried job
(or any rerun with the same seed) gave a video that differed from the first run's. glibc's
MALLOC_PERTURB_ fills fresh and freed heap memory with a chosen byte: each subprocess below starts
with different garbage, and every one must write the same bytes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.fast

SCRIPT = r"""
import hashlib
import numpy as np
from serve.media.mp4 import Mp4Writer, encode_mp4
from serve.media.fmp4 import FragmentedPreview

rng = np.random.default_rng(1)
base = rng.integers(0, 255, (6, 8, 3)).astype(np.uint8).repeat(8, 0).repeat(8, 1)
frames = np.stack([np.roll(base, 2 * k, axis=1) for k in range(17)])  # 17 frames of 64x48, moving
audio = (0.3 * np.sin(np.arange(2 * 22050) / 22050 * 2 * np.pi * 220)).astype(np.float32)
whole = encode_mp4(frames, 8, audio, 22050)
writer = Mp4Writer(64, 48, 8, 22050)  # as the Generator writes it: chunk by chunk as the VAE decodes
for chunk in (frames[:1], frames[1:5], frames[5:9], frames[9:]):
    writer.add(chunk)
chunked = writer.finish(audio)
preview = FragmentedPreview(64, 48, 8, audio=audio, audio_rate=22050, total_frames=17)
preview.add(frames[:9], True)
fragments = preview.cut()
preview.add(frames[9:], True)
fragments += preview.cut()
print(hashlib.sha256(whole).hexdigest(), hashlib.sha256(chunked).hexdigest(),
      hashlib.sha256(fragments).hexdigest())
"""


def _digests(perturb: int) -> list[str]:
    env = {**os.environ, "MALLOC_PERTURB_": str(perturb)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    return out.stdout.split()


def test_the_same_frames_encode_to_the_same_bytes_whatever_the_heap_held():
    runs = {perturb: _digests(perturb) for perturb in (0, 1, 85, 170, 255)}
    whole, chunked, fragments = zip(*runs.values())
    assert len(set(whole)) == 1, runs  # the final MP4
    assert whole == chunked  # chunk by chunk as the VAE streams = all at once
    assert len(set(fragments)) == 1, runs  # a long video's progressive preview
