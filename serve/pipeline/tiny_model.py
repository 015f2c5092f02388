"""The embedded default model: a tiny, random-weight SkyReels-V2 T2V pipeline built locally.

`make_tiny_model(path, seed)` writes a diffusers-format folder (model_index.json plus the
tokenizer, text_encoder, transformer, vae and scheduler subfolders) that `SkyReelsV2Pipeline`
and each CineVivid stage load exactly like the real SkyReels-V2 checkpoints. Nothing is fetched
from the Hub: the configs are written here and the tokenizer is trained on a small built-in
corpus with `tokenizers`. Same seed -> byte-identical weights. Its output is noise.

`variant="i2v"` adds the image side of the SkyReels-V2 I2V checkpoints (a tiny CLIP vision tower
and its image processor, also configured here) for `SkyReelsV2ImageToVideoPipeline`.

`make_tiny_lora(out_dir, transformer)` writes a random (non-zero A and B) LoRA for a transformer in
diffusers' LoRA format; `make_tiny_loras(model_dir)` writes two of them, "style-a" and "style-b",
to `<model_dir>-loras/`, a folder to use as `LoraAdaptersConfig.adapters_dir`.
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
# the CLIP vision tower of the "i2v" variant: 32x32 pixels in 8x8 patches -> 16 + 1 tokens of 32
TINY_IMAGE_DIM = 32
TINY_IMAGE_SIZE = 32
TINY_IMAGE_PATCH = 8
TINY_IMAGE_TOKENS = (TINY_IMAGE_SIZE // TINY_IMAGE_PATCH) ** 2 + 1
# OpenAI CLIP's normalisation, as in the image processor of the real I2V checkpoints
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
VARIANTS = ("t2v", "df", "i2v", "flf2v")

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
    the fps layers of "df".

    "i2v": a `SkyReelsV2ImageToVideoPipeline` with the same tokenizer, text encoder, VAE and
    scheduler (same seed -> same weights), a transformer configured like the SkyReels-V2 I2V
    checkpoints (`in_channels` 36 = 16 noise + 4 mask + 16 condition latents, `image_dim` = the CLIP
    tower's hidden size, `added_kv_proj_dim` = the transformer's inner dim, no `pos_embed_seq_len`)
    and a tiny CLIP vision tower with its image processor (`TINY_IMAGE_*`). Like the real I2V
    checkpoints it cannot take a `last_image`: the pipeline then encodes two images, and only a
    transformer with `pos_embed_seq_len` folds their embeddings into one sequence per video.
    "flf2v": "i2v" with that transformer (`pos_embed_seq_len` = 2 x the CLIP tokens, as the
    Wan2.1-FLF2V checkpoint has it), for first-and-last-frame conditioning."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny model variant {variant!r}")
    import torch
    from diffusers import (
        AutoencoderKLWan,
        SkyReelsV2DiffusionForcingPipeline,
        SkyReelsV2ImageToVideoPipeline,
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
    heads, head_dim = 2, 12
    in_channels, image_kwargs = 16, {}
    if variant in ("i2v", "flf2v"):
        # as the I2V checkpoints: 16 noise + 4 mask + 16 condition channels in, 16 out; the CLIP
        # hidden states projected to the inner dim feed the image K/V of every cross-attention
        in_channels = 16 + 4 + 16
        image_kwargs = dict(image_dim=TINY_IMAGE_DIM, added_kv_proj_dim=heads * head_dim)
        if variant == "flf2v":
            image_kwargs["pos_embed_seq_len"] = 2 * TINY_IMAGE_TOKENS
    transformer = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=16,
        text_dim=TINY_TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        inject_sample_info=variant == "df",
        **image_kwargs,
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
    if variant in ("i2v", "flf2v"):
        image_encoder, image_processor = _tiny_clip_vision(seed + 3)
        return SkyReelsV2ImageToVideoPipeline(
            tokenizer=tokenizer, text_encoder=text_encoder, image_encoder=image_encoder,
            image_processor=image_processor, transformer=transformer, vae=vae, scheduler=scheduler,
        )
    pipeline_class = SkyReelsV2DiffusionForcingPipeline if variant == "df" else SkyReelsV2Pipeline
    return pipeline_class(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler
    )


def _tiny_clip_vision(seed: int):
    """A tiny CLIP vision tower (random weights from `seed`) and its image processor, both
    configured here. The I2V pipeline feeds the transformer the tower's second-to-last hidden
    states (`hidden_states[-2]`: the output of the last-but-one encoder layer, before the last layer
    and the post-layernorm), (1, TINY_IMAGE_TOKENS, TINY_IMAGE_DIM) per image; the processor
    resizes the shortest edge to the tower's image size, centre-crops it square and normalises with
    OpenAI CLIP's mean/std, as the real checkpoints' processor does at 224."""
    import torch
    import transformers
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=TINY_IMAGE_DIM,
            intermediate_size=64,
            projection_dim=TINY_IMAGE_DIM,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_channels=3,
            image_size=TINY_IMAGE_SIZE,
            patch_size=TINY_IMAGE_PATCH,
            hidden_act="gelu",  # as the ViT-H/14 tower of the I2V checkpoints
            layer_norm_eps=1e-5,
        )
    ).eval()
    # the PIL backend by name: `CLIPImageProcessor` resolves to the torchvision one where torchvision
    # is installed, so the folder would differ between machines
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    image_processor = processor_class(
        do_resize=True,
        size={"shortest_edge": TINY_IMAGE_SIZE},
        resample=3,  # bicubic
        do_center_crop=True,
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    return image_encoder, image_processor


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


# The linear layers of SkyReelsV2Transformer3DModel a tiny LoRA adapts (PEFT matches these as name
# suffixes): self-attention (attn1) and cross-attention (attn2) q/k/v/out in every block, and the
# two linears of the feed-forward.
TINY_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
TINY_LORA_SEEDS = {"style-a": 101, "style-b": 202}


def make_tiny_lora(out_dir: str | os.PathLike, transformer, rank: int = 4, seed: int = 0,
                   target_modules: tuple[str, ...] = TINY_LORA_TARGETS, alpha: float | None = None,
                   std: float = 0.5) -> Path:
    """Write a random LoRA for `transformer` (a SkyReelsV2Transformer3DModel; left untouched) to
    `out_dir`, in diffusers' LoRA format: `pytorch_lora_weights.safetensors` with keys
    `transformer.<module>.lora_A.weight` / `.lora_B.weight` and the PEFT config as metadata, as
    `SkyReelsV2Pipeline.save_lora_weights` writes it, so `SkyReelsV2Pipeline.load_lora_weights(out_dir)`
    loads it. Unlike a freshly initialised LoRA (B = 0, a no-op) both A and B are random
    (seeded): A ~ N(0, 1/in), B ~ N(0, std^2/rank), so B @ A is of the order of `std` x the base
    weights and the adapter visibly changes the output. Same arguments -> the same tensors and
    metadata (not always the same bytes: safetensors writes its header's metadata map in any order).
    `alpha` defaults to `rank` (PEFT scaling alpha/rank = 1)."""
    import copy

    import torch
    from diffusers import SkyReelsV2Pipeline
    from peft import LoraConfig as PeftLoraConfig
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(transformer).to("cpu")
    adapter_config = PeftLoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                                    target_modules=list(target_modules), init_lora_weights=True)
    model.add_adapter(adapter_config, adapter_name="tiny")
    layers = get_peft_model_state_dict(model, adapter_name="tiny")
    gen = torch.Generator().manual_seed(seed)
    for key in sorted(layers):
        w = layers[key]
        if "lora_A" in key:  # (rank, in)
            sd = 1.0 / w.shape[1] ** 0.5
        elif "lora_B" in key:  # (out, rank)
            sd = std / rank ** 0.5
        else:
            continue
        layers[key] = (torch.randn(w.shape, generator=gen, dtype=torch.float32) * sd).to(w.dtype).contiguous()
    # PEFT keeps target_modules as a set: sorted, so the metadata does not follow the hash seed
    metadata = {k: sorted(v) if isinstance(v, (set, frozenset)) else v
                for k, v in model.peft_config["tiny"].to_dict().items()}
    target = Path(out_dir).expanduser()
    SkyReelsV2Pipeline.save_lora_weights(target, transformer_lora_layers=layers,
                                         transformer_lora_adapter_metadata=metadata)
    return target


def make_tiny_loras(model_dir: str | os.PathLike, transformer=None, rank: int = 4,
                    overwrite: bool = False) -> dict[str, Path]:
    """Two tiny LoRAs for the tiny model at `model_dir` (its transformer, or `transformer`), written
    next to it in `<model_dir>-loras/style-a/` and `.../style-b/` (different seeds): the folder is
    an `adapters_dir` for `LoraAdaptersConfig`. Idempotent (file lock, then kept unless `overwrite`)."""
    model_dir = Path(model_dir).expanduser().resolve()
    root = model_dir.parent / f"{model_dir.name}-loras"
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    with FileLock(str(root) + ".lock"):
        for name, seed in TINY_LORA_SEEDS.items():
            path = root / name
            if overwrite or not (path / "pytorch_lora_weights.safetensors").exists():
                if transformer is None:
                    from diffusers import SkyReelsV2Transformer3DModel

                    transformer = SkyReelsV2Transformer3DModel.from_pretrained(model_dir / "transformer")
                tmp = Path(tempfile.mkdtemp(prefix=name + ".", dir=root))
                try:
                    make_tiny_lora(tmp, transformer, rank=rank, seed=seed)
                    if path.exists():
                        shutil.rmtree(path)
                    os.replace(tmp, path)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            out[name] = path
    return out


# diffusers' module names of a SkyReels-V2 / Wan2.1 block -> the original Wan checkpoint's, which the
# step-distilled LoRAs of LightX2V (`wan2.1_t2v_14b_lora_rank64_lightx2v_4step.safetensors`,
# `Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank64.safetensors`) are keyed by
WAN_ORIGINAL_NAMES = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
                      "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
                      "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o",
                      "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}


def make_tiny_distill_lora(out_file: str | os.PathLike, transformer, rank: int = 4, alpha: float = 8.0,
                           seed: int = 0, std: float = 0.5) -> Path:
    """Write a random LoRA for `transformer` in the format of LightX2V's step-distilled Wan2.1 LoRAs
    (the original Wan checkpoint's names, not diffusers'): one `.safetensors` file with
    `diffusion_model.blocks.<i>.<self_attn|cross_attn>.<q|k|v|o>.lora_down.weight` (rank, in),
    `....lora_up.weight` (out, rank) and `....alpha` (a scalar; scaling alpha/rank), the same for
    `ffn.0` / `ffn.2`, and the zeroed `norm3.diff` / `.diff_b` entries those files carry. diffusers'
    `SkyReelsV2LoraLoaderMixin.lora_state_dict` converts it on load (`serve.pipeline.lora` reads it so).
    Seeded: the same arguments give the same tensors."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    modules = dict(transformer.named_modules())
    for i in range(len(transformer.blocks)):
        for ours, theirs in WAN_ORIGINAL_NAMES.items():
            linear = modules[f"blocks.{i}.{ours}"]
            key = f"diffusion_model.blocks.{i}.{theirs}"
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, linear.in_features, generator=gen) / linear.in_features ** 0.5
            tensors[f"{key}.lora_up.weight"] = torch.randn(linear.out_features, rank, generator=gen) * std / rank ** 0.5
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
        norm3 = modules[f"blocks.{i}.norm3"]
        if getattr(norm3, "weight", None) is not None:
            tensors[f"diffusion_model.blocks.{i}.norm3.diff"] = torch.zeros_like(norm3.weight, device="cpu")
            tensors[f"diffusion_model.blocks.{i}.norm3.diff_b"] = torch.zeros_like(norm3.bias, device="cpu")
    out = Path(out_file).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out))
    return out
