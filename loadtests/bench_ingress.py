"""Ingress benchmark: authenticated `GET /v1/videos/{id}` throughput and latency through Ray Serve
(proxy -> Ingress replica) vs the same Starlette app run bare under uvicorn (`loadtests.bare`), on the
same machine, in the same run, against the same database and video.

A closed-loop load generator (asyncio + httpx, --concurrency connections) hammers one target for
--duration-s, then the other, alternating for --rounds rounds; the ratio Serve/bare of requests/s
is reported with p50/p95/p99 latencies. The load generator shares the CPUs with the servers (same
for both targets).

  python -m loadtests.bench_ingress --out loadtests/results/bench_ingress.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path


def log(msg: str) -> None:
    print(f"[bench_ingress {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    xs = sorted(values)
    k = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


async def hammer(url: str, path: str, headers: dict, concurrency: int, duration_s: float) -> dict:
    import httpx

    lat: list[float] = []
    errors = 0
    statuses: dict[int, int] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as client:
        stop = time.perf_counter() + duration_s

        async def worker():
            nonlocal errors
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    r = await client.get(path)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if r.status_code != 200:
                        errors += 1
                        continue
                except httpx.HTTPError:
                    errors += 1
                    continue
                lat.append(time.perf_counter() - t0)

        t_start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        elapsed = time.perf_counter() - t_start
    return {"requests": len(lat), "errors": errors, "statuses": statuses, "elapsed_s": round(elapsed, 3),
            "rps": round(len(lat) / elapsed, 1), "p50_ms": round(percentile(lat, 50) * 1000, 2),
            "p95_ms": round(percentile(lat, 95) * 1000, 2), "p99_ms": round(percentile(lat, 99) * 1000, 2)}


def wait_up(url: str, timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code in (200, 503):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--duration-s", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of every model stage (default: the config's; a printed deviation)")
    ap.add_argument("--out", default="loadtests/results/bench_ingress.json")
    args = ap.parse_args(argv)

    import httpx

    from loadtests.stack import free_port, http_generate, local_stack

    result = {
        "benchmark": "bench_ingress", "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m loadtests.bench_ingress " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "loadavg_start": os.getloadavg()},
        "route": "GET /v1/videos/{id} (Bearer API key)", "concurrency": args.concurrency,
        "duration_s": args.duration_s, "rounds": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with local_stack(threads=args.threads) as stack:
        result["stack_deviations"] = stack.deviations
        with httpx.Client(base_url=stack.url, headers=stack.headers, timeout=300) as c:
            video, _ = http_generate(c, {"prompt": "a lighthouse at dusk", "seed": 3})
        path = f"/v1/videos/{video['id']}"
        # the bare server: same app args (same SQLite database, data dir, JWT secret), same Generator
        args_file = Path(tempfile.mkstemp(suffix=".json")[1])
        args_file.write_text(json.dumps(stack.args))
        port = free_port()
        bare_url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen([sys.executable, "-m", "loadtests.bare", "--address", stack.ray_address, "--app",
                                 stack.app, "--port", str(port), "--args", str(args_file)], env=env)
        try:
            wait_up(bare_url)
            for target, url in (("serve", stack.url), ("bare", bare_url)):  # warm-up, and a sanity check
                r = httpx.get(url + path, headers=stack.headers, timeout=30)
                if r.status_code != 200 or r.json()["id"] != video["id"]:
                    raise RuntimeError(f"{target}: {r.status_code} {r.text[:200]}")
                asyncio.run(hammer(url, path, stack.headers, args.concurrency, 2.0))
            for i in range(args.rounds):
                for target, url in (("serve", stack.url), ("bare", bare_url)):
                    res = asyncio.run(hammer(url, path, stack.headers, args.concurrency, args.duration_s))
                    res.update({"target": target, "round": i + 1})
                    result["rounds"].append(res)
                    log(f"round {i + 1} {target}: {res['rps']} req/s, p50 {res['p50_ms']} ms, "
                        f"p99 {res['p99_ms']} ms, errors {res['errors']}")
                    out.write_text(json.dumps(result, indent=1))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
            args_file.unlink(missing_ok=True)

    summary = {}
    for target in ("serve", "bare"):
        rs = [r for r in result["rounds"] if r["target"] == target]
        summary[target] = {"rps": round(statistics.median(r["rps"] for r in rs), 1),
                           "p50_ms": round(statistics.median(r["p50_ms"] for r in rs), 2),
                           "p99_ms": round(statistics.median(r["p99_ms"] for r in rs), 2),
                           "errors": sum(r["errors"] for r in rs)}
    summary["rps_ratio_serve_over_bare"] = round(summary["serve"]["rps"] / summary["bare"]["rps"], 3)
    result["summary"] = summary
    result["machine"]["loadavg_end"] = os.getloadavg()
    out.write_text(json.dumps(result, indent=1))
    print("\n== bench_ingress summary ==", result["route"], f"concurrency {args.concurrency}")
    for target in ("serve", "bare"):
        s = summary[target]
        print(f"{target:6} {s['rps']:8.1f} req/s  p50 {s['p50_ms']:7.2f} ms  p99 {s['p99_ms']:7.2f} ms  "
              f"errors {s['errors']}")
    print(f"Serve / bare throughput: {summary['rps_ratio_serve_over_bare']}  (target >= 0.6); load average "
          f"{result['machine']['loadavg_start']} -> {result['machine']['loadavg_end']}; written {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
