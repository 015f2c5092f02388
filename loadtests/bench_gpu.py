"""GPU benchmark: plain diffusers `SkyReelsV2Pipeline` vs CineVivid's denoising graph (the same ops the
`Transformer`/`VAEDecoder` deployments run, in process) vs CineVivid with each speed lever.

Models are random-initialised with the real SkyReels-V2 configs (1.3B: 12 heads x 128, 30 layers,
ffn 8960; 14B: 40 heads x 128, 40 layers, ffn 13824; both text_dim 4096, freq_dim 256), the real
Wan VAE (diffusers' default `AutoencoderKLWan` config) and a UMT5-XXL-sized encoder (d_model 4096,
24 layers, 64 heads, d_ff 10240, vocab 256384) — built directly on the GPU, no weights needed: they
have the real FLOPs and memory. The tokenizer is CineVivid's tiny local one (token ids only feed the
encoder; its cost is the same). Output of random weights is noise, so each lever's PSNR is
meaningful only against the exact run of the same random model (diffusers in the same dtype), which
is what is reported.

Per model and variant: seconds per video (prompt encode + denoise + VAE decode + post-process to
float frames, as `pipe(...)` with output_type="np" does), seconds per denoising step, achieved
TFLOP/s of the DiT, peak GPU memory, and PSNR / max |Δ| of the frames against the exact run.

Variants:
  diffusers        SkyReelsV2Pipeline.__call__ (the exact reference)
  cinevivid        serve.pipeline.denoising.DenoiseLoop + serve.pipeline.text_encoding + decode, no levers
  cfg_batch        + cond/uncond in one batched forward (exact lever); also probes the step cache
                   (threshold 0: never skips) to record the first-block changes for calibration
  step_cache       + make_step_cache(threshold, --step-cache-backend first_block|cache_dit) (approximate)
  step_cache_dit   the same with cache-dit's DBCache (backend cache_dit), at the same threshold: the two
                   backends side by side in one run (not in the default list)
  compile          + cfg_batch + torch.compile of the DiT blocks (serve.pipeline.levers.compile_transformer)
  best             + cfg_batch + compile + step cache
  vae_tiling       decode of the cinevivid latents with VAE tiling: time, peak memory, PSNR

Runs on one H200 in well under 9 minutes with the defaults (1.3B full lever set at 8 steps, then
14B diffusers vs best at 4 steps, bounded by --budget-s). On a CPU: `--config tiny`.

  python -m loadtests.bench_gpu --out /tmp/bench_gpu.json                 # GPU defaults
  python -m loadtests.bench_gpu --config tiny --out /tmp/bench_gpu_tiny.json  # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from types import SimpleNamespace

import numpy as np
import torch

from serve.errors import LeverUnavailable
from serve.pipeline.loading import torch_dtype

PROMPT = ("A cinematic shot of a red fox running through fresh snow in a pine forest at golden hour, "
          "slow motion, shallow depth of field")
NEGATIVE = ("Bright tones, overexposed, static, blurred details, subtitles, worst quality, low quality, "
            "JPEG compression residue, ugly, incomplete, extra fingers, deformed")
SEED = 42

# Real SkyReels-V2 T2V transformer configs (diffusers format; same architecture as Wan2.1 1.3B / 14B).
DIT_CONFIGS = {
    "1.3B": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                 out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    "14B": dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
}
UMT5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=256384,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", dropout_rate=0.0)
SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=8.0)
ALL_VARIANTS = ["diffusers", "cinevivid", "cfg_batch", "step_cache", "best", "compile", "vae_tiling"]
# `--suite levers30` (issue 24): the models' own settings (540P, 97 frames, 30 steps, CFG 6), plain
# diffusers against each lever alone and the best combination. The fp8 variants quantise the DiT in
# place, so they run last (`order_variants`).
SUITES = {
    "levers30": dict(
        config="1.3B,14B", steps=30, steps_14b=30,
        variants=("diffusers,fp32,cinevivid,cfg_batch,attn=auto,step_cache=0.05,step_cache=0.1,step_cache=0.2,"
                  "cache_dit=0.05,cache_dit=0.1,compile,vae_tiling,fp8,best_nocache,best"),
        variants_14b="diffusers,cfg_batch,attn=auto,step_cache=0.1,compile,fp8,best_nocache,best"),
}
FP8_VARIANTS = ("fp8", "best_nocache", "best")  # variants that quantise the DiT (with --best-fp8 for the last two)
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def log(msg: str) -> None:
    print(f"[bench_gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- models ------------------------------------------------------------------------------------------

@dataclass
class Components:
    name: str
    tokenizer: object
    text_encoder: torch.nn.Module
    transformer: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    build_s: float = 0.0


def build_components(name: str, device: torch.device, dtype: torch.dtype, encoder: str) -> Components:
    """Random-init models directly on `device` (a 14B fp32 copy is never made on the CPU)."""
    from diffusers import AutoencoderKLWan, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

    from serve.pipeline.levers import cast_model

    t0 = time.perf_counter()
    if name == "tiny":
        from serve.pipeline.tiny_model import build_tiny_pipeline

        p = build_tiny_pipeline(0)
        comps = Components(name, p.tokenizer, p.text_encoder.to(device), p.transformer.to(device), p.vae.to(device),
                           p.scheduler)
        if dtype != torch.float32:
            cast_model(comps.transformer, dtype)
            comps.text_encoder.to(dtype)
        comps.build_s = time.perf_counter() - t0
        return comps

    from transformers import UMT5Config, UMT5EncoderModel

    from serve.pipeline.tiny_model import _train_tokenizer

    tokenizer = _train_tokenizer()
    torch.manual_seed(0)
    with torch.device(device):
        transformer = SkyReelsV2Transformer3DModel(**DIT_CONFIGS[name]).eval()
        cast_model(transformer, dtype)  # as from_pretrained(torch_dtype=dtype): norms/rope/time stay fp32
        enc_cfg = dict(UMT5_XXL) if encoder == "umt5-xxl" else dict(UMT5_XXL, num_layers=2)
        text_encoder = UMT5EncoderModel(UMT5Config(
            **enc_cfg, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id)).eval().to(dtype)
        vae = AutoencoderKLWan().eval()  # the Wan2.1 VAE config; kept fp32 as SkyReels-V2 recommends
    scheduler = UniPCMultistepScheduler(**SCHEDULER)
    _sync(device)
    return Components(name, tokenizer, text_encoder, transformer, vae, scheduler, time.perf_counter() - t0)


def dit_flops_per_forward(cfg: dict, tokens: int, text_len: int = 512, batch: int = 1) -> float:
    """Matmul + attention FLOPs of one DiT forward (multiply-add = 2)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    per_layer = (2 * tokens * (4 * d * d + 2 * d * d + 2 * d * cfg["ffn_dim"])  # self qkvo, cross q/o, ffn
                 + 2 * text_len * 2 * d * d  # cross k, v
                 + 4 * tokens * tokens * d  # self-attention scores + values
                 + 4 * tokens * text_len * d)  # cross-attention
    return batch * cfg["num_layers"] * per_layer


# -- runs --------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


class StepClock:
    """Timestamps of each denoising step's end (device-synchronised)."""

    def __init__(self, device):
        self.device, self.stamps = device, []

    def tick(self):
        _sync(self.device)
        self.stamps.append(time.perf_counter())

    def per_step_s(self) -> float | None:
        if len(self.stamps) < 2:
            return None
        return (self.stamps[-1] - self.stamps[0]) / (len(self.stamps) - 1)


def run_diffusers(c: Components, s: SimpleNamespace, device) -> dict:
    from diffusers import SkyReelsV2Pipeline

    pipe = SkyReelsV2Pipeline(tokenizer=c.tokenizer, text_encoder=c.text_encoder, transformer=c.transformer,
                              vae=c.vae, scheduler=c.scheduler)
    pipe.set_progress_bar_config(disable=True)
    clock, holder = StepClock(device), {}

    def on_step_end(p, i, t, kwargs):
        clock.tick()
        if i == s.steps - 1:
            holder["latents"] = kwargs["latents"].detach().float().cpu().numpy()
        return {}

    _reset_peak(device)
    t0 = time.perf_counter()
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=s.height, width=s.width, num_frames=s.frames,
               num_inference_steps=s.steps, guidance_scale=s.guidance, generator=torch.Generator().manual_seed(SEED),
               output_type="np", max_sequence_length=s.max_len, callback_on_step_end=on_step_end)
    frames = np.asarray(out.frames[0], dtype=np.float32)
    _sync(device)
    return {"seconds": time.perf_counter() - t0, "step_s": clock.per_step_s(), "peak_gib": _peak_gib(device),
            "frames": frames, "latents": holder.get("latents")}


def run_cinevivid(c: Components, s: SimpleNamespace, device, *, cfg_batch=False, cache=None,
                  decode: bool = True) -> dict:
    from serve.pipeline.denoising import DenoiseJob, DenoiseLoop, LoopSettings, clone_scheduler_config
    from serve.pipeline.vae_decode import denormalize_and_decode, to_float_frames
    from serve.pipeline.text_encoding import encode_prompts

    clock = StepClock(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    cond = encode_prompts(c.tokenizer, c.text_encoder, [PROMPT], s.max_len, device)
    uncond = encode_prompts(c.tokenizer, c.text_encoder, [NEGATIVE], s.max_len, device)
    loop = DenoiseLoop(c.transformer, clone_scheduler_config(c.scheduler), device, step_cache=cache)
    job = DenoiseJob(seed=SEED, prompt_embeds=cond, negative_prompt_embeds=uncond,
                     on_step=lambda i, total: clock.tick())
    loop.run([job], LoopSettings(width=s.width, height=s.height, num_frames=s.frames, num_inference_steps=s.steps,
                                 guidance_scale=s.guidance, flow_shift=SCHEDULER["flow_shift"], cfg_batch=cfg_batch))
    frames = None
    if decode:
        video = denormalize_and_decode(c.vae, torch.from_numpy(job.result).to(device))
        frames = to_float_frames(video)
    _sync(device)
    out = {"seconds": time.perf_counter() - t0, "step_s": clock.per_step_s(), "peak_gib": _peak_gib(device),
           "frames": frames, "latents": job.result}
    if cache is not None:
        out["step_cache"] = cache.stats()
    return out


def run_vae_tiling(c: Components, latents: np.ndarray, device) -> dict:
    from serve.pipeline.vae_decode import denormalize_and_decode, to_float_frames

    res = {}
    for tiled in (False, True):
        if tiled:
            c.vae.enable_tiling()
        else:
            c.vae.disable_tiling()
        _reset_peak(device)
        t0 = time.perf_counter()
        frames = to_float_frames(denormalize_and_decode(c.vae, torch.from_numpy(latents).to(device)))
        _sync(device)
        res["tiled" if tiled else "untiled"] = {"seconds": time.perf_counter() - t0, "peak_gib": _peak_gib(device),
                                                "frames": frames}
    c.vae.disable_tiling()
    return res


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2, dtype=np.float64))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def compare(frames: np.ndarray, ref: np.ndarray, latents=None, ref_latents=None) -> dict:
    out = {"psnr_db": _num(psnr(frames, ref)), "max_abs_diff": float(np.abs(frames - ref).max()),
           "finite": bool(np.isfinite(frames).all())}
    if latents is not None and ref_latents is not None:
        out["latent_rel_l2"] = float(np.linalg.norm(latents - ref_latents) / max(np.linalg.norm(ref_latents), 1e-12))
    return out


def _num(x: float):
    return "inf" if math.isinf(x) else round(x, 2)


def order_variants(variants: list[str], best_fp8: bool) -> list[str]:
    """The variants in the order asked, except that those which quantise the DiT to fp8 (irreversibly,
    in place) come after all the others."""
    quantises = {"fp8"} | ({"best_nocache", "best"} if best_fp8 else set())
    return sorted(variants, key=lambda v: v in quantises)


def uncompile(transformer) -> None:
    """Drop a regional compile (before the DiT's weights change type, or after a failed compile)."""
    for b in getattr(transformer, "blocks", []):
        b._compiled_call_impl = None
    torch._dynamo.reset()


def ensure_fp8(c: Components, device) -> dict:
    """Quantise the DiT to fp8 as the lever does at load (once); LeverUnavailable where it cannot run."""
    from serve.pipeline.fp8 import fp8_mode, quantize_fp8

    mode = fp8_mode(device)
    if not getattr(c.transformer, "_cinevivid_fp8", None):
        uncompile(c.transformer)
    return {"fp8_mode": mode, "fp8_linears": quantize_fp8(c.transformer, mode)}


def run_fp32_diffusers(c: Components, s: SimpleNamespace, device, dtype: torch.dtype) -> dict:
    """Plain diffusers with the DiT and the text encoder in float32 (the bf16 lever's reference), then
    back to `dtype` (bf16 -> fp32 -> bf16 is lossless)."""
    from serve.pipeline.levers import cast_model

    cast_model(c.transformer, torch.float32)
    c.text_encoder.to(torch.float32)
    try:
        return run_diffusers(c, s, device)
    finally:
        cast_model(c.transformer, dtype)
        c.text_encoder.to(dtype)


def pick_threshold(arg: str, changes: list[float] | None, fallback: float | None) -> float:
    if arg != "auto":
        return float(arg)
    if changes:
        # a little above the median first-block change: roughly every other eligible step is skipped
        return round(1.05 * statistics.median(changes), 4)
    return fallback if fallback is not None else 0.1


# -- driver ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default=None, choices=sorted(SUITES),
                    help="a named set of defaults: levers30 = 1.3B and 14B at 540P/97f/30 steps, each lever alone "
                         "and the best combination (flags given explicitly still win)")
    ap.add_argument("--config", default="1.3B,14B", help="comma list of: tiny, 1.3B, 14B")
    ap.add_argument("--height", type=int, default=None, help="default 544 (tiny: 64)")
    ap.add_argument("--width", type=int, default=None, help="default 960 (tiny: 64)")
    ap.add_argument("--frames", type=int, default=None, help="default 97 (tiny: 9)")
    ap.add_argument("--steps", type=int, default=8, help="denoising steps (1.3B/tiny)")
    ap.add_argument("--steps-14b", type=int, default=4, help="denoising steps for 14B")
    ap.add_argument("--guidance", type=float, default=6.0)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--variants", default=",".join(ALL_VARIANTS),
                    help="variants for tiny/1.3B; also fp32, attn=<backend|auto>, step_cache=<threshold>, "
                         "cache_dit=<threshold>, fp8, best_nocache")
    ap.add_argument("--variants-14b", default="diffusers,best", help="variants for 14B")
    ap.add_argument("--step-cache-threshold", default="auto",
                    help="float, or 'auto': 1.05 x median first-block change probed in the cfg_batch run")
    ap.add_argument("--step-cache-backend", default="first_block", choices=["first_block", "cache_dit"],
                    help="LeversConfig.step_cache_backend for the step_cache/best variants")
    ap.add_argument("--cache-dit-fn", type=int, default=1, help="cache_dit backend: Fn probe blocks")
    ap.add_argument("--cache-dit-bn", type=int, default=0, help="cache_dit backend: Bn always-computed tail blocks")
    ap.add_argument("--cache-dit-taylorseer", action="store_true", help="cache_dit backend: TaylorSeer calibrator")
    ap.add_argument("--dtype", default=None, choices=list(DTYPE_NAMES), help="DiT/encoder dtype (cuda: bfloat16, cpu: float32)")
    ap.add_argument("--encoder", default="umt5-xxl", choices=["umt5-xxl", "umt5-2layer"],
                    help="text encoder size (runs once per video; 2 layers saves build time)")
    ap.add_argument("--best-attention", default="auto", help="attention backend of best/best_nocache")
    ap.add_argument("--best-fp8", default="auto", choices=["auto", "on", "off"],
                    help="fp8 DiT in best/best_nocache (auto: where the GPU runs it)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip variants predicted to end past this")
    ap.add_argument("--compile-estimate-s", type=float, default=30.0,
                    help="for the budget: one regional compile + 1-step warm-up (26 s for 1.3B/14B on an H200)")
    ap.add_argument("--out", required=True, help="JSON result path")
    args = ap.parse_args(argv)
    if args.suite:
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])
                 if a.startswith("--")}
        for key, value in SUITES[args.suite].items():
            if key not in given:
                setattr(args, key, value)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    real = [n.strip() for n in args.config.split(",") if n.strip() and n.strip() != "tiny"]
    if device.type != "cuda" and real:
        print(f"bench_gpu: {', '.join(real)} need a CUDA GPU (this run's device is {device.type}); "
              "the CPU dry path of the same code is --config tiny", file=sys.stderr)
        return 2
    if args.best_fp8 == "auto":
        from serve.errors import LeverUnavailable
        from serve.pipeline.fp8 import fp8_mode

        try:
            fp8_mode(device)
            best_fp8 = True
        except LeverUnavailable:
            best_fp8 = False
    else:
        best_fp8 = args.best_fp8 == "on"
    dtype = torch_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    start = time.perf_counter()
    import diffusers

    result = {
        "benchmark": "bench_gpu", "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), "-m", "loadtests.bench_gpu", *(argv or sys.argv[1:])]),
        "machine": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                    or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "diffusers": diffusers.__version__, "python": platform.python_version()},
        "settings": {"dtype": str(dtype).removeprefix("torch."), "vae_dtype": "float32", "encoder": args.encoder,
                     "guidance": args.guidance, "seed": SEED},
        "models": {},
        "note": "random-init weights with the real configs: PSNR is against the exact run of the same random model",
    }

    def save():
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1, default=str)

    last_threshold = None
    prev_model_baseline: dict | None = None  # the first model's baseline: step_s, flops, non-DiT seconds
    for name in [n.strip() for n in args.config.split(",") if n.strip()]:
        tiny = name == "tiny"
        s = SimpleNamespace(height=args.height or (64 if tiny else 544), width=args.width or (64 if tiny else 960),
                            frames=args.frames or (9 if tiny else 97),
                            steps=args.steps_14b if name == "14B" else args.steps, guidance=args.guidance,
                            max_len=args.max_len)
        variants = order_variants([v.strip() for v in (args.variants_14b if name == "14B" else args.variants).split(",")
                                   if v.strip()], best_fp8)
        from serve.pipeline.denoising import latent_shape

        lat = latent_shape(16, s.frames, s.height, s.width)
        tokens = lat[2] * (lat[3] // 2) * (lat[4] // 2)
        flops = dit_flops_per_forward(DIT_CONFIGS.get(name, DIT_CONFIGS["1.3B"]) if not tiny else
                                      dict(num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=2),
                                      tokens, s.max_len)
        entry = {"size": f"{s.width}x{s.height}", "frames": s.frames, "steps": s.steps, "latent_shape": list(lat),
                 "tokens": tokens, "dit_tflop_per_forward": round(flops / 1e12, 3), "variants": {}}
        result["models"][name] = entry
        elapsed = time.perf_counter() - start
        if prev_model_baseline is not None:
            pb = prev_model_baseline
            guess = pb["step_s"] * flops / pb["flops"] * s.steps + pb["other_s"]
            if elapsed + guess * 1.5 > args.budget_s:
                entry["skipped"] = f"predicted {guess:.0f}s for one run; {args.budget_s - elapsed:.0f}s left"
                log(f"{name}: skipped ({entry['skipped']})")
                save()
                continue
        log(f"{name}: building random-init models on {device} ({dtype})")
        c = build_components(name, device, dtype, args.encoder)
        entry["build_s"] = round(c.build_s, 1)
        entry["params_b"] = round(sum(p.numel() for p in c.transformer.parameters()) / 1e9, 3)
        log(f"{name}: built in {c.build_s:.1f}s, DiT {entry['params_b']}B params, {tokens} tokens/frame-batch")

        if device.type == "cuda" and prev_model_baseline is None:
            log(f"{name}: warm-up (1 step, no decode)")
            t0 = time.perf_counter()
            run_cinevivid(c, SimpleNamespace(**{**vars(s), "steps": 1}), device, decode=False)
            entry["warmup_s"] = round(time.perf_counter() - t0, 1)

        ref = None
        compiled = False
        baseline_s = None
        for v in variants:
            elapsed = time.perf_counter() - start
            est = (baseline_s or 0) * (1.0 if v != "vae_tiling" else 0.6) + (
                args.compile_estimate_s if v in ("compile", "best", "best_nocache") and not compiled and not tiny else 0)
            if baseline_s is not None and elapsed + est > args.budget_s:
                entry["variants"][v] = {"skipped": f"predicted {est:.0f}s; {args.budget_s - elapsed:.0f}s left"}
                log(f"{name}/{v}: skipped, over budget")
                save()
                continue
            log(f"{name}/{v}: running")
            rec: dict = {}
            kind, _, arg = v.partition("=")
            try:
                if v == "diffusers":
                    r = run_diffusers(c, s, device)
                elif v == "cinevivid":
                    r = run_cinevivid(c, s, device)
                elif v == "fp32":
                    r = run_fp32_diffusers(c, s, device, dtype)
                elif kind == "attn":
                    from serve.pipeline.attention_backend import set_attention_backend

                    rec["attention_backend"] = set_attention_backend(c.transformer, arg or "auto", device)
                    try:
                        r = run_cinevivid(c, s, device)
                    finally:
                        c.transformer.set_attention_backend("native")
                elif kind in ("step_cache", "cache_dit") and arg:
                    from serve.config import LeversConfig
                    from serve.pipeline.step_cache import make_step_cache

                    th = float(arg)
                    cache = make_step_cache(LeversConfig(
                        step_cache_threshold=th, step_cache_backend="first_block" if kind == "step_cache" else "cache_dit",
                        cache_dit_fn=args.cache_dit_fn, cache_dit_bn=args.cache_dit_bn,
                        cache_dit_taylorseer=args.cache_dit_taylorseer))
                    rec.update(threshold=th, step_cache_backend=kind.replace("step_cache", "first_block"))
                    r = run_cinevivid(c, s, device, cache=cache)
                    st = r.pop("step_cache")
                    rec["forwards_computed"], rec["forwards_skipped"] = st["computed"], st["skipped"]
                elif v == "fp8":
                    if compiled:
                        uncompile(c.transformer)
                        compiled = False
                    rec.update(ensure_fp8(c, device))
                    r = run_cinevivid(c, s, device)
                elif v == "cfg_batch":
                    from serve.pipeline.step_cache import StepCache

                    probe = StepCache(threshold=0.0)
                    r = run_cinevivid(c, s, device, cfg_batch=True, cache=probe)
                    rec["probe_changes"] = r.pop("step_cache")["branches"]["cfg"]["changes"]
                elif v in ("step_cache", "step_cache_dit", "compile", "best", "best_nocache"):
                    cache = None
                    backend = "cache_dit" if v == "step_cache_dit" else args.step_cache_backend
                    if v in ("step_cache", "step_cache_dit", "best"):
                        probe_changes = entry["variants"].get("cfg_batch", {}).get("probe_changes")
                        th = pick_threshold(args.step_cache_threshold, probe_changes, last_threshold)
                        last_threshold = th
                        from serve.config import LeversConfig
                        from serve.pipeline.step_cache import make_step_cache

                        if backend == "cache_dit":
                            th = min(th, 0.99)  # cache-dit reads >= 1 as "always reuse"
                        cache = make_step_cache(LeversConfig(
                            step_cache_threshold=th, step_cache_backend=backend,
                            cache_dit_fn=args.cache_dit_fn, cache_dit_bn=args.cache_dit_bn,
                            cache_dit_taylorseer=args.cache_dit_taylorseer))
                        rec["threshold"] = th
                        rec["step_cache_backend"] = backend
                    if v in ("best", "best_nocache"):
                        from serve.pipeline.attention_backend import set_attention_backend

                        if best_fp8:
                            if compiled and not getattr(c.transformer, "_cinevivid_fp8", None):
                                uncompile(c.transformer)
                                compiled = False
                            rec.update(ensure_fp8(c, device))
                        rec["attention_backend"] = set_attention_backend(c.transformer, args.best_attention, device)
                    if v in ("compile", "best", "best_nocache") and not compiled:
                        from serve.pipeline.levers import compile_transformer

                        t0 = time.perf_counter()
                        rec["compile_mode"] = compile_transformer(c.transformer)
                        compiled = True
                        # compile happens on the first call: one 1-step run at the same shapes
                        run_cinevivid(c, SimpleNamespace(**{**vars(s), "steps": 1}), device, cfg_batch=True,
                                      decode=False)
                        rec["compile_warmup_s"] = round(time.perf_counter() - t0, 1)
                        log(f"{name}/{v}: compiled + warm-up in {rec['compile_warmup_s']}s")
                    r = run_cinevivid(c, s, device, cfg_batch=v not in ("step_cache", "step_cache_dit"), cache=cache)
                    if cache is not None:
                        st = r.pop("step_cache")
                        rec["forwards_computed"], rec["forwards_skipped"] = st["computed"], st["skipped"]
                        rec["changes"] = {b: x["changes"] for b, x in st["branches"].items()}
                elif v == "vae_tiling":
                    src = entry.get("_latents")
                    if src is None:
                        raise RuntimeError("vae_tiling needs the cinevivid (or diffusers) latents first")
                    tv = run_vae_tiling(c, src, device)
                    rec.update({"untiled_s": round(tv["untiled"]["seconds"], 2), "untiled_peak_gib": tv["untiled"]["peak_gib"],
                                "tiled_s": round(tv["tiled"]["seconds"], 2), "tiled_peak_gib": tv["tiled"]["peak_gib"]})
                    rec.update(compare(tv["tiled"]["frames"], tv["untiled"]["frames"]))
                    entry["variants"][v] = rec
                    log(f"{name}/{v}: {rec}")
                    save()
                    continue
                else:
                    raise ValueError(f"unknown variant {v}")
            except LeverUnavailable as exc:  # the hardware cannot run this lever (fp8 on a CPU, ...)
                rec["refused"] = exc.message
                entry["variants"][v] = rec
                log(f"{name}/{v}: refused: {exc.message}")
                save()
                continue
            except Exception as exc:  # record and go on with the other variants
                rec["error"] = f"{type(exc).__name__}: {exc}"[:500]
                entry["variants"][v] = rec
                log(f"{name}/{v}: ERROR {rec['error']}")
                if v in ("compile", "best", "best_nocache") and compiled:
                    uncompile(c.transformer)  # undo a compile that failed at run time
                    compiled = False
                save()
                continue

            rec.update({"seconds": round(r["seconds"], 3), "step_s": r["step_s"] and round(r["step_s"], 4),
                        "peak_gib": r["peak_gib"]})
            if r["step_s"]:
                n_fwd = 2 if s.guidance > 1 else 1
                # with the step cache, skipped forwards count as done: an *effective* rate
                key = "dit_tflops_effective" if "forwards_skipped" in rec else "dit_tflops"
                rec[key] = round(flops * n_fwd / r["step_s"] / 1e12, 1)
            if ref is None:
                ref, ref_lat = r["frames"], r["latents"]
                rec["reference"] = True
                baseline_s = r["seconds"]
                if prev_model_baseline is None and r["step_s"]:
                    prev_model_baseline = {"step_s": r["step_s"], "flops": flops,
                                           "other_s": max(0.0, baseline_s - r["step_s"] * s.steps)}
            else:
                rec.update(compare(r["frames"], ref, r["latents"], ref_lat))
                rec["speedup_vs_ref"] = round(baseline_s / r["seconds"], 3)
            if v in ("cinevivid", "diffusers"):
                entry["_latents"] = r["latents"]
            entry["variants"][v] = rec
            log(f"{name}/{v}: " + ", ".join(f"{k}={x}" for k, x in rec.items() if k not in ("changes", "probe_changes")))
            save()
        entry.pop("_latents", None)
        ref_step = entry["variants"].get("diffusers", {}).get("step_s")
        nocache_step = entry["variants"].get("best_nocache", {}).get("step_s")
        if ref_step and nocache_step:  # to compare with LightX2V's 1.9x per step (no step cache)
            entry["per_step_speedup_no_step_cache"] = round(ref_step / nocache_step, 3)
        del c, ref
        r = None
        torch._dynamo.reset()  # compiled blocks hold references to the model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()

    result["total_s"] = round(time.perf_counter() - start, 1)
    save()
    print_summary(result)
    return 0


def print_summary(result: dict) -> None:
    print("\n== bench_gpu summary ==", result["machine"]["device"], result["settings"]["dtype"])
    print(f"{'model':6} {'variant':11} {'s/video':>8} {'s/step':>7} {'TFLOP/s':>8} {'peakGiB':>8} {'speedup':>8} "
          f"{'PSNR dB':>8} {'skipped':>8}")
    for name, e in result["models"].items():
        if "skipped" in e:
            print(f"{name:6} skipped: {e['skipped']}")
            continue
        for v, r in e["variants"].items():
            if "error" in r or "skipped" in r or "refused" in r:
                print(f"{name:6} {v:11} {r.get('error') or r.get('skipped') or 'refused: ' + r['refused']}")
                continue
            if v == "vae_tiling":
                print(f"{name:6} {v:11} untiled {r['untiled_s']}s/{r['untiled_peak_gib']}GiB, tiled "
                      f"{r['tiled_s']}s/{r['tiled_peak_gib']}GiB, PSNR {r['psnr_db']}")
                continue
            print(f"{name:6} {v:11} {r['seconds']:8.2f} {r.get('step_s') or 0:7.3f} {r.get('dit_tflops') or r.get('dit_tflops_effective') or 0:8.1f} "
                  f"{str(r.get('peak_gib')):>8} {r.get('speedup_vs_ref', 1.0):8.2f} {str(r.get('psnr_db', 'ref')):>8} "
                  f"{str(r.get('forwards_skipped', '')):>8}")
        if e.get("per_step_speedup_no_step_cache"):
            print(f"{name:6} per-step speedup without the step cache (best_nocache vs diffusers): "
                  f"{e['per_step_speedup_no_step_cache']}x")
    print(f"total {result.get('total_s')}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
