"""What a player sees in an MP4 (PyAV): streams with codec, size, frames, rate and duration; and
the decoded RGB frames. Test-only helpers."""

from __future__ import annotations

import io

import av
import numpy as np


def probe_mp4(data: bytes) -> dict:
    """Streams with codec, size, frames, rate and duration."""
    out: dict = {"video": [], "audio": []}
    with av.open(io.BytesIO(data)) as container:
        for stream in container.streams:
            if stream.type == "video":
                n = sum(1 for _ in container.decode(stream))
                out["video"].append({
                    "codec": stream.codec_context.name, "width": stream.codec_context.width,
                    "height": stream.codec_context.height, "frames": n,
                    "fps": float(stream.average_rate) if stream.average_rate else None,
                    "duration_s": float(stream.duration * stream.time_base) if stream.duration else None,
                })
                container.seek(0)
            elif stream.type == "audio":
                samples = 0
                for frame in container.decode(stream):
                    samples += frame.samples
                container.seek(0)
                out["audio"].append({
                    "codec": stream.codec_context.name, "sample_rate": stream.codec_context.sample_rate,
                    "samples": samples, "duration_s": samples / stream.codec_context.sample_rate,
                })
    return out


def decode_rgb_frames(data: bytes) -> np.ndarray:
    """Every video frame of an MP4, decoded to RGB uint8 (F, H, W, 3), in presentation order."""
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack(frames)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 (or [0, 255] float) arrays."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
