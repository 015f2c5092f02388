"""The VAE decodes chunk by chunk and the MP4 is encoded as the chunks arrive. Each is checked
against an independent reference: diffusers' own decode written out as the pipeline does it, and
the MP4 decoded back to pixels with PyAV."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve.media.mp4 import Mp4Writer, encode_mp4
from serve.pipeline.vae_decode import iter_decode, to_float_frames, to_uint8, video_to_uint8

from media_probe import decode_rgb_frames, probe_mp4, psnr
from serve.stages import VAE

# H.264 (crf 18, yuv420p: chroma at half resolution) keeps these frames at 33-40 dB; a frame out of order, a swapped
# colour channel or a wrong size falls far below it.
MP4_PSNR_FLOOR_DB = 30.0


@pytest.fixture(scope="module")
def vae(tiny_model_dir):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(tiny_model_dir / "vae").eval()


def pipeline_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """What `SkyReelsV2Pipeline.__call__` does with its final latents, step for step."""
    latents = latents.to(vae.dtype)
    latents_mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents.dtype)
    latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(latents.dtype)
    with torch.no_grad():
        return vae.decode(latents / latents_std + latents_mean, return_dict=False)[0]


def test_chunks_concatenate_to_the_pipelines_decode(vae):
    latents = torch.randn(1, 16, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    chunks = list(iter_decode(vae, latents))
    assert [c.shape[2] for c in chunks] == [1, 4, 4]  # Wan: 1 frame, then 4 per latent frame
    assert torch.equal(torch.cat(chunks, 2), pipeline_decode(vae, latents))


def test_uint8_frames_straight_from_the_video_are_the_same_bytes():
    video = torch.rand(1, 3, 5, 16, 24, generator=torch.Generator().manual_seed(3)) * 2.4 - 1.2
    video[0, 0, 0, 0, :6] = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 1 / 255 - 1])  # rounding edges
    assert np.array_equal(video_to_uint8(video), to_uint8(to_float_frames(video)))


def test_tiled_vae_really_tiles_and_matches_diffusers_tiled_decode(vae):
    latents = torch.randn(1, 16, 2, 12, 12, generator=torch.Generator().manual_seed(1))
    untiled = pipeline_decode(vae, latents)
    # tiles of 32 px (4 latents) over a 96 px (12 latents) frame: several tiles, blended seams
    vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32,
                      tile_sample_stride_height=16, tile_sample_stride_width=16)
    try:
        chunks = list(iter_decode(vae, latents))
        tiled = pipeline_decode(vae, latents)  # diffusers' decode with its tiling switched on
    finally:
        vae.disable_tiling()
    assert len(chunks) == 1  # a tiled VAE is decoded in one piece, by diffusers itself
    assert not torch.equal(tiled, untiled)  # tiling is in effect: the seams differ
    assert torch.equal(chunks[0], tiled)


def smooth_frames(n: int, h: int, w: int) -> np.ndarray:
    """Frames that H.264 keeps well and that tell frames and channels apart: a moving gradient,
    frame i tinted by i in red, and a solid green square whose position depends on i."""
    y, x = np.mgrid[0:h, 0:w]
    frames = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        frames[i, ..., 0] = np.clip(40 + 20 * i + x * 60 // w, 0, 255)
        frames[i, ..., 1] = 30
        frames[i, ..., 2] = np.clip(200 - y * 120 // h, 0, 255)
        r, c = (i * 4) % (h - 16), (i * 6) % (w - 16)
        frames[i, r:r + 16, c:c + 16] = (20, 220, 20)
    return frames


def test_mp4_decodes_to_the_generated_frames():
    frames = smooth_frames(9, 48, 64)
    data = encode_mp4(frames, 8)
    decoded = decode_rgb_frames(data)
    assert decoded.shape == frames.shape
    for i in range(len(frames)):
        assert psnr(decoded[i], frames[i]) > MP4_PSNR_FLOOR_DB, i
        # frame order: each decoded frame is closest to its own source frame
        assert int(np.argmax([psnr(decoded[i], f) for f in frames])) == i
    # colour channels in RGB order: red rises with the frame index, blue is high at the top
    assert decoded[8, ..., 0].mean() > decoded[0, ..., 0].mean() + 100
    assert decoded[0, :8, :, 2].mean() > decoded[0, :8, :, 0].mean()
    assert psnr(decoded[..., ::-1], frames) < MP4_PSNR_FLOOR_DB - 10  # swapped channels are caught


def test_incremental_mp4_decodes_to_the_frames_with_the_audio():
    frames = smooth_frames(9, 48, 64)
    audio = (0.1 * np.sin(np.arange(12000) / 10)).astype(np.float32)
    writer = Mp4Writer(64, 48, 8, audio_rate=16000)
    for part in (frames[:1], frames[1:5], frames[5:]):
        writer.add(part)
    data = writer.finish(audio)
    decoded = decode_rgb_frames(data)
    assert min(psnr(d, f) for d, f in zip(decoded, frames)) > MP4_PSNR_FLOOR_DB
    info = probe_mp4(data)
    assert info["video"][0]["frames"] == 9 and info["audio"][0]["sample_rate"] == 16000
    assert info["audio"][0]["duration_s"] == pytest.approx(9 / 8, abs=0.07)  # fitted to the video


def test_writer_refuses_what_it_cannot_encode():
    writer = Mp4Writer(64, 48, 8)
    with pytest.raises(ValueError, match="48"):
        writer.add(np.zeros((2, 32, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        writer.add(np.zeros((2, 48, 64, 3), np.float32))
    with pytest.raises(ValueError, match="audio"):
        writer.finish(np.zeros(100, np.float32))  # made without audio_rate


def test_vae_deployment_streams_the_frames_decode_returns(stage_handle, tiny_model_dir):
    from diffusers import AutoencoderKLWan

    vae = stage_handle(VAE.deployment)
    latents = np.random.default_rng(2).standard_normal((1, 16, 3, 8, 8)).astype(np.float32)
    whole = vae.decode.remote(latents, True).result()
    items = list(vae.options(stream=True).decode_stream.remote(latents, True))
    started, chunks = items[0], items[1:]
    assert (started.type, started.stage, started.stage_status) == ("stage", "vae", "started")
    assert [c.frames.shape[0] for c in chunks] == [1, 4, 4]
    assert np.array_equal(np.concatenate([c.frames for c in chunks]), whole.frames)
    assert np.array_equal(np.concatenate([c.float_frames for c in chunks]), whole.float_frames)
    assert whole.frames.dtype == np.uint8 and whole.frames.shape == (9, 64, 64, 3)
    # and both are the pipeline's own decode, post-processed as diffusers does for "np"
    local = AutoencoderKLWan.from_pretrained(tiny_model_dir / "vae").eval()
    reference = to_float_frames(pipeline_decode(local, torch.from_numpy(latents)))
    assert np.abs(whole.float_frames - reference).max() <= 1e-6
