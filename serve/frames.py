"""The frame rules of the Wan VAE, in one place: a video has 4k+1 frames (the first frame is its own
latent frame, then one per 4), and the diffusion-forcing window rules built on it. The app's config
checks a model's defaults with them at deploy time, spec resolution a request's values.
"""

from __future__ import annotations

from serve.errors import InvalidSpecError

VAE_TEMPORAL_FACTOR = 4  # frames per latent frame after the first: num_frames = 4k + 1
# the geometry of the Wan VAE and DiT (every SkyReels-V2 model)
VAE_SPATIAL_FACTOR = 8  # pixels per latent row/column
PATCH_SIZE = 2  # the DiT's spatial patch (1, 2, 2)
SIZE_MULTIPLE = VAE_SPATIAL_FACTOR * PATCH_SIZE  # width and height are multiples of 16


def latent_frames(num_frames: int) -> int:
    """Latent frames of a 4k+1-frame video: (frames - 1) / 4 + 1."""
    return (num_frames - 1) // VAE_TEMPORAL_FACTOR + 1


def is_frame_count(num_frames: int, minimum: int = 1) -> bool:
    """A valid frame count: 4k+1 and at least `minimum`."""
    return num_frames >= minimum and (num_frames - 1) % VAE_TEMPORAL_FACTOR == 0


def largest_frame_count(limit: int) -> int:
    """The largest 4k+1 frame count not above `limit` (>= 1)."""
    return (limit - 1) // VAE_TEMPORAL_FACTOR * VAE_TEMPORAL_FACTOR + 1


def check_frame_count(name: str, value: int, minimum: int = 1) -> None:
    if not is_frame_count(value, minimum):
        raise InvalidSpecError(f"{name} must be 4k+1 and at least {minimum} (e.g. 17, 37, 97), got {value}",
                               param=name)


def check_df_window(base_num_frames: int, overlap_history: int) -> None:
    """A diffusion-forcing window: base_num_frames 4k+1 (>= 5), overlap_history 4k+1 and at least one
    latent frame shorter. Raises InvalidSpecError naming the field."""
    check_frame_count("base_num_frames", base_num_frames, minimum=5)
    check_frame_count("overlap_history", overlap_history)
    if latent_frames(overlap_history) >= latent_frames(base_num_frames):
        raise InvalidSpecError(f"overlap_history ({overlap_history}) must be shorter than base_num_frames "
                               f"({base_num_frames}) by at least {VAE_TEMPORAL_FACTOR} frames",
                               param="overlap_history")


def check_causal_block(base_num_frames: int, overlap_history: int, causal_block_size: int) -> None:
    """causal_block_size (>= 1) divides the latent frames of base_num_frames and of overlap_history."""
    if causal_block_size < 1:
        raise InvalidSpecError(f"causal_block_size must be at least 1, got {causal_block_size}",
                               param="causal_block_size")
    for name, value in (("base_num_frames", base_num_frames), ("overlap_history", overlap_history)):
        if latent_frames(value) % causal_block_size:
            raise InvalidSpecError(
                f"causal_block_size ({causal_block_size}) must divide the latent frames of {name} ({value} frames = "
                f"{latent_frames(value)} latent frames, (frames - 1) / 4 + 1)", param="causal_block_size")


def df_window_count(num_frames: int, base_num_frames: int, overlap_history: int, *, extend: bool = False) -> int:
    """How many windows a diffusion-forcing job runs (what `serve.pipeline.diffusion_forcing.plan_windows`
    cuts, counted without torch, for the job views): one when the video fits one window (never for
    an extension, `extend`), else one more per `base - overlap` latent frames past the first
    window."""
    total, base, overlap = latent_frames(num_frames), latent_frames(base_num_frames), latent_frames(overlap_history)
    if not extend and num_frames <= base_num_frames:
        return 1
    return 1 + (total - base - 1) // (base - overlap) + 1


def dit_tokens(num_frames: int, height: int, width: int) -> int:
    """The DiT's sequence length for one video: latent frames x patches per frame."""
    return latent_frames(num_frames) * (height // SIZE_MULTIPLE) * (width // SIZE_MULTIPLE)


def parallel_refusal(width: int, height: int, sequence_degree: int,
                     causal_block_size: int = 1) -> tuple[str, str] | None:
    """Why a video cannot run on a replica whose ranks share its token sequence
    (`serve.pipeline.parallel`, `sequence_degree` = ulysses x ring), as (message, param), or None.
    Each latent frame's tokens must split evenly over the ranks (then every window of any length
    does), and diffusion forcing's causal-block mask (a full-sequence attention mask) is not taken
    by diffusers' context-parallel attention."""
    if sequence_degree <= 1:
        return None
    per_frame = dit_tokens(1, height, width)
    if per_frame % sequence_degree:
        return (f"size {width}x{height} has {per_frame} DiT tokens per latent frame ({width // SIZE_MULTIPLE} x "
                f"{height // SIZE_MULTIPLE}), which do not split evenly over the model's {sequence_degree} "
                f"sequence-parallel ranks (parallel ulysses x ring); pick a size whose (width/{SIZE_MULTIPLE}) x "
                f"(height/{SIZE_MULTIPLE}) is a multiple of {sequence_degree}", "width")
    if causal_block_size > 1:
        return ("causal_block_size > 1 attends through a full-sequence mask, which diffusers' context-parallel "
                "attention does not take; this model splits the sequence (parallel ulysses x ring > 1): use "
                "causal_block_size 1", "causal_block_size")
    return None
