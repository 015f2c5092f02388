"""The embedded default model: a tiny, random-weight SkyReels-V2 T2V pipeline built locally.

`make_tiny_model(path, seed)` writes a diffusers-format folder (model_index.json plus the
tokenizer, text_encoder, transformer, vae and scheduler subfolders) that `SkyReelsV2Pipeline`
and each CineVivid stage load exactly like the real SkyReels-V2 checkpoints. Nothing is fetched
from the Hub: the configs are written here and the tokenizer is trained on a small built-in
corpus with `tokenizers`. Same seed -> byte-identical weights. Its output is noise.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

logger = logging.getLogger(__name__)

TINY_TEXT_DIM = 32
TINY_VOCAB_SIZE = 512

_CORPUS = [
    "a cat walks on the grass in the sunshine",
    "a dog runs along the beach at sunset, waves crashing",
    "a red car drives through a neon city at night in the rain",
    "cinematic shot of mountains covered with snow, slow camera pan",
    "a bird flies over a calm lake, reflections, golden hour",
    "close up of a flower blooming, time lapse, vivid colours",
    "astronaut floating in space, earth in the background",
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings",
    "images, static, overall gray, worst quality, low quality, JPEG compression residue, ugly",
    "incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured",
    "misshapen limbs, fused fingers, still picture, messy background, three legs, many people",
    "the quick brown fox jumps over the lazy dog 0123456789",
    "people walking in the street, crowd, busy market, morning light",
    "ocean waves, underwater scene with fish and coral reef",
]


def _train_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        shrinking_factor=0.75,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    eos_id = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
    )
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )


def build_tiny_pipeline(seed: int = 0, variant: str = "t2v"):
    """Build the tiny pipeline in memory (random weights from `seed`).

    `variant` "t2v": a `SkyReelsV2Pipeline` whose transformer has the config of the T2V and
    DF-14B checkpoints (no fps conditioning); the embedded default, which runs T2V and, by
    diffusion forcing, long video. "df": a `SkyReelsV2DiffusionForcingPipeline` whose transformer
    has the DF-1.3B config (`inject_sample_info`: an fps embedding that only the DF pipeline
    feeds; `SkyReelsV2Pipeline` cannot run it). Same seed -> the same weights in both, apart from
    the fps layers of "df"."""
    import torch
    from diffusers import (
        AutoencoderKLWan,
        SkyReelsV2DiffusionForcingPipeline,
        SkyReelsV2Pipeline,
        SkyReelsV2Transformer3DModel,
        UniPCMultistepScheduler,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _train_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=TINY_TEXT_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    torch.manual_seed(seed + 1)
    transformer = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=TINY_TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        inject_sample_info=variant == "df",
    ).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ).eval()
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=8.0,
    )
    if variant not in ("t2v", "df"):
        raise ValueError(f"unknown tiny model variant {variant!r}")
    pipeline_class = SkyReelsV2DiffusionForcingPipeline if variant == "df" else SkyReelsV2Pipeline
    return pipeline_class(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler
    )


def make_tiny_model(path: str | os.PathLike, seed: int = 0, overwrite: bool = False, variant: str = "t2v") -> Path:
    """Write the tiny pipeline to `path` atomically (temp folder, then rename). Idempotent."""
    target = Path(path).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "model_index.json").exists() and not overwrite:
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            build_tiny_pipeline(seed, variant).save_pretrained(tmp, safe_serialization=True)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("tiny model written", extra={"path": str(target)})
    return target
