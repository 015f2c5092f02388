"""Reading back a video to extend (already checked by `serve.media.inputs` when the job was made):
its frames in chunks, to re-encode ahead of the new segment without holding the whole video, and
its sound, resampled to the voice-over's rate, so that an extension keeps it."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import av
import numpy as np

from serve.errors import InvalidSpecError


def _open(source: bytes | str | Path):
    return av.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source))


def iter_video_frames(source: bytes | str | Path, field: str = "video", chunk: int = 16) -> Iterator[np.ndarray]:
    """uint8 RGB frames (n, H, W, 3), `chunk` at a time, in display order."""
    try:
        with _open(source) as container:
            stream = container.streams.video[0]
            batch: list[np.ndarray] = []
            for frame in container.decode(stream):
                batch.append(frame.to_ndarray(format="rgb24"))
                if len(batch) == chunk:
                    yield np.stack(batch)
                    batch = []
            if batch:
                yield np.stack(batch)
    except (av.FFmpegError, IndexError) as exc:
        raise InvalidSpecError(f"{field} could not be decoded again: {exc}", param=field) from None


def decode_audio_track(source: bytes | str | Path, sample_rate: int) -> np.ndarray | None:
    """The first audio track as float32 mono PCM at `sample_rate`, or None when there is none."""
    with _open(source) as container:
        if not container.streams.audio:
            return None
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        parts = []
        for frame in container.decode(container.streams.audio[0]):
            for out in resampler.resample(frame):
                parts.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            parts.append(out.to_ndarray().reshape(-1))
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def fit_samples(pcm: np.ndarray | None, n: int) -> np.ndarray:
    """Exactly `n` samples: cut, or padded with silence (None: silence)."""
    pcm = np.zeros(0, np.float32) if pcm is None else np.asarray(pcm, np.float32).reshape(-1)
    return pcm[:n] if len(pcm) >= n else np.concatenate([pcm, np.zeros(n - len(pcm), np.float32)])
