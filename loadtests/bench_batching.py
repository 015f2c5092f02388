"""Request batching benchmark: two same-shape jobs denoised as one batch vs one after the other.

Runs CineVivid's `DenoiseLoop` (what the `Transformer` deployment runs) in process on the embedded
tiny model, for the tiny and small workloads, with CFG as two forwards and as one batched forward.
Reports wall time of the denoising (sequential vs batched, medians over --runs, interleaved), the
speed-up, and max |Δ| between the batched and the unbatched latents (must be ~0: batching is exact).
On a CPU the DiT is compute-bound already at batch 1, so the gain is small; on a GPU a batch fills
the chip better (see loadtests/RESULTS.md).

  python -m loadtests.bench_batching --out loadtests/results/bench_batching.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

WORKLOADS = {
    "tiny": dict(width=64, height=64, num_frames=9, num_inference_steps=4),
    "small": dict(width=256, height=256, num_frames=33, num_inference_steps=20),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="tiny,small")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: a model stage's default, the node's cores)")
    ap.add_argument("--out", default="loadtests/results/bench_batching.json")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from loadtests.stack import set_threads

    args.threads = set_threads(args.threads)  # what the Transformer stage uses by default, unless given
    print(f"bench_batching: torch threads {args.threads}", flush=True)
    from serve.pipeline.denoising import DenoiseJob, DenoiseLoop, LoopSettings, clone_scheduler_config
    from serve.pipeline.text_encoding import encode_prompts
    from serve.pipeline.tiny_model import build_tiny_pipeline

    dev = torch.device("cpu")
    pipe = build_tiny_pipeline(0)
    prompts = ["a red fox in the snow", "a paper boat on a river"]
    cond = [encode_prompts(pipe.tokenizer, pipe.text_encoder, [p], 512, dev) for p in prompts]
    uncond = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""], 512, dev)
    loop = DenoiseLoop(pipe.transformer, clone_scheduler_config(pipe.scheduler), dev)

    def jobs():
        return [DenoiseJob(seed=10 + k, prompt_embeds=cond[k], negative_prompt_embeds=uncond) for k in range(2)]

    result = {"benchmark": "bench_batching", "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m loadtests.bench_batching " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                          "torch_threads": args.threads, "torch": torch.__version__,
                          "loadavg_start": os.getloadavg()},
              "model": "embedded tiny SkyReels-V2, fp32 CPU, guidance 6", "cases": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        for cfg_batch in (False, True):
            s = LoopSettings(guidance_scale=6.0, flow_shift=8.0, cfg_batch=cfg_batch, **WORKLOADS[name])
            seq_t, bat_t = [], []
            diff = 0.0
            loop.run(jobs()[:1], s)  # warm-up
            for _ in range(args.runs):
                a = jobs()
                t0 = time.perf_counter()
                loop.run(a[:1], s)
                loop.run(a[1:], s)
                seq_t.append(time.perf_counter() - t0)
                b = jobs()
                t0 = time.perf_counter()
                loop.run(b, s)
                bat_t.append(time.perf_counter() - t0)
                diff = max(diff, *(float(np.abs(x.result - y.result).max()) for x, y in zip(a, b)))
            case = {"workload": name, "spec": WORKLOADS[name], "cfg_batch": cfg_batch,
                    "sequential_s": round(statistics.median(seq_t), 4), "batched_s": round(statistics.median(bat_t), 4),
                    "max_abs_diff": diff}
            case["speedup"] = round(case["sequential_s"] / case["batched_s"], 3)
            result["cases"].append(case)
            print(f"{name:6} cfg_batch={cfg_batch!s:5}  two jobs sequential {case['sequential_s']:.3f}s  "
                  f"batched {case['batched_s']:.3f}s  speed-up {case['speedup']:.2f}x  max|Δ| {diff:.1e}", flush=True)
            out.write_text(json.dumps(result, indent=1))
    result["machine"]["loadavg_end"] = os.getloadavg()
    out.write_text(json.dumps(result, indent=1))
    print(f"load average {result['machine']['loadavg_start']} -> {result['machine']['loadavg_end']}; written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
