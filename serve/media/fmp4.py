"""A fragmented MP4 that grows as a long video is made (progressive delivery of diffusion forcing).

`FragmentedPreview.add(frames, keyframe=...)` H.264-encodes frames as they are decoded (x264
`zerolatency`: one packet out per frame in, so nothing waits inside the encoder), `cut()` returns
the bytes to append to the preview so far: the first cut the init segment (ftyp+moov, with the AAC
track when there is a voice-over) and the first fragments, each later cut the new fragments
(moof+mdat). A keyframe at each window's first frame makes every window boundary a fragment
boundary. The voice-over, fitted to the whole video, is encoded once up front and each cut carries
it up to the playable point.

libav's MP4 muxer cannot be told to flush a fragment through PyAV, so each `cut` re-muxes the
compressed packets so far (stream copy, no re-encoding; kilobytes per frame) into a fresh
fragmented MP4 and returns what is new: the muxer is deterministic, so the earlier bytes are the
same (checked). Only compressed packets are kept, never frames.
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np

from serve.media.mp4 import X264_OPTIONS, _check_frames, align_audio

MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof+skip_trailer"


class FragmentedPreview:
    def __init__(self, width: int, height: int, fps: int, audio: np.ndarray | None = None,
                 audio_rate: int | None = None, total_frames: int | None = None, crf: int = 20):
        self.width, self.height, self.fps = width, height, fps
        self.frames = 0
        self._emitted = b""
        self._encoder = av.open(io.BytesIO(), mode="w", format="mp4", options={"movflags": MOVFLAGS})
        self._video = self._encoder.add_stream("libx264", rate=fps)
        self._video.width, self._video.height, self._video.pix_fmt = width, height, "yuv420p"
        self._video.options = X264_OPTIONS | {"crf": str(crf), "tune": "zerolatency"}
        self._packets: list[av.Packet] = []
        self._audio_stream = None
        self._audio_packets: list[av.Packet] = []
        if audio is not None:
            if audio_rate is None or total_frames is None:
                raise ValueError("audio needs audio_rate and total_frames (the whole video's length)")
            self._audio_stream = self._encoder.add_stream("aac", rate=audio_rate)
            self._audio_stream.layout = "mono"
            self._encode_audio(align_audio(audio, total_frames / fps, audio_rate), audio_rate)

    @property
    def playable_s(self) -> float:
        return self.frames / self.fps

    def _encode_audio(self, pcm: np.ndarray, rate: int) -> None:
        pts = 0
        for start in range(0, len(pcm), 1024):
            frame = av.AudioFrame.from_ndarray(pcm[start:start + 1024].reshape(1, -1), format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, pts, Fraction(1, rate)
            pts += frame.samples
            self._audio_packets += self._audio_stream.encode(frame)
        self._audio_packets += self._audio_stream.encode()

    def add(self, frames: np.ndarray, keyframe: bool = False) -> None:
        """Encode uint8 (F, H, W, 3) frames; `keyframe`: the first one starts a new fragment."""
        _check_frames(frames)
        for i, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts = self.frames
            if keyframe and i == 0:
                vf.pict_type = av.video.frame.PictureType.I
            self._packets += self._video.encode(vf)
            self.frames += 1

    def cut(self) -> bytes:
        """The bytes to append to what earlier cuts returned: the video so far is then playable."""
        buf = io.BytesIO()
        out = av.open(buf, mode="w", format="mp4", options={"movflags": MOVFLAGS})
        try:
            video = out.add_stream_from_template(self._video)
            video.codec_context.extradata = self._video.codec_context.extradata
            audio = None
            if self._audio_stream is not None:
                audio = out.add_stream_from_template(self._audio_stream)
                audio.codec_context.extradata = self._audio_stream.codec_context.extradata
            for packet in self._packets:
                packet.stream = video
                out.mux(packet)
            if audio is not None:
                for packet in self._audio_packets:
                    if packet.pts is not None and packet.pts * packet.time_base < Fraction(self.frames, self.fps):
                        packet.stream = audio
                        out.mux(packet)
        finally:
            out.close()
        data = buf.getvalue()
        if data[:len(self._emitted)] != self._emitted:
            raise RuntimeError("the fragmented MP4 muxer rewrote earlier fragments")
        new, self._emitted = data[len(self._emitted):], data
        return new

    def close(self) -> None:
        if self._encoder is not None:
            self._encoder.close()
            self._encoder = None
