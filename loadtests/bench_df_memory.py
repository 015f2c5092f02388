"""Long video by diffusion forcing: peak memory vs the number of windows, and time to the first
playable second vs time to the whole video (issue 10 items 3 and 4), measured in one run.

Each run is a fresh process (so its peak RSS is its own) that loads the embedded tiny model and makes
one DF video of N windows at 256x256, the way the deployments do it, in process (no Ray):

- `progressive` (what CineVivid does now): the DF loop keeps only the overlap (`keep_result=False`),
  each window's final latents are decoded at once through one `CausalDecodeSession` (the Wan VAE's
  causal cache carried over), the frames go into the final MP4 writer and the fragmented-MP4
  preview, and are dropped (only the thumbnail frame is kept);
- `whole` (before): the loop keeps the whole video's latents, they are decoded all at once after the
  last window and every frame is kept until the MP4 is written.

The timings are relative to the start of the generation (model loaded): the first playable second is
when the preview first holds >= 1 s of video.

  python -m loadtests.bench_df_memory --out loadtests/results/bench_df_memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SIZE, FPS, BASE, OVERLAP, STEPS = 256, 16, 17, 5, 2  # windows of 5 latent frames, each adding 3 (12 frames)


def frames_for(windows: int) -> int:
    latent = 5 + (windows - 1) * 3
    return 4 * (latent - 1) + 1


def run_one(windows: int, mode: str) -> dict:
    import numpy as np
    import torch

    from serve.media.fmp4 import FragmentedPreview
    from serve.media.mp4 import Mp4Writer, encode_mp4, thumbnail_jpeg
    from serve.pipeline.diffusion_forcing import DFJob, DFSettings, DiffusionForcingLoop
    from serve.pipeline.tiny_model import build_tiny_pipeline
    from serve.pipeline.vae_decode import CausalDecodeSession, iter_decode, video_to_uint8

    torch.set_num_threads(2)
    pipe = build_tiny_pipeline(seed=0)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt("a long walk", None, do_classifier_free_guidance=False,
                                       max_sequence_length=512, device=torch.device("cpu"))
    loop = DiffusionForcingLoop(pipe.transformer, dict(pipe.scheduler.config), torch.device("cpu"))
    num_frames = frames_for(windows)
    settings = DFSettings(width=SIZE, height=SIZE, num_frames=num_frames, num_inference_steps=STEPS,
                          guidance_scale=1.0, flow_shift=pipe.scheduler.config.flow_shift, fps=FPS,
                          base_num_frames=BASE, overlap_history=OVERLAP, ar_step=0, causal_block_size=1,
                          addnoise_condition=0.0)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out: dict = {"windows": windows, "mode": mode, "num_frames": num_frames, "first_playable_s": None}
    if mode == "progressive":
        session = CausalDecodeSession(pipe.vae)
        writer = Mp4Writer(SIZE, SIZE, FPS)
        preview = FragmentedPreview(SIZE, SIZE, FPS)
        state = {"done": 0, "thumb": None, "preview_bytes": 0}

        def on_window(index, num_windows, latents):
            first = True
            for video in session.decode(torch.from_numpy(latents)):
                frames = video_to_uint8(video)
                middle = num_frames // 2 - state["done"]
                if 0 <= middle < len(frames):
                    state["thumb"] = frames[middle].copy()
                writer.add(frames)
                preview.add(frames, keyframe=first)
                first = False
                state["done"] += len(frames)
            state["preview_bytes"] += len(preview.cut())
            if out["first_playable_s"] is None and preview.playable_s >= 1.0:
                out["first_playable_s"] = time.perf_counter() - t0

        loop.run(DFJob(seed=1, prompt_embeds=embeds.numpy(), negative_prompt_embeds=None, on_window=on_window,
                       keep_result=False), settings)
        mp4 = writer.finish()
        thumbnail_jpeg(state["thumb"][None])
        preview.close()
        assert state["done"] == num_frames
    else:
        job = DFJob(seed=1, prompt_embeds=embeds.numpy(), negative_prompt_embeds=None)
        loop.run(job, settings)
        frames = np.concatenate([video_to_uint8(v) for v in iter_decode(pipe.vae, torch.from_numpy(job.result))])
        mp4 = encode_mp4(frames, FPS)
        thumbnail_jpeg(frames)
        out["first_playable_s"] = time.perf_counter() - t0  # nothing is playable before the end
    out["total_s"] = time.perf_counter() - t0
    out["mp4_bytes"] = len(mp4)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["peak_rss_mib"] = round(peak / 1024, 1)
    out["rss_after_load_mib"] = round(rss_before / 1024, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", default="2,4,8")
    ap.add_argument("--modes", default="progressive,whole")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # "windows:mode": run one in this process
    ap.add_argument("--out", default="loadtests/results/bench_df_memory.json")
    args = ap.parse_args(argv)
    if args.one:
        windows, mode = args.one.split(":")
        print(json.dumps(run_one(int(windows), mode)))
        return 0
    results = []
    for mode in args.modes.split(","):
        for windows in map(int, args.windows.split(",")):
            proc = subprocess.run([sys.executable, "-m", "loadtests.bench_df_memory", "--one", f"{windows}:{mode}"],
                                  capture_output=True, text=True, check=True)
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    summary = {}
    for mode in args.modes.split(","):
        peaks = [r["peak_rss_mib"] for r in results if r["mode"] == mode]
        summary[mode] = {"peak_rss_mib": peaks, "max_over_min": round(max(peaks) / min(peaks), 3)}
    report = {"size": f"{SIZE}x{SIZE}", "fps": FPS, "base_num_frames": BASE, "overlap_history": OVERLAP,
              "steps": STEPS, "runs": results, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
