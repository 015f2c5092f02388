"""Headless Locust runner: bounded users and run time, CSV + JSON stats, a one-screen summary.

Without --host it starts a local CineVivid stack itself (Ray + Serve + the tiny model + the HTTP
ingress, a fresh database with one user and API key) and tears it down afterwards; with --host it
drives an existing deployment (API key from --api-key or $CINEVIVID_API_KEY). Locust runs in its own
process (`python -m locust --headless ...`).

  python -m loadtests.run_locust -u 20 -r 5 -t 60s                  # local stack, fixed users
  python -m loadtests.run_locust -u 20 -t 90s --shape               # ramp/hold/spike shape
  python -m loadtests.run_locust --host http://host:8000 --api-key cv-... -u 50 -t 5m

Writes <prefix>_stats.csv, <prefix>_stats_history.csv, <prefix>_failures.csv, <prefix>.json
(Locust's own) and <prefix>_summary.json (the summary below), prefix default
loadtests/results/locust.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_seconds(text: str) -> float:
    """'90', '90s', '2m', '1h30m' -> seconds."""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    total, found = 0.0, False
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)([hms])", text):
        total += float(value) * {"h": 3600, "m": 60, "s": 1}[unit]
        found = True
    if not found:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}")
    return total


def summarize(prefix: str) -> dict:
    rows = list(csv.DictReader(open(f"{prefix}_stats.csv")))
    routes, total = [], None
    for row in rows:
        item = {
            "method": row["Type"], "name": row["Name"], "requests": int(row["Request Count"]),
            "failures": int(row["Failure Count"]), "rps": float(row["Requests/s"]),
            "p50_ms": _ms(row.get("50%")), "p95_ms": _ms(row.get("95%")), "p99_ms": _ms(row.get("99%")),
            "avg_ms": round(float(row["Average Response Time"] or 0), 1),
        }
        if row["Name"] == "Aggregated":
            total = item
        else:
            routes.append(item)
    total = total or {"requests": 0, "failures": 0, "rps": 0.0}
    ratio = total["failures"] / total["requests"] if total["requests"] else 0.0
    return {"routes": routes, "total": total, "failure_ratio": round(ratio, 5)}


def _ms(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def print_summary(s: dict, meta: dict) -> None:
    print(f"\n== Locust summary == {meta['users']} users, {meta['run_time']}, shape={meta['shape']}, "
          f"host={meta['host']}")
    print(f"{'route':48} {'reqs':>7} {'fail':>5} {'req/s':>7} {'p50':>7} {'p95':>7} {'p99':>7}  (ms)")
    for r in s["routes"] + [dict(s["total"], method="", name="TOTAL")]:
        name = r["name"] if r["name"].split(" ")[0] in ("GET", "POST", "DELETE", "TOTAL") else \
            f"{r.get('method', '')} {r['name']}".strip()
        print(f"{name[:48]:48} {r['requests']:7d} {r['failures']:5d} {r['rps']:7.2f} "
              f"{_fmt(r.get('p50_ms'))} {_fmt(r.get('p95_ms'))} {_fmt(r.get('p99_ms'))}")
    print(f"failure ratio {s['failure_ratio']:.4f}", flush=True)


def _fmt(v) -> str:
    return f"{v:7.0f}" if isinstance(v, (int, float)) else f"{'-':>7}"


def run_locust(host: str, api_key: str, a) -> int:
    prefix = a.prefix
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    files = str(HERE / "locustfile.py") + ("," + str(HERE / "locust_shape.py") if a.shape else "")
    cmd = [sys.executable, "-m", "locust", "-f", files, "--headless", "--host", host,
           "-u", str(a.users), "-r", str(a.spawn_rate), "--run-time", f"{int(a.run_time)}s",
           "--stop-timeout", str(a.stop_timeout), "--csv", prefix, "--json-file", prefix,
           "--only-summary", "--loglevel", "WARNING"]
    if a.user_classes:
        cmd += a.user_classes.split(",")
    env = {**os.environ, "CINEVIVID_API_KEY": api_key, "CINEVIVID_LOCUST_USERS": str(a.users),
           "CINEVIVID_LOCUST_RUN_TIME_S": str(a.run_time), "CINEVIVID_LOCUST_STEPS": str(a.steps)}
    print("running:", " ".join(cmd), flush=True)
    # hard bound: run time + stop timeout + start-up slack
    try:
        proc = subprocess.run(cmd, env=env, timeout=a.run_time + a.stop_timeout + 120)
        return proc.returncode
    except subprocess.TimeoutExpired:
        print("locust did not stop in time", flush=True)
        return 124


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default=None, help="base URL of a running CineVivid; omit to start a local stack")
    ap.add_argument("--api-key", default=os.environ.get("CINEVIVID_API_KEY"))
    ap.add_argument("-u", "--users", type=int, default=20, help="peak concurrent users")
    ap.add_argument("-r", "--spawn-rate", type=float, default=5.0)
    ap.add_argument("-t", "--run-time", type=parse_seconds, default=parse_seconds("60s"))
    ap.add_argument("--shape", action="store_true", help="use loadtests/locust_shape.py (ramp, hold, spike)")
    ap.add_argument("--user-classes", default="", help="comma list, e.g. PollerUser,BrowserUser (default all)")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps of each submitted video")
    ap.add_argument("--stop-timeout", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of every model stage of the local stack (default: serve_config.yaml's)")
    ap.add_argument("--prefix", default="loadtests/results/locust")
    a = ap.parse_args(argv)
    if a.users < 1 or a.run_time <= 0:
        ap.error("need at least one user and a positive run time")

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        if a.host:
            host, key = a.host.rstrip("/"), a.api_key
            if not key:
                ap.error("--api-key or $CINEVIVID_API_KEY is needed with --host")
        else:
            from loadtests.stack import local_stack

            print("starting a local CineVivid stack (tiny model) ...", flush=True)
            st = stack.enter_context(local_stack(threads=a.threads))
            host, key = st.url, st.api_key
        rc = run_locust(host, key, a)
    if not Path(f"{a.prefix}_stats.csv").exists():
        print("no stats written", flush=True)
        return rc or 1
    summary = summarize(a.prefix)
    meta = {"date_utc": started, "host": host if a.host else "local stack (tiny model)", "users": a.users,
            "spawn_rate": a.spawn_rate, "run_time": f"{int(a.run_time)}s", "shape": a.shape,
            "user_classes": a.user_classes or "all", "steps": a.steps, "locust_rc": rc,
            "wall_s": round(time.monotonic() - t0, 1), "loadavg_end": os.getloadavg(),
            "command": "python -m loadtests.run_locust " + " ".join(argv if argv is not None else sys.argv[1:])}
    Path(f"{a.prefix}_summary.json").write_text(json.dumps({**meta, **summary}, indent=1))
    print_summary(summary, meta)
    print(f"written {a.prefix}_stats.csv, {a.prefix}.json, {a.prefix}_summary.json", flush=True)
    return 0 if summary["total"]["requests"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
