"""What the shared per-user request limit costs per request, measured in one run.

Two copies of the HTTP app on one stack and one database: `limits.rate_limit_scope: cluster`
(the bucket in the application's shared Ray actor, one hop per authenticated request) and
`replica` (the bucket in the replica's memory, the old behaviour). The same authenticated GET
(`GET /v1/api-keys`: auth + one database read) is sent to each in turn, alternating which goes
first, over keep-alive connections through HAProxy; the difference of the medians is the added
latency. Also times the bare actor call from this process (`RequestLimiterActor.take`).

  CINEVIVID_CACHE_DIR=/tmp/cv-bench python -m loadtests.bench_ratelimit --out loadtests/results/bench_ratelimit.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path


def _ms(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"median_ms": round(statistics.median(s) * 1000, 3), "p90_ms": round(s[int(len(s) * 0.9)] * 1000, 3),
            "mean_ms": round(statistics.fmean(s) * 1000, 3), "n": len(s)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=300, help="timed GETs per app")
    ap.add_argument("--actor-calls", type=int, default=1000)
    ap.add_argument("--out", default="loadtests/results/bench_ratelimit.json")
    args = ap.parse_args(argv)

    import httpx
    from ray import serve

    from loadtests.stack import app_args, local_stack, wait_healthy
    from serve.api.ratelimit import RequestLimiterActor
    from serve.app import build_app

    with local_stack(ingress={"limits": {"rate_limit_scope": "cluster"}}) as stack:
        replica_args = app_args(stack, name="bench-replica", ingress={"limits": {"rate_limit_scope": "replica"}})
        serve.run(build_app(replica_args), name="bench-replica", route_prefix="/replica")
        urls = {"cluster": stack.url, "replica": f"{stack.url}/replica"}
        wait_healthy(urls["replica"])
        times: dict[str, list[float]] = {k: [] for k in urls}
        with httpx.Client(headers=stack.headers, timeout=30) as client:
            for url in urls.values():  # warm-up: connections, the actor, caches
                for _ in range(20):
                    client.get(f"{url}/v1/api-keys").raise_for_status()
            for i in range(args.requests):
                order = list(urls) if i % 2 == 0 else list(reversed(urls))
                for scope in order:
                    t0 = time.perf_counter()
                    client.get(f"{urls[scope]}/v1/api-keys").raise_for_status()
                    times[scope].append(time.perf_counter() - t0)

        async def actor_calls() -> list[float]:
            actor = RequestLimiterActor.remote()
            await actor.ping.remote()
            out = []
            for i in range(args.actor_calls):
                t0 = time.perf_counter()
                await actor.take.remote(f"user{i % 50}", 1e9, 10**9)
                out.append(time.perf_counter() - t0)
            return out

        hop = asyncio.run(actor_calls())

    result = {"what": "GET /v1/api-keys through HAProxy, keep-alive, alternating apps",
              "cluster": _ms(times["cluster"]), "replica": _ms(times["replica"]), "actor_call": _ms(hop)}
    result["stack_deviations"] = stack.deviations
    result["added_median_ms"] = round(result["cluster"]["median_ms"] - result["replica"]["median_ms"], 3)
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
