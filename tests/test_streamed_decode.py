"""The VAE decodes chunk by chunk and the MP4 is encoded as the chunks arrive: the frames and the
file are exactly what decoding (and encoding) all at once gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve.denoising import denormalize_and_decode, iter_decode, to_float_frames, to_uint8, video_to_uint8
from serve.media import Mp4Writer, encode_mp4, probe_mp4


@pytest.fixture(scope="module")
def vae(tiny_model_dir):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(tiny_model_dir / "vae").eval()


def test_chunks_concatenate_to_the_whole_decode(vae):
    latents = torch.randn(1, 16, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    chunks = list(iter_decode(vae, latents))
    assert [c.shape[2] for c in chunks] == [1, 4, 4]  # Wan: 1 frame, then 4 per latent frame
    whole = denormalize_and_decode(vae, latents)
    assert torch.equal(torch.cat(chunks, 2), whole)


def test_uint8_frames_straight_from_the_video_are_the_same_bytes():
    video = torch.rand(1, 3, 5, 16, 24, generator=torch.Generator().manual_seed(3)) * 2.4 - 1.2
    video[0, 0, 0, 0, :6] = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 1 / 255 - 1])  # rounding edges
    assert np.array_equal(video_to_uint8(video), to_uint8(to_float_frames(video)))


def test_tiled_vae_decodes_in_one_piece(vae):
    vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32,
                      tile_sample_stride_height=16, tile_sample_stride_width=16)
    try:
        latents = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(1))
        chunks = list(iter_decode(vae, latents))
        assert len(chunks) == 1
        assert torch.equal(chunks[0], denormalize_and_decode(vae, latents))
    finally:
        vae.disable_tiling()


def test_incremental_mp4_equals_the_one_shot_file():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (9, 48, 64, 3), dtype=np.uint8)
    audio = (0.1 * np.sin(np.arange(12000) / 10)).astype(np.float32)
    writer = Mp4Writer(64, 48, 8, audio_rate=16000)
    for part in (frames[:1], frames[1:5], frames[5:]):
        writer.add(part)
    data = writer.finish(audio)
    assert data == encode_mp4(frames, 8, audio, 16000)
    info = probe_mp4(data)
    assert info["video"][0]["frames"] == 9 and info["audio"][0]["sample_rate"] == 16000


def test_writer_refuses_what_it_cannot_encode():
    writer = Mp4Writer(64, 48, 8)
    with pytest.raises(ValueError, match="48"):
        writer.add(np.zeros((2, 32, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        writer.add(np.zeros((2, 48, 64, 3), np.float32))
    with pytest.raises(ValueError, match="audio"):
        writer.finish(np.zeros(100, np.float32))  # made without audio_rate


def test_vae_deployment_streams_the_frames_decode_returns(stage_handle):
    vae = stage_handle("VAEDecoder")
    latents = np.random.default_rng(2).standard_normal((1, 16, 3, 8, 8)).astype(np.float32)
    whole = vae.decode.remote(latents, True).result()
    chunks = list(vae.options(stream=True).decode_stream.remote(latents, True))
    assert [c.frames.shape[0] for c in chunks] == [1, 4, 4]
    assert np.array_equal(np.concatenate([c.frames for c in chunks]), whole.frames)
    assert np.array_equal(np.concatenate([c.float_frames for c in chunks]), whole.float_frames)
    assert whole.frames.dtype == np.uint8 and whole.frames.shape == (9, 64, 64, 3)
