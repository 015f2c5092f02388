"""MP4 (H.264 + optional AAC) and JPEG thumbnail encoding with PyAV/Pillow, all in memory."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
from PIL import Image

from serve.media.audio import fade_out, target_samples


# x264's MB-tree rate control reads memory it never wrote: with it on (the default), the same frames
# encode to different bytes from one process or thread to another (seen with MALLOC_PERTURB_, and as
# retried jobs whose videos differed from the first run). Off, the encoder is a pure function of its
# input, so the same seed gives the same MP4. `tests/test_mp4_determinism.py` holds it.
X264_OPTIONS = {"preset": "veryfast", "x264-params": "mbtree=0"}


def _check_frames(frames: np.ndarray) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")


class Mp4Writer:
    """An H.264 (+ AAC) MP4 built in memory as frames arrive: `add` uint8 (F, H, W, 3) frames as they
    are decoded, then `finish` with the voice-over (if the writer was made with `audio_rate`).
    Encoding while the VAE still decodes takes the mux off the critical path."""

    def __init__(self, width: int, height: int, fps: int, audio_rate: int | None = None, crf: int = 18):
        self.width, self.height, self.fps, self.audio_rate = width, height, fps, audio_rate
        self.frames = 0
        self._buf = io.BytesIO()
        self._container = av.open(self._buf, mode="w", format="mp4")
        self._video = self._container.add_stream("libx264", rate=fps)
        self._video.width = width
        self._video.height = height
        self._video.pix_fmt = "yuv420p"
        self._video.options = X264_OPTIONS | {"crf": str(crf)}
        self._audio = None
        if audio_rate is not None:
            self._audio = self._container.add_stream("aac", rate=audio_rate)
            self._audio.layout = "mono"

    def add(self, frames: np.ndarray) -> None:
        _check_frames(frames)
        if frames.shape[1:3] != (self.height, self.width):
            raise ValueError(f"frames are {frames.shape[2]}x{frames.shape[1]}, the MP4 is {self.width}x{self.height}")
        for frame in frames:
            for packet in self._video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                self._container.mux(packet)
        self.frames += len(frames)

    def finish(self, audio: np.ndarray | None = None) -> bytes:
        """Flush the video, add the audio (fitted to the video: see `align_audio`), close; the MP4."""
        if (audio is None) != (self._audio is None):
            self.close()
            raise ValueError("audio must be given exactly when the writer was made with audio_rate")
        try:
            for packet in self._video.encode():
                self._container.mux(packet)
            if self._audio is not None:
                _encode_audio(self._container, self._audio,
                              align_audio(audio, self.frames / self.fps, self.audio_rate), self.audio_rate)
        finally:
            self.close()
        return self._buf.getvalue()

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


def encode_mp4(frames: np.ndarray, fps: int, audio: np.ndarray | None = None, sample_rate: int = 22050,
               crf: int = 18) -> bytes:
    """frames: uint8 (F, H, W, 3). audio: float32 mono in [-1, 1], fitted to the video (see
    `serve.media.audio.fit_audio`); its length is snapped here to whole AAC frames nearest the video's
    duration, so the audio track a player decodes ends within one video frame of the picture."""
    _check_frames(frames)
    writer = Mp4Writer(frames.shape[2], frames.shape[1], fps, sample_rate if audio is not None else None, crf)
    try:
        writer.add(frames)
    except BaseException:
        writer.close()
        raise
    return writer.finish(audio)


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
