"""MP4 (H.264 + optional AAC) and JPEG thumbnail encoding with PyAV/Pillow, all in memory."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
from PIL import Image

from serve.audio import fade_out, target_samples


def encode_mp4(frames: np.ndarray, fps: int, audio: np.ndarray | None = None, sample_rate: int = 22050,
               crf: int = 18) -> bytes:
    """frames: uint8 (F, H, W, 3). audio: float32 mono in [-1, 1], fitted to the video (see
    `serve.audio.fit_audio`); its length is snapped here to whole AAC frames nearest the video's
    duration, so the audio track a player decodes ends within one video frame of the picture."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        vstream = container.add_stream("libx264", rate=fps)
        vstream.width = frames.shape[2]
        vstream.height = frames.shape[1]
        vstream.pix_fmt = "yuv420p"
        vstream.options = {"crf": str(crf), "preset": "veryfast"}
        astream = None
        if audio is not None:
            astream = container.add_stream("aac", rate=sample_rate)
            astream.layout = "mono"
        for frame in frames:
            for packet in vstream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in vstream.encode():
            container.mux(packet)
        if astream is not None:
            _encode_audio(container, astream, align_audio(audio, len(frames) / fps, sample_rate), sample_rate)
    return buf.getvalue()


def align_audio(audio: np.ndarray, duration_s: float, sample_rate: int) -> np.ndarray:
    """Pad with silence or cut (with a 10 ms fade) to the whole number of AAC frames nearest
    `duration_s`. AAC decodes in 1024-sample frames (the encoder's priming frame is removed by
    the MP4 edit list), so an aligned track decodes to exactly its length."""
    pcm = np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0)
    n = target_samples(duration_s, sample_rate)
    if len(pcm) > n:
        return fade_out(pcm[:n], int(0.01 * sample_rate))
    if len(pcm) < n:
        return np.concatenate([pcm, np.zeros(n - len(pcm), dtype=np.float32)])
    return pcm


def _encode_audio(container, stream, audio: np.ndarray, sample_rate: int) -> None:
    pcm = np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0)
    chunk = 1024
    pts = 0
    for start in range(0, len(pcm), chunk):
        piece = pcm[start:start + chunk].reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(piece, format="flt", layout="mono")
        frame.sample_rate = sample_rate
        frame.pts = pts
        frame.time_base = Fraction(1, sample_rate)
        pts += piece.shape[1]
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def thumbnail_jpeg(frames: np.ndarray, max_side: int = 512, quality: int = 85) -> bytes:
    """A JPEG of the middle frame, scaled down so its longer side is at most `max_side`."""
    image = Image.fromarray(frames[len(frames) // 2])
    image.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def probe_mp4(data: bytes) -> dict:
    """What a player sees: streams with codec, size, frames, rate and duration."""
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
