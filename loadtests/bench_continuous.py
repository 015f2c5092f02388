"""Step-level (continuous) batching vs request-level batching vs none, under Poisson arrivals.

Starts the stack as `cinevivid up` does (loadtests/stack.py: serve_config.yaml, deviations printed)
and drives the default model's Generator through a Serve handle with jobs arriving as a Poisson
process at several rates. Each job draws its steps from --steps (users pick their own), so
request-level batching, which needs the same steps, guidance and shift, only joins identical jobs,
while step-level batching joins any job of the same size between two steps. The three modes are
the Transformer's live levers, switched by redeploying the same config (the replicas are
reconfigured in place, no model reload):

  none       batch_max_size 1
  request    batch_max_size --batch, batch_wait_timeout_s --wait-s (jobs gather for that long)
  step       continuous_batching true, batch_max_size --batch

For each mode and rate: throughput (completed jobs per minute over the span from the first arrival
to the last completion), p50/p95 job latency (submit -> result), the Transformer's batch sizes.
Rates are multiples (--rates) of the measured solo rate (1 / the median time of one job alone).

  python -m loadtests.bench_continuous --out loadtests/results/bench_continuous.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from serve.stages import GENERATOR, TRANSFORMER

MODES = {
    "none": lambda a: {"batch_max_size": 1, "continuous_batching": False},
    "request": lambda a: {"batch_max_size": a.batch, "batch_wait_timeout_s": a.wait_s, "continuous_batching": False},
    "step": lambda a: {"batch_max_size": a.batch, "continuous_batching": True},
}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="256x256", help="WIDTHxHEIGHT of every job")
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--steps", default="4,8", help="each job's steps, drawn from this list")
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--rates", default="0.5,1,2", help="arrival rates as multiples of the solo rate")
    ap.add_argument("--jobs", type=int, default=16, help="jobs per mode and rate")
    ap.add_argument("--batch", type=int, default=4, help="batch_max_size of the batching modes")
    ap.add_argument("--wait-s", type=float, default=0.2, help="request batching: how long jobs gather")
    ap.add_argument("--modes", default="none,request,step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="loadtests/results/bench_continuous.json")
    a = ap.parse_args(argv)

    from ray import serve

    from client.handle import GeneratorClient
    from loadtests.stack import local_stack, stack_config
    from serve.ops.deploy import deploy_serve_config

    width, height = (int(x) for x in a.size.lower().split("x"))
    step_choices = [int(s) for s in a.steps.split(",")]
    rng = random.Random(a.seed)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "bench_continuous", "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m loadtests.bench_continuous " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                          "loadavg_start": os.getloadavg(), "gpu": None},
              "workload": {"size": f"{width}x{height}", "num_frames": a.frames, "steps": step_choices,
                           "guidance_scale": a.guidance},
              "runs": []}

    def spec(i: int) -> dict:
        return {"prompt": f"a lighthouse in a storm, take {i}", "seed": i, "width": width, "height": height,
                "num_frames": a.frames, "num_inference_steps": rng.choice(step_choices), "guidance_scale": a.guidance}

    with local_stack() as stack:
        result["stack_deviations"] = stack.deviations
        gen = GeneratorClient(handle=serve.get_deployment_handle(GENERATOR.deployment, app_name=stack.app))
        transformer = serve.get_deployment_handle(TRANSFORMER.deployment, app_name=stack.app)

        def set_mode(mode: str) -> None:
            levers = MODES[mode](a)
            config, _ = stack_config(stack.data_dir, int(stack.url.rsplit(":", 1)[1]), levers=levers)
            deploy_serve_config(config, wait_timeout_s=300)
            gen.generate(spec(0))  # the levers apply from the next batch: run one
            got = transformer.stats.remote().result()["levers"]
            assert all(got[k] == v for k, v in levers.items()), (levers, got)

        async def run_rate(rate_jpm: float) -> dict:
            loop = asyncio.get_running_loop()
            latencies: list[float] = []
            t0 = loop.time()
            ends: list[float] = []

            async def one(i: int, at: float) -> None:
                await asyncio.sleep(max(0.0, at - (loop.time() - t0)))
                start = loop.time()
                await gen.agenerate(spec(i))
                ends.append(loop.time() - t0)
                latencies.append(loop.time() - start)

            at, arrivals = 0.0, []
            for _ in range(a.jobs):
                arrivals.append(at)
                at += rng.expovariate(rate_jpm / 60.0)
            await asyncio.gather(*(one(1000 + i, t) for i, t in enumerate(arrivals)))
            span = max(ends)
            return {"offered_jpm": round(rate_jpm, 2), "throughput_jpm": round(60.0 * a.jobs / span, 2),
                    "p50_s": round(percentile(latencies, 0.5), 3), "p95_s": round(percentile(latencies, 0.95), 3),
                    "mean_s": round(statistics.mean(latencies), 3)}

        set_mode("none")
        solo = []
        for i in range(3):
            t = time.perf_counter()
            gen.generate(spec(i))
            solo.append(time.perf_counter() - t)
        solo_jpm = 60.0 / statistics.median(solo)
        result["solo_s"] = round(statistics.median(solo), 3)
        result["solo_jpm"] = round(solo_jpm, 2)
        print(f"[bench_continuous] one job alone: {result['solo_s']} s ({solo_jpm:.1f} jobs/min)", flush=True)
        for mode in [m.strip() for m in a.modes.split(",")]:
            set_mode(mode)
            for factor in [float(x) for x in a.rates.split(",")]:
                before = transformer.stats.remote().result()
                row = asyncio.run(run_rate(solo_jpm * factor))
                after = transformer.stats.remote().result()
                # jobs per transformer pass: request batches' sizes; a continuous batch's rows per step
                sizes = after["batches_run"][len(before["batches_run"]):]
                passes = after["continuous"]["steps_run"] - before["continuous"]["steps_run"]
                rows = after["continuous"]["rows_run"] - before["continuous"]["rows_run"]
                row.update(mode=mode, rate_factor=factor, batches=len(sizes) if mode != "step" else passes,
                           mean_batch=round(rows / passes / (2 if a.guidance > 1 else 1), 2) if mode == "step" and passes else
                           (round(statistics.mean(sizes), 2) if sizes else None),
                           joined_mid_batch=after["continuous"]["joined_mid_batch"]
                           - before["continuous"]["joined_mid_batch"],
                           max_active=after["continuous"]["max_active"])
                result["runs"].append(row)
                print(f"[bench_continuous] {mode:8} x{factor:<4} offered {row['offered_jpm']:6.1f}/min  "
                      f"done {row['throughput_jpm']:6.1f}/min  p50 {row['p50_s']:6.2f}s  p95 {row['p95_s']:6.2f}s  "
                      f"batches/steps {row['batches']} (mean jobs {row['mean_batch']}), joined mid-batch "
                      f"{row['joined_mid_batch']}", flush=True)
                out.write_text(json.dumps(result, indent=1))

    result["machine"]["loadavg_end"] = os.getloadavg()
    out.write_text(json.dumps(result, indent=1))
    print("\n| mode | offered jobs/min | done jobs/min | p50 s | p95 s | mean batch | joined mid-batch |")
    print("|---|---|---|---|---|---|---|")
    for r in result["runs"]:
        print(f"| {r['mode']} | {r['offered_jpm']} | {r['throughput_jpm']} | {r['p50_s']} | {r['p95_s']} | "
              f"{r['mean_batch']} | {r['joined_mid_batch']} |")
    print(f"load average {result['machine']['loadavg_start']} -> {result['machine']['loadavg_end']}; written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
