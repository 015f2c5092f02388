"""Fair sharing benchmark: a short job submitted during a long diffusion-forcing job, with the
Transformer yielding between windows (`levers.df_yield_every` "window"), between steps ("step"),
or not at all ("job", the behaviour before fair sharing).

Deploys the generation graph (no HTTP) on the embedded tiny model, once per mode, and drives the
`Transformer` deployment through its Serve handle with embeddings from the `TextEncoder`, so what
is timed is the Transformer's scheduling: submission to final latents. Per mode and run: the long
job starts; when its step events show it is in the middle of its third window, the short job is
submitted. Reported (medians over --runs): the short job's latency, the bound it should meet (one
window of the long job + the short job alone; the window's time is the median of the long job's
window times in that same run, from its step events, which keeps a busy host's drift out of the
ratio), the long job's total time alone and with the short job, and max |Δ| between the long job's
latents and the same job run alone (must be 0: interleaving is exact).

  CINEVIVID_CACHE_DIR=/tmp/cv-bench python -m loadtests.bench_df_fairness --out loadtests/results/bench_df_fairness.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from serve.stages import GENERATOR, TEXT_ENCODER, TRANSFORMER

# The long job: 8 windows of 17 frames (5 latent frames) carrying 5 (2 latent) = 101 frames, guidance 6
LONG = dict(prompt="a long walk along the coast at dawn", negative_prompt="blurry, low quality", seed=21,
            width=64, height=64, num_frames=101, num_inference_steps=8, guidance_scale=6.0, base_num_frames=17,
            overlap_history=5, ar_step=0, causal_block_size=1, addnoise_condition=20.0, fps=8)
LONG_WINDOWS = 8
# The short job: a plain T2V clip
SHORT = dict(prompt="a short clip of a cat on a wall", seed=3, width=64, height=64, num_frames=9,
             num_inference_steps=4, guidance_scale=6.0, negative_prompt="blurry, low quality")
MODES = ("job", "window", "step")


async def _prepare(generator, encoder, spec: dict):
    from serve.contracts import ResolvedSpec

    resolved = ResolvedSpec.model_validate(await generator.check.remote(spec))
    embeds = await encoder.encode.remote(resolved.prompt, resolved.negative_prompt if resolved.do_cfg else None)
    return resolved, embeds


async def _denoise(transformer, spec, embeds, job_id: str, on_step=None):
    """(latents, seconds from submission to the latents)."""
    from serve.contracts import DenoisedLatents

    t0 = time.perf_counter()
    latents = None
    async for event in transformer.options(stream=True).denoise.remote(embeds, spec, job_id):
        if isinstance(event, DenoisedLatents):
            latents = await event.ref[0]
        elif event.type == "step" and on_step is not None:
            on_step(event)
    return latents, time.perf_counter() - t0


async def _measure(app: str, runs: int) -> dict:
    import numpy as np
    from ray import serve

    generator = serve.get_deployment_handle(GENERATOR.deployment, app_name=app)
    encoder = serve.get_deployment_handle(TEXT_ENCODER.deployment, app_name=app)
    transformer = serve.get_deployment_handle(TRANSFORMER.deployment, app_name=app)
    long_spec, long_embeds = await _prepare(generator, encoder, LONG)
    short_spec, short_embeds = await _prepare(generator, encoder, SHORT)
    await _denoise(transformer, short_spec, short_embeds, "warm-up")
    rows = []
    for run in range(runs):
        short_alone = (await _denoise(transformer, short_spec, short_embeds, f"short-alone-{run}"))[1]
        alone, long_alone = await _denoise(transformer, long_spec, long_embeds, f"long-alone-{run}")
        mid_third_window = asyncio.Event()
        window_ends = [time.perf_counter()]

        def on_step(event):
            per_window = event.total_steps // LONG_WINDOWS
            if event.step % per_window == 0:
                window_ends.append(time.perf_counter())
            if event.step >= 2 * per_window + per_window // 2:
                mid_third_window.set()

        long_task = asyncio.create_task(_denoise(transformer, long_spec, long_embeds, f"long-{run}", on_step))
        await mid_third_window.wait()
        short_latents, short_during = await _denoise(transformer, short_spec, short_embeds, f"short-{run}")
        interleaved, long_during = await long_task
        window_s = statistics.median(b - a for a, b in zip(window_ends, window_ends[1:]))
        row = {"short_alone_s": short_alone, "long_alone_s": long_alone, "window_s": window_s,
               "short_during_long_s": short_during, "long_with_short_s": long_during,
               "long_max_abs_diff": float(np.abs(interleaved - alone).max())}
        row["bound_s"] = row["window_s"] + short_alone
        rows.append(row)
        print("   " + "  ".join(f"{k} {v:.3g}" for k, v in row.items()), flush=True)
    med = {k: round(statistics.median(r[k] for r in rows), 4) for k in rows[0] if k != "long_max_abs_diff"}
    med["long_max_abs_diff"] = max(r["long_max_abs_diff"] for r in rows)
    med["short_latency_over_bound"] = round(med["short_during_long_s"] / med["bound_s"], 3)
    return {"runs": rows, "median": med}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="loadtests/results/bench_df_fairness.json")
    args = ap.parse_args(argv)

    from loadtests.stack import app_args, set_threads

    set_threads(args.threads)
    import ray
    import torch
    from ray import serve

    from serve.app import build_app
    from serve.ops.serve_env import free_port
    from serve.pipeline.loading import tiny_model_path
    from serve.pipeline.tiny_model import make_tiny_model

    make_tiny_model(tiny_model_path())
    result = {"benchmark": "bench_df_fairness", "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m loadtests.bench_df_fairness " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                          "torch_threads": args.threads, "torch": torch.__version__, "loadavg_start": os.getloadavg()},
              "model": "embedded tiny SkyReels-V2 (DF config), fp32 CPU", "long": LONG, "short": SHORT, "modes": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=500_000_000)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        with tempfile.TemporaryDirectory(prefix="cinevivid-bench-") as data_dir:
            for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
                app = f"df-fair-{mode}"
                serve.run(build_app(app_args(Path(data_dir), name=app, with_ingress=False,
                                             levers={"df_yield_every": mode})), name=app, route_prefix=None)
                print(f"df_yield_every={mode}", flush=True)
                result["modes"][mode] = asyncio.run(_measure(app, args.runs))
                m = result["modes"][mode]["median"]
                print(f"df_yield_every={mode:6}  short alone {m['short_alone_s']:.2f}s  one window "
                      f"{m['window_s']:.2f}s  short during long {m['short_during_long_s']:.2f}s "
                      f"(bound {m['bound_s']:.2f}s, x{m['short_latency_over_bound']:.2f})  long alone "
                      f"{m['long_alone_s']:.2f}s, with short {m['long_with_short_s']:.2f}s  "
                      f"max|Δ| {m['long_max_abs_diff']:.1e}", flush=True)
                serve.delete(app)
                out.write_text(json.dumps(result, indent=1))
    finally:
        serve.shutdown()
        ray.shutdown()
    result["machine"]["loadavg_end"] = os.getloadavg()
    out.write_text(json.dumps(result, indent=1))
    print(f"load average {result['machine']['loadavg_start']} -> {result['machine']['loadavg_end']}; written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
