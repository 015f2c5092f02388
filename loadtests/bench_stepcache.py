"""Step cache backends compared at equal PSNR on CPU: the hand-written first-block cache
(`serve.pipeline.step_cache.StepCache`) vs cache-dit's DBCache (`serve.pipeline.step_cache.dbcache`,
Fn/Bn compute blocks, optional TaylorSeer), each swept over `step_cache_threshold`.

The model is the tiny random-weight SkyReels-V2 (tokenizer, text encoder, VAE and scheduler of
`build_tiny_pipeline(0)`) with a deeper transformer (`--layers`, default 8) so that skipping the
blocks after the probe saves most of a forward. Each setting runs `DenoiseLoop` (separate cond and
uncond calls, as the deployment runs without `cfg_batch`) for every seed; the decoded frames are
compared with the exact run (threshold 0) of the same seed:

  psnr_db        mean over seeds of the frames' PSNR against the exact run (peak 1.0)
  skipped        fraction of transformer forwards whose middle blocks were skipped
  block_frac     transformer blocks actually run / blocks of the exact run (the compute proxy:
                 a skipped forward still runs the Fn (+ Bn) blocks)
  wall_speedup   exact run's wall time / this setting's (whole loop; noisy on a shared box)

Equal-PSNR comparison: for each target (default 30, 35, 40, 45 dB) and each backend config, the setting
with psnr >= target that runs the fewest blocks. Caveat: random weights make the blocks' residuals
change from step to step quite unlike a trained model's, so the absolute thresholds and PSNRs do not
transfer to the real checkpoints; `loadtests/bench_gpu.py` measures those.

  python -m loadtests.bench_stepcache                 # ~5 min on a loaded 2-core CPU box (1 thread)
  python -m loadtests.bench_stepcache --steps 10 --thresholds 0.1,0.3 --configs first_block,cd_f1b0  # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

# name -> (backend, fn, bn, taylorseer)
CONFIGS = {
    "first_block": ("first_block", 1, 0, False),
    "cd_f1b0": ("cache_dit", 1, 0, False),  # same decisions as first_block (a check)
    "cd_f1b0_ts": ("cache_dit", 1, 0, True),
    "cd_f2b0": ("cache_dit", 2, 0, False),
    "cd_f1b1": ("cache_dit", 1, 1, False),
    "cd_f1b1_ts": ("cache_dit", 1, 1, True),
    "cd_f2b1_ts": ("cache_dit", 2, 1, True),
}
DEFAULT_THRESHOLDS = "0.05,0.1,0.15,0.2,0.3,0.5"
PROMPT, NEGATIVE = "a cat walks on the grass", "low quality"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def build(layers: int, seed: int = 0):
    """The tiny pipeline with a `layers`-block transformer (4 heads x 16, ffn 128; random, seeded)."""
    from diffusers import SkyReelsV2Transformer3DModel

    from serve.pipeline.tiny_model import TINY_TEXT_DIM, build_tiny_pipeline

    pipe = build_tiny_pipeline(seed)
    torch.manual_seed(seed + 100)
    pipe.transformer = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=TINY_TEXT_DIM, freq_dim=256, ffn_dim=128, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64).eval()
    return pipe


def make_cache(name: str, threshold: float):
    from serve.config import LeversConfig
    from serve.pipeline.step_cache import make_step_cache

    backend, fn, bn, ts = CONFIGS[name]
    return make_step_cache(LeversConfig(step_cache_threshold=threshold, step_cache_backend=backend,
                                        cache_dit_fn=fn, cache_dit_bn=bn, cache_dit_taylorseer=ts))


def run(pipe, embeds, args, seed: int, cache) -> tuple[np.ndarray, float]:
    from serve.pipeline.denoising import DenoiseJob, DenoiseLoop, LoopSettings, clone_scheduler_config
    from serve.pipeline.vae_decode import denormalize_and_decode, to_float_frames

    loop = DenoiseLoop(pipe.transformer, clone_scheduler_config(pipe.scheduler), torch.device("cpu"),
                       step_cache=cache)
    job = DenoiseJob(seed=seed, prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1])
    t0 = time.perf_counter()
    loop.run([job], LoopSettings(width=args.width, height=args.height, num_frames=args.frames,
                                 num_inference_steps=args.steps, guidance_scale=6.0, flow_shift=8.0))
    wall = time.perf_counter() - t0
    frames = to_float_frames(denormalize_and_decode(pipe.vae, torch.from_numpy(job.result)))
    return frames, wall


def best_at(points: list[dict], target: float) -> dict | None:
    ok = [p for p in points if p["psnr_db"] >= target]
    return min(ok, key=lambda p: (p["block_frac"], -p["psnr_db"])) if ok else None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--seeds", default="7")
    ap.add_argument("--thresholds", default=DEFAULT_THRESHOLDS)
    ap.add_argument("--configs", default="first_block,cd_f1b0_ts,cd_f2b0,cd_f1b1,cd_f1b1_ts",
                    help=f"comma list of: {', '.join(CONFIGS)}")
    ap.add_argument("--targets", default="30,35,40,45")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (keep the shared box usable)")
    ap.add_argument("--out", default="loadtests/results/stepcache_cpu_tiny.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("cache_dit").setLevel(logging.WARNING)
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")

    from serve.pipeline.text_encoding import encode_prompts

    pipe = build(args.layers)
    cpu = torch.device("cpu")
    embeds = (encode_prompts(pipe.tokenizer, pipe.text_encoder, [PROMPT], 512, cpu),
              encode_prompts(pipe.tokenizer, pipe.text_encoder, [NEGATIVE], 512, cpu))
    seeds = [int(s) for s in args.seeds.split(",")]
    thresholds = [float(t) for t in args.thresholds.split(",")]
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    targets = [float(t) for t in args.targets.split(",")]

    exact, exact_walls = {}, {}
    for seed in seeds:
        run(pipe, embeds, args, seed, None)  # warm-up
        exact[seed], exact_walls[seed] = run(pipe, embeds, args, seed, None)
    exact_wall = sum(exact_walls.values())
    forwards = 2 * args.steps
    points: dict[str, list[dict]] = {}
    for name in names:
        _, fn, bn, _ = CONFIGS[name]
        probe = fn + bn if CONFIGS[name][0] == "cache_dit" else 1
        points[name] = []
        for th in thresholds:
            vals, wall, skipped = [], 0.0, 0
            for seed in seeds:
                cache = make_cache(name, th)
                frames, w = run(pipe, embeds, args, seed, cache)
                vals.append(psnr(frames, exact[seed]))
                wall += w
                skipped += cache.skipped
            skip_frac = skipped / (forwards * len(seeds))
            blocks = (1 - skip_frac) * args.layers + skip_frac * probe
            p = {"threshold": th, "psnr_db": round(float(np.mean(vals)), 2), "psnr_min_db": round(min(vals), 2),
                 "skipped": round(skip_frac, 3), "block_frac": round(blocks / args.layers, 3),
                 "wall_s": round(wall, 3), "wall_speedup": round(exact_wall / wall, 3)}
            points[name].append(p)
            print(f"{name:12s} th={th:<5} psnr={p['psnr_db']:7.2f} skipped={p['skipped']:.2f} "
                  f"blocks={p['block_frac']:.2f} wall x{p['wall_speedup']:.2f}", flush=True)

    # the exact runs again at the end: the wall baseline is the faster of the two (a shared box)
    for seed in seeds:
        _, w = run(pipe, embeds, args, seed, None)
        exact_walls[seed] = min(exact_walls[seed], w)
    exact_wall = sum(exact_walls.values())
    for name in names:
        for p in points[name]:
            p["wall_speedup"] = round(exact_wall / p["wall_s"], 3)

    table = []
    for target in targets:
        for name in names:
            b = best_at(points[name], target)
            table.append({"target_db": target, "config": name, **(b or {})})

    lines = ["| PSNR target | config | threshold | PSNR dB (min) | forwards skipped | blocks run | "
             "block speedup | wall speedup |", "|---|---|---|---|---|---|---|---|"]
    for r in table:
        if "threshold" not in r:
            lines.append(f"| ≥ {r['target_db']:g} | {r['config']} | none reaches it | | | | | |")
            continue
        lines.append(f"| ≥ {r['target_db']:g} | {r['config']} | {r['threshold']:g} | {r['psnr_db']:.2f} "
                     f"({r['psnr_min_db']:.2f}) | {r['skipped']:.0%} | {r['block_frac']:.0%} | "
                     f"×{1 / r['block_frac']:.2f} | ×{r['wall_speedup']:.2f} |")
    md = "\n".join(lines)
    print("\n" + md)

    result = {
        "bench": "bench_stepcache",
        "machine": f"{platform.machine()} {os.cpu_count()}-core CPU, torch threads {args.threads}",
        "model": f"tiny random-weight SkyReels-V2 T2V, transformer {args.layers} layers (4x16 heads, ffn 128)",
        "settings": {k: getattr(args, k) for k in ("layers", "steps", "width", "height", "frames", "seeds")},
        "configs": {n: dict(zip(("backend", "fn", "bn", "taylorseer"), CONFIGS[n])) for n in names},
        "exact_wall_s": round(exact_wall, 3),
        "points": points,
        "equal_psnr": table,
        "markdown": md,
        "note": "random weights: PSNR is against the exact run of the same random model; thresholds do not "
                "transfer to trained checkpoints",
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
