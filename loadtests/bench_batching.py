"""Request batching benchmark: two same-shape jobs denoised as one batch vs one after the other.

Runs CineVivid's `DenoiseLoop` (what the `Transformer` deployment runs) in process on the embedded
tiny model, for the tiny and small workloads, with CFG as two forwards and as one batched forward.
Reports wall time of the denoising (sequential vs batched, medians over --runs, interleaved), the
speed-up, and max |Δ| between the batched and the unbatched latents (must be ~0: batching is exact).
On a CPU the DiT is compute-bound already at batch 1, so the gain is small; on a GPU a batch fills
the chip better (see loadtests/RESULTS.md).

  python -m loadtests.bench_batching --out loadtests/results/bench_batching.json

With --sizes it instead compares, per size, for one model config (--config tiny, or 1.3B: the real
SkyReels-V2 1.3B transformer config with random weights built on the device, bf16 on CUDA, random
(1, 512, 4096) prompt embeddings instead of a text encoder, UniPC as loadtests/bench_gpu.py):

  sequential   N jobs with the same steps, one after another (`loop.run([job])` each), all at t=0
  request      the same N jobs as one request-level batch (`loop.run(jobs)`), all at t=0
  seq-arrival  N jobs with different steps (steps, steps+2, ...) arriving staggered, run one after
               another in arrival order (job k waits for the jobs before it); computed from each job's
               measured solo time and the arrival times of the `step` run
  step         the same staggered jobs through `serve.pipeline.continuous.ContinuousBatch`: job 1
               starts, job k joins once the engine has run (k-1)*J steps (J = --join-every); only
               step-level batching can batch jobs whose steps differ

Per mode: wall time until all N are done, mean / p50 job latency (arrival -> finish), jobs/s, and max
|Δ| of each job's latents vs its solo run (CPU fp32: must be <= 1e-5; GPU bf16: reported).

  python -m loadtests.bench_batching --config tiny --sizes 64x64x9:3 --out /tmp/bb_tiny.json
  python3 -m loadtests.bench_batching --config 1.3B --sizes 320x192x33:4,960x544x97:2 --steps 8 \
      --guidance 6 --budget-s 200 --out $OUT/bench_batching_13b.json
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="tiny,small", help="without --sizes: the two-job comparison's workloads")
    ap.add_argument("--runs", type=int, default=3, help="without --sizes: repetitions (medians)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads on a CPU (default: a model stage's default, the node's cores)")
    ap.add_argument("--sizes", default=None,
                    help="WxHxF[:N],...: run the sequential / request / step-level comparison instead")
    ap.add_argument("--config", default="tiny", choices=["tiny", "1.3B"], help="with --sizes: the model")
    ap.add_argument("--jobs", type=int, default=None,
                    help="jobs per size without :N (default: 4, or 2 from 540P-sized videos up)")
    ap.add_argument("--steps", type=int, default=None, help="base steps (default: tiny 4, 1.3B 8)")
    ap.add_argument("--step-increment", type=int, default=2, help="step-level jobs: steps + k * this")
    ap.add_argument("--join-every", type=int, default=2, help="J: job k joins after (k-1)*J engine steps")
    ap.add_argument("--guidance", type=float, default=6.0)
    ap.add_argument("--flow-shift", type=float, default=8.0)
    ap.add_argument("--cfg-batch", action="store_true", help="cond + uncond rows in one transformer call")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="transformer dtype (cuda: bfloat16, cpu: float32)")
    ap.add_argument("--budget-s", type=float, default=None, help="skip phases predicted to end past this")
    ap.add_argument("--out", default=None,
                    help="JSON (default loadtests/results/bench_batching.json, with --sizes bench_batching_sizes.json)")
    args = ap.parse_args(argv)
    if args.sizes:
        return run_sizes(args, argv)
    args.out = args.out or "loadtests/results/bench_batching.json"

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


# -- sequential / request / step-level batching, per size ----------------------------------------

TOL_FP32 = 1e-5


def parse_sizes(spec: str, default_jobs: int | None) -> list[dict]:
    """'960x544x97:2,320x192x33' -> [{width, height, num_frames, jobs}]; jobs default: --jobs, else
    4, or 2 for videos of 540P size and up (the batch a 540P job is recommended at)."""
    out = []
    for item in [x.strip() for x in spec.split(",") if x.strip()]:
        dims, _, n = item.partition(":")
        try:
            w, h, f = (int(v) for v in dims.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--sizes: {item!r} is not WxHxF[:N]")
        if w % 16 or h % 16 or (f - 1) % 4:
            raise SystemExit(f"--sizes: {item!r}: width/height must be multiples of 16, frames 4k+1")
        jobs = int(n) if n else (default_jobs or (2 if w * h * f >= 960 * 544 * 49 else 4))
        out.append(dict(width=w, height=h, num_frames=f, jobs=jobs))
    return out


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device):
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def build_model(config: str, device, dtype, n_prompts: int):
    """(transformer, scheduler_config, [prompt embeds (1, L, D) fp32 numpy] * n_prompts, uncond, label)."""
    import numpy as np
    import torch

    from serve.pipeline.levers import cast_model

    if config == "tiny":
        from serve.pipeline.denoising import clone_scheduler_config
        from serve.pipeline.text_encoding import encode_prompts
        from serve.pipeline.tiny_model import build_tiny_pipeline

        pipe = build_tiny_pipeline(0)
        prompts = ["a red fox in the snow", "a paper boat on a river", "a kite over a field", "a city at night"]
        cpu = torch.device("cpu")
        conds = [encode_prompts(pipe.tokenizer, pipe.text_encoder, [prompts[k % len(prompts)]],
                                512, cpu) for k in range(n_prompts)]
        uncond = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""], 512, cpu)
        transformer = pipe.transformer.to(device)
        if dtype != torch.float32:
            cast_model(transformer, dtype)
        return transformer, clone_scheduler_config(pipe.scheduler), conds, uncond, "embedded tiny SkyReels-V2"

    from diffusers import SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

    from loadtests.bench_gpu import DIT_CONFIGS, SCHEDULER

    torch.manual_seed(0)
    with torch.device(device):
        transformer = SkyReelsV2Transformer3DModel(**DIT_CONFIGS[config]).eval()
    cast_model(transformer, dtype)  # as from_pretrained(torch_dtype=dtype): norms/rope/time stay fp32
    text_dim = DIT_CONFIGS[config]["text_dim"]

    def emb(seed):
        return torch.randn((1, 512, text_dim), generator=torch.Generator().manual_seed(seed)).numpy().astype(np.float32)

    conds = [emb(1000 + k) for k in range(n_prompts)]
    scheduler_config = dict(UniPCMultistepScheduler(**SCHEDULER).config)
    _sync(device)
    return transformer, scheduler_config, conds, emb(999), f"SkyReels-V2 {config} config, random weights"


def _stats(lat: list[float], wall: float, n: int) -> dict:
    return {"wall_s": round(wall, 4), "mean_latency_s": round(statistics.mean(lat), 4),
            "p50_latency_s": round(statistics.median(lat), 4), "jobs_per_s": round(n / wall, 4) if wall > 0 else None,
            "latencies_s": [round(x, 4) for x in lat]}


def run_sizes(args, argv) -> int:
    import numpy as np
    import torch

    t_start = time.perf_counter()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if device.type == "cpu":
        from loadtests.stack import set_threads

        args.threads = set_threads(args.threads)
    steps = args.steps or (8 if args.config != "tiny" else 4)
    sizes = parse_sizes(args.sizes, args.jobs)
    budget = args.budget_s if args.budget_s is not None else float("inf")
    out = Path(args.out or "loadtests/results/bench_batching_sizes.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    from serve.pipeline.continuous import ContinuousBatch
    from serve.pipeline.denoising import DenoiseJob, DenoiseLoop, LoopSettings

    def log(msg):
        print(f"[bench_batching {time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    n_max = max(sz["jobs"] for sz in sizes)
    transformer, sched_cfg, conds, uncond, label = build_model(args.config, device, dtype, n_max)
    loop = DenoiseLoop(transformer, sched_cfg, device)
    cfg = args.guidance > 1.0
    exact_required = dtype == torch.float32 and device.type == "cpu"
    import diffusers

    result = {"benchmark": "bench_batching_sizes",
              "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m loadtests.bench_batching " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                          else (platform.processor() or platform.machine()), "cpus": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "diffusers": diffusers.__version__, "python": platform.python_version()},
              "settings": {"config": args.config, "model": label, "dtype": str(dtype).removeprefix("torch."),
                           "steps": steps, "step_increment": args.step_increment, "join_every": args.join_every,
                           "guidance": args.guidance, "flow_shift": args.flow_shift, "cfg_batch": args.cfg_batch,
                           "budget_s": args.budget_s, "model_build_s": round(time.perf_counter() - t_start, 2)},
              "sizes": []}
    log(f"{label} on {device} ({result['settings']['dtype']}), built in {result['settings']['model_build_s']}s")

    def save():
        out.write_text(json.dumps(result, indent=1, default=str))

    def job(k):
        return DenoiseJob(seed=10 + k, prompt_embeds=conds[k], negative_prompt_embeds=uncond if cfg else None)

    def settings(sz, n_steps):
        return LoopSettings(width=sz["width"], height=sz["height"], num_frames=sz["num_frames"],
                            num_inference_steps=n_steps, guidance_scale=args.guidance, flow_shift=args.flow_shift,
                            cfg_batch=args.cfg_batch)

    def solo(k, s) -> tuple[np.ndarray, float]:
        j = job(k)
        _sync(device)
        t0 = time.perf_counter()
        loop.run([j], s)
        _sync(device)
        return j.result, time.perf_counter() - t0

    def maxdiff(a, b) -> float:
        return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())

    ok = True
    for sz in sizes:
        n, name = sz["jobs"], f"{sz['width']}x{sz['height']}x{sz['num_frames']}"
        mixed = [steps + k * args.step_increment for k in range(n)]
        entry = {"size": name, "jobs": n, "steps_same": steps, "steps_mixed": mixed, "modes": {}}
        result["sizes"].append(entry)
        # warm-up (kernels, allocator) and the per-step time that predicts the phases for the budget
        _, w1 = solo(0, settings(sz, 1))
        _, w2 = solo(0, settings(sz, 2))
        t_step = max(w2 - w1, w2 / 2, 1e-4)
        entry["warmup_step_s"] = round(t_step, 4)
        log(f"{name}: {n} jobs, warm-up {w1:.2f}s + {w2:.2f}s, ~{t_step:.3f}s/step solo")

        def over(phase, n_steps):
            est = n_steps * t_step * 1.1
            left = budget - (time.perf_counter() - t_start)
            if est > left:
                entry["modes"][phase] = {"skipped": f"predicted {est:.0f}s; {left:.0f}s left of --budget-s"}
                log(f"{name}/{phase}: skipped, predicted {est:.0f}s, {left:.0f}s left")
                save()
                return True
            return False

        # 1. sequential, same steps
        if over("sequential", n * steps):
            continue
        _peak_reset(device)
        refs, durs = [], []
        for k in range(n):
            r, d = solo(k, settings(sz, steps))
            refs.append(r)
            durs.append(d)
        lat = list(np.cumsum(durs))
        entry["modes"]["sequential"] = dict(_stats(lat, lat[-1], n), steps=[steps] * n, max_abs_diff=0.0,
                                            peak_gib=_peak_gib(device))
        t_step = sum(durs) / (n * steps)
        log(f"{name}/sequential: {lat[-1]:.2f}s for {n} jobs ({t_step:.3f}s/step)")
        save()

        # 2. step-level: staggered arrivals, different steps; baseline: the same jobs solo in arrival order
        if not over("step", sum(mixed[1:]) + sum(mixed)):
            mixed_refs, mixed_durs = [refs[0]], [durs[0]]
            for k in range(1, n):
                r, d = solo(k, settings(sz, mixed[k]))
                mixed_refs.append(r)
                mixed_durs.append(d)
            batch = ContinuousBatch(loop, token_budget=1 << 62, max_size=n, cfg_batch=args.cfg_batch)
            jobs = [job(k) for k in range(n)]
            index = {id(j): k for k, j in enumerate(jobs)}
            arrive, finish, join_step = [0.0] * n, [0.0] * n, [0] * n
            pending, engine, sizes_seen = list(range(n)), 0, []
            _peak_reset(device)
            t0 = time.perf_counter()
            while pending or not batch.empty:
                while pending and (engine >= pending[0] * args.join_every or batch.empty):
                    k = pending.pop(0)
                    arrive[k], join_step[k] = time.perf_counter() - t0, engine
                    batch.join(jobs[k], settings(sz, mixed[k]))
                sizes_seen.append(len(batch.active))
                left = batch.step()
                engine += 1
                _sync(device)
                now = time.perf_counter() - t0
                for j in left:
                    finish[index[id(j)]] = now
            wall = max(finish)
            diffs = [maxdiff(j.result, r) for j, r in zip(jobs, mixed_refs)]
            entry["modes"]["step"] = dict(_stats([finish[k] - arrive[k] for k in range(n)], wall, n), steps=mixed,
                                          arrival_s=[round(a, 4) for a in arrive], join_after_steps=join_step,
                                          engine_steps=engine, mean_batch=round(statistics.mean(sizes_seen), 3),
                                          max_abs_diff=max(diffs), max_abs_diff_per_job=diffs,
                                          peak_gib=_peak_gib(device))
            # sequential in arrival order (the same arrival times): job k starts when it has arrived and
            # the job before it is done; from the measured solo times
            t, lat = 0.0, []
            for k in range(n):
                t = max(t, arrive[k]) + mixed_durs[k]
                lat.append(t - arrive[k])
            entry["modes"]["seq-arrival"] = dict(_stats(lat, t, n), steps=mixed, arrival_s=[round(a, 4) for a in arrive],
                                                 solo_s=[round(d, 4) for d in mixed_durs], max_abs_diff=0.0)
            log(f"{name}/step: {wall:.2f}s for {n} jobs ({engine} engine steps, mean batch "
                f"{statistics.mean(sizes_seen):.2f}) vs {t:.2f}s one after another; max|Δ| {max(diffs):.1e}")
            save()

        # 3. request-level batch, same steps
        if not over("request", n * steps):
            jobs = [job(k) for k in range(n)]
            _peak_reset(device)
            _sync(device)
            t0 = time.perf_counter()
            loop.run(jobs, settings(sz, steps))
            _sync(device)
            wall = time.perf_counter() - t0
            diffs = [maxdiff(j.result, r) for j, r in zip(jobs, refs)]
            entry["modes"]["request"] = dict(_stats([wall] * n, wall, n), steps=[steps] * n, max_abs_diff=max(diffs),
                                             max_abs_diff_per_job=diffs, peak_gib=_peak_gib(device))
            log(f"{name}/request: {wall:.2f}s for {n} jobs; max|Δ| {max(diffs):.1e}")
            save()

        if exact_required:
            for mode, m in entry["modes"].items():
                if m.get("max_abs_diff", 0.0) > TOL_FP32:
                    ok = False
                    log(f"{name}/{mode}: max|Δ| {m['max_abs_diff']:.1e} > {TOL_FP32} on fp32 CPU - NOT exact")

    result["total_s"] = round(time.perf_counter() - t_start, 2)
    result["exact_fp32"] = ok if exact_required else None
    save()
    print_table(result)
    print(f"written {out}")
    return 0 if ok else 1


def print_table(result: dict) -> None:
    st = result["settings"]
    print(f"\n{st['model']}, {st['dtype']}, {result['machine']['device']}, guidance {st['guidance']}, "
          f"steps {st['steps']} (+{st['step_increment']} per job for seq-arrival/step), join every "
          f"{st['join_every']} steps, cfg_batch {st['cfg_batch']}\n")
    print("| size | jobs | mode | steps | wall s | mean latency s | p50 latency s | jobs/s | speed-up | max abs Δ |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    base_of = {"sequential": "sequential", "request": "sequential", "seq-arrival": "seq-arrival",
               "step": "seq-arrival"}
    for e in result["sizes"]:
        for mode in ("sequential", "request", "seq-arrival", "step"):
            m = e["modes"].get(mode)
            if m is None:
                continue
            if "skipped" in m:
                print(f"| {e['size']} | {e['jobs']} | {mode} | | skipped: {m['skipped']} | | | | | |")
                continue
            base = e["modes"].get(base_of[mode], {})
            speed = f"{base['wall_s'] / m['wall_s']:.2f}x" if base.get("wall_s") and m["wall_s"] else ""
            steps = ",".join(str(x) for x in m["steps"])
            print(f"| {e['size']} | {e['jobs']} | {mode} | {steps} | {m['wall_s']:.3f} | {m['mean_latency_s']:.3f} | "
                  f"{m['p50_latency_s']:.3f} | {m['jobs_per_s']:.3f} | {speed} | {m['max_abs_diff']:.1e} |")
    print()


if __name__ == "__main__":
    sys.exit(main())
