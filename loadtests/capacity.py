"""Capacity report: step the offered load up, in jobs per minute, until the service saturates.

Open-loop arrivals (`loadtests/locust_capacity.py`, Locust in its own process): jobs are submitted
at the step's rate whatever the service does, and each is followed to its end over SSE. Each step
is held for --step-s; the rate starts at --start-jpm and is multiplied by --factor (or raised by
--increment). A step is saturated when its completed-jobs throughput is under --min-ratio (90 %) of
the offered rate, its p95 job latency is over --max-p95-s, or more than --max-fail-ratio of its jobs
fail or are refused (429/503). After the first saturated step one more step confirms it; then the
arrivals stop and the jobs in flight are drained (at most --drain-s). --max-time bounds the steps.

During every step the queue of each Serve deployment is sampled every --sample-s from Ray's
Prometheus metrics (`ray_serve_deployment_queued_queries`: requests waiting in a handle for a
replica; `ray_serve_replica_processing_queries`: requests inside a replica, a stage's own batching
queue included), read on each Ray node's metrics export port, and CineVivid's job queue (jobs
`queued` in the database, before the dispatcher hands them to the Generator) from the app's
/metrics (`cinevivid_queue_depth`). The stage that saturates first is the model stage with the
longest queue at the saturation step (Ingress and Generator hold every job for its whole life and
are not candidates).

  python -m loadtests.capacity                                   # local stack (serve_config.yaml)
  python -m loadtests.capacity --start-jpm 10 --factor 1.5 --step-s 45
  python -m loadtests.capacity --host http://host:8000 --api-key cv-... --ray-address host:6379

Writes loadtests/results/capacity/: capacity.png (throughput and p50/p95/p99 job latency against
offered load, the saturation point marked), capacity.json (every number, the command, the machine,
the date), capacity.md (one page: the plot, the step table, the per-route table, the saturation
statement; also printed), and Locust's CSV/JSON (locust_*).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from serve.stages import GENERATOR, INGRESS

HERE = Path(__file__).resolve().parent
OUT_DIR = Path("loadtests/results/capacity")
# Serve's per-deployment queue metrics (Ray 2.60 names, with Ray's `ray_` prefix on the export port)
QUEUED = "ray_serve_deployment_queued_queries"
ONGOING = "ray_serve_replica_processing_queries"
HEALTHY = "ray_serve_deployment_replica_healthy"  # the controller's gauge: healthy replicas per deployment
# hold a job from dispatch to the end: their queues grow with any stage's
NOT_STAGES = (INGRESS.deployment, GENERATOR.deployment)
JOB_QUEUE = "job queue (DB)"


# ---- load schedule and saturation ---------------------------------------------------------------------------
def next_rate(jpm: float, factor: float = 1.5, increment: float | None = None) -> float:
    return jpm + increment if increment else jpm * factor


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of `values`; None when empty."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def merge_jobs(lines: list[dict]) -> list[dict]:
    """The job file's submit and end lines, one dict per job."""
    jobs: dict[int, dict] = {}
    for rec in lines:
        jobs.setdefault(rec["seq"], {}).update(rec)
    return [jobs[k] for k in sorted(jobs)]


def read_jobs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return merge_jobs(out)


def step_stats(jobs: list[dict], step: dict, now: float) -> dict:
    """Offered and completed jobs/min in the step's window [t0, t1), job latency percentiles of the
    jobs submitted in it (a job still running at `now` counts with `now - submit` as a lower bound,
    `unfinished`), and the jobs that failed or were refused."""
    t0, t1 = step["t0"], step["t1"]
    minutes = max(1e-9, (t1 - t0) / 60.0)
    submitted = [j for j in jobs if t0 <= j["submit_t"] < t1]
    completed_in = [j for j in jobs if j.get("status") == "completed" and t0 <= j.get("end_t", -1) < t1]
    lat, unfinished, failed, refused = [], 0, 0, 0
    for j in submitted:
        status = j.get("status")
        if status is None:  # still in flight
            unfinished += 1
            lat.append(now - j["submit_t"])
        elif status == "completed":
            lat.append(j["latency_s"])
        elif status in ("http_429", "http_503"):
            refused += 1
        else:
            failed += 1
    p = {f"p{q}_s": _r(percentile(lat, q)) for q in (50, 95, 99)}
    return {"step": step["step"], "target_jpm": round(step["jpm"], 2), "t0": t0, "t1": t1,
            "duration_s": round(t1 - t0, 1), "submitted": len(submitted),
            "offered_jpm": round(len(submitted) / minutes, 2), "completed": len(completed_in),
            "completed_jpm": round(len(completed_in) / minutes, 2), **p, "unfinished": unfinished,
            "failed": failed, "refused": refused}


def _r(v: float | None, nd: int = 2) -> float | None:
    return None if v is None else round(v, nd)


def saturation_reasons(s: dict, *, min_ratio: float = 0.9, max_p95_s: float = 60.0,
                       max_fail_ratio: float = 0.02) -> list[str]:
    """Why a step is saturated (empty: it kept up)."""
    reasons = []
    offered = s["offered_jpm"]
    if offered > 0 and s["completed_jpm"] < min_ratio * offered:
        reasons.append(f"throughput {s['completed_jpm']:.1f} < {min_ratio:.0%} of offered {offered:.1f} jobs/min")
    if s.get("p95_s") is not None and s["p95_s"] > max_p95_s:
        reasons.append(f"p95 {s['p95_s']:.1f} s > {max_p95_s:g} s")
    bad = s.get("failed", 0) + s.get("refused", 0)
    if s["submitted"] and bad / s["submitted"] > max_fail_ratio:
        reasons.append(f"{bad} of {s['submitted']} jobs failed or refused")
    return reasons


def find_saturation(steps: list[dict]) -> dict:
    """The first saturated step that the next step confirms (also saturated), or the first saturated
    step when it is the last one (unconfirmed); the last step that kept up before it."""
    for i, s in enumerate(steps):
        if not s["reasons"]:
            continue
        confirmed = i + 1 < len(steps) and bool(steps[i + 1]["reasons"])
        if confirmed or i + 1 == len(steps):
            kept_up = [t for t in steps[:i] if not t["reasons"]]
            return {"index": i, "confirmed": confirmed, "offered_jpm": s["offered_jpm"],
                    "last_ok_index": steps.index(kept_up[-1]) if kept_up else None,
                    "max_completed_jpm": max(t["completed_jpm"] for t in steps[: i + 2])}
    return {"index": None, "confirmed": False, "offered_jpm": None, "last_ok_index": None,
            "max_completed_jpm": max((t["completed_jpm"] for t in steps), default=0.0)}


def should_stop(steps: list[dict]) -> bool:
    """Stop after a saturated step confirmed by the next one."""
    return len(steps) >= 2 and bool(steps[-1]["reasons"]) and bool(steps[-2]["reasons"])


# ---- queue metrics ------------------------------------------------------------------------------------------------
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _deployment_samples(text: str, metrics: dict[str, str], app: str | None):
    """(deployment, key, value) of each sample of `metrics` ({metric name: key}) in Ray's
    Prometheus text, for the application `app` (any when None)."""
    for line in text.splitlines():
        key = next((k for name, k in metrics.items() if line.startswith(name + "{")), None)
        if key is None:
            continue
        labels_end = line.rindex("}")
        labels = dict(_LABEL.findall(line[: labels_end + 1]))
        if (app and labels.get("application") not in (None, app)) or not labels.get("deployment"):
            continue
        with contextlib.suppress(ValueError):
            yield labels["deployment"], key, float(line[labels_end + 1:].split()[0])


def parse_serve_queues(text: str, app: str | None = None) -> dict[str, dict[str, float]]:
    """Ray's Prometheus text -> {deployment: {"queued": .., "ongoing": ..}}, summed over handles and replicas."""
    out: dict[str, dict[str, float]] = {}
    for dep, key, value in _deployment_samples(text, {QUEUED: "queued", ONGOING: "ongoing"}, app):
        out.setdefault(dep, {"queued": 0.0, "ongoing": 0.0})[key] += value
    return out


def parse_serve_replicas(text: str, app: str | None = None) -> dict[str, float]:
    """Ray's Prometheus text -> {deployment: healthy replicas} (the controller's gauge, summed)."""
    out: dict[str, float] = {}
    for dep, _, value in _deployment_samples(text, {HEALTHY: "healthy"}, app):
        out[dep] = out.get(dep, 0.0) + value
    return out


def serve_running_replicas(app: str | None) -> dict[str, float] | None:
    """{deployment: RUNNING replicas} of `app` from Serve's own status, exact at the moment of the
    call; None without a Ray connection (a `--host` run without `--ray-address`: then the
    controller's Prometheus gauge, which lags by its export interval, is what there is)."""
    import ray

    if not app or not ray.is_initialized():
        return None
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return {}
    return {d: float(st.replica_states.get("RUNNING", 0)) for d, st in status.deployments.items()}


def replica_summary(samples: list[dict]) -> dict[str, dict[str, float]]:
    """Samples' {"replicas": {dep: n}} -> per deployment the mean, min and max replicas over the step."""
    out: dict[str, dict[str, float]] = {}
    for d in sorted({d for s in samples for d in (s.get("replicas") or {})}):
        n = [s["replicas"][d] for s in samples if d in (s.get("replicas") or {})]
        out[d] = {"mean": round(sum(n) / len(n), 2), "min": min(n), "max": max(n)}
    return out


def parse_app_metrics(text: str) -> dict:
    """CineVivid's /metrics -> job queue depth, running jobs, and per-stage duration sums and counts."""
    out: dict = {"queue_depth": None, "running_jobs": 0.0, "stage_sum": {}, "stage_count": {}}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        try:
            value = float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
        if name == "cinevivid_queue_depth":
            out["queue_depth"] = value
        elif name == "cinevivid_running_jobs":
            out["running_jobs"] += value
        elif name in ("cinevivid_stage_duration_seconds_sum", "cinevivid_stage_duration_seconds_count"):
            stage = dict(_LABEL.findall(line)).get("stage", "?")
            key = "stage_sum" if name.endswith("_sum") else "stage_count"
            out[key][stage] = out[key].get(stage, 0.0) + value
    return out


def queue_summary(samples: list[dict]) -> dict[str, dict[str, float]]:
    """Samples ({"t", "serve": {dep: {queued, ongoing}}, "job_queue"}) -> per deployment the mean and
    max of queued + ongoing (its in-flight requests) and of queued alone; the job queue likewise."""
    out: dict[str, dict[str, float]] = {}
    deps = sorted({d for s in samples for d in (s.get("serve") or {})})
    for d in deps:
        inflight = [s["serve"][d]["queued"] + s["serve"][d]["ongoing"] for s in samples if d in (s.get("serve") or {})]
        queued = [s["serve"][d]["queued"] for s in samples if d in (s.get("serve") or {})]
        out[d] = {"mean": round(sum(inflight) / len(inflight), 2), "max": max(inflight),
                  "queued_mean": round(sum(queued) / len(queued), 2), "n": len(inflight)}
    jq = [s["job_queue"] for s in samples if s.get("job_queue") is not None]
    if jq:
        out[JOB_QUEUE] = {"mean": round(sum(jq) / len(jq), 2), "max": max(jq), "queued_mean": round(sum(jq) / len(jq), 2),
                          "n": len(jq)}
    return out


def saturating_stage(steps: list[dict], index: int | None) -> dict | None:
    """The model stage with the longest queue (mean in-flight requests: waiting in handles + inside
    the replica) at step `index` (the saturation step; the last step when none saturated), and the
    step at which each stage's mean first reached 1 (busy all the time: a queue forms)."""
    if not steps:
        return None
    i = index if index is not None else len(steps) - 1
    queues = steps[i].get("queues") or {}
    cands = {d: q for d, q in queues.items() if d not in NOT_STAGES and d != JOB_QUEUE}
    if not cands:
        return None
    first_busy = {}
    for d in cands:
        for s in steps[: i + 1]:
            if (s.get("queues") or {}).get(d, {}).get("mean", 0) >= 1.0:
                first_busy[d] = s["step"]
                break
    name = max(cands, key=lambda d: (cands[d]["mean"], -first_busy.get(d, 1e9)))
    earliest = min(first_busy, key=lambda d: (first_busy[d], -cands[d]["mean"])) if first_busy else None
    return {"stage": name, "at_step": steps[i]["step"], "mean": cands[name]["mean"], "max": cands[name]["max"],
            "queued_mean": cands[name]["queued_mean"], "first_busy_step": first_busy.get(name),
            "first_to_queue": earliest, "job_queue": queues.get(JOB_QUEUE),
            "first_step_mean": (steps[0].get("queues") or {}).get(name, {}).get("mean")}


class QueueSampler:
    """Samples Serve's queue metrics (Ray's Prometheus export of each node) and the app's job queue
    in a thread, every `interval_s`; `take()` returns and clears what was sampled."""

    def __init__(self, metrics_urls: list[str], app_url: str | None, app: str | None, interval_s: float = 2.0):
        self.metrics_urls, self.app_url, self.app, self.interval_s = metrics_urls, app_url, app, interval_s
        self.samples: list[dict] = []
        self.last_app: dict | None = None
        self.errors = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True, name="queue-sampler")

    def start(self) -> "QueueSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def sample(self) -> dict:
        import httpx

        s: dict = {"t": time.time(), "serve": {}, "job_queue": None, "replicas": {}}
        try:
            running = serve_running_replicas(self.app)
        except Exception:  # noqa: BLE001 - a missed status read is a gap
            running, self.errors = None, self.errors + 1
        for url in self.metrics_urls:
            try:
                text = httpx.get(url, timeout=10).text
                if running is None:
                    for d, n in parse_serve_replicas(text, self.app).items():
                        s["replicas"][d] = s["replicas"].get(d, 0.0) + n
                for d, q in parse_serve_queues(text, self.app).items():
                    e = s["serve"].setdefault(d, {"queued": 0.0, "ongoing": 0.0})
                    e["queued"] += q["queued"]
                    e["ongoing"] += q["ongoing"]
            except Exception:  # noqa: BLE001 - a missed scrape is a gap, not an error of the run
                self.errors += 1
        if running is not None:
            s["replicas"] = running
        if self.app_url:
            try:
                m = parse_app_metrics(httpx.get(f"{self.app_url}/metrics", timeout=10).text)
                s["job_queue"] = m["queue_depth"]
                s["running_jobs"] = m["running_jobs"]
                self.last_app = m
            except Exception:  # noqa: BLE001
                self.errors += 1
        return s

    def _run(self) -> None:
        while not self._stop.is_set():
            s = self.sample()
            with self._lock:
                self.samples.append(s)
            self._stop.wait(self.interval_s)

    def take(self) -> list[dict]:
        with self._lock:
            out, self.samples = self.samples, []
        return out


def ray_metrics_urls() -> list[str]:
    """Each alive Ray node's Prometheus export (needs `ray.init` done in this process)."""
    import ray

    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]


def stage_seconds(before: dict | None, after: dict | None) -> dict[str, float]:
    """Mean seconds per job of each stage between two app-metric reads (histogram sum/count deltas)."""
    if not before or not after:
        return {}
    out = {}
    for stage, total in after["stage_sum"].items():
        n = after["stage_count"].get(stage, 0) - before["stage_count"].get(stage, 0)
        if n > 0:
            out[stage] = round((total - before["stage_sum"].get(stage, 0.0)) / n, 3)
    return out


# ---- report -----------------------------------------------------------------------------------------------------
def plot(steps: list[dict], sat: dict, path: Path, *, title: str = "", max_p95_s: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [s["offered_jpm"] for s in steps]
    has_q = any(s.get("queues") for s in steps)
    has_r = any(s.get("replicas") for s in steps)
    rows = 2 + has_q + has_r
    fig, axes = plt.subplots(rows, 1, figsize=(8, 3.5 * rows))
    by_load = axes[:rows - has_r]  # x: the offered load; the replicas panel's x is time
    ax = axes[0]
    top = max(x + [s["completed_jpm"] for s in steps] + [1.0]) * 1.1
    ax.plot([0, top], [0, top], ls=":", color="grey", label="y = x (keeps up)")
    ax.plot([0, top], [0, 0.9 * top], ls=":", color="lightgrey", label="90 % of offered")
    ax.plot(x, [s["completed_jpm"] for s in steps], "o-", color="C0", label="completed jobs/min")
    ax.set_ylabel("throughput (jobs/min)")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax = axes[1]
    for q, c in (("p50", "C2"), ("p95", "C1"), ("p99", "C3")):
        ax.plot(x, [s.get(f"{q}_s") for s in steps], "o-", color=c, label=f"{q} job latency")
    if max_p95_s:
        ax.axhline(max_p95_s, ls=":", color="C1", lw=1, label=f"p95 limit {max_p95_s:g} s")
    ax.set_ylabel("job latency, submit -> completed (s)")
    ax.set_yscale("log")
    if has_q:
        ax = axes[2]
        deps = sorted({d for s in steps for d in (s.get("queues") or {})})
        for d in deps:
            ax.plot(x, [(s.get("queues") or {}).get(d, {}).get("mean") for s in steps],
                    label=d, ls="--" if d in NOT_STAGES or d == JOB_QUEUE else "-", marker="o")
        ax.set_ylabel("mean queue + in service")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.legend(fontsize=7, ncol=2)
    for a in by_load:
        a.set_xlim(0, top)
    by_load[-1].set_xlabel("offered load (jobs/min), one step after another")
    if has_r:
        plot_replicas(axes[-1], steps, sat)
    if sat.get("index") is not None:
        xs = steps[sat["index"]]["offered_jpm"]
        for a in by_load:
            a.axvline(xs, color="red", lw=1, alpha=0.7)
        axes[0].annotate(f"saturated at {xs:.1f} offered\npeak {sat['max_completed_jpm']:.1f} jobs/min",
                         (xs, sat["max_completed_jpm"]), textcoords="offset points", xytext=(-150, 10),
                         color="red", fontsize=9)
    for a in axes[:2]:
        a.legend(fontsize=8, loc="upper left")
        a.grid(alpha=0.3)
    fig.suptitle(title or "CineVivid capacity", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_replicas(ax, steps: list[dict], sat: dict) -> None:
    """Replicas per stage over time (each step's mean, and its max dotted) against the offered load
    (right axis, grey): the stages whose count changed; the others are named with their fixed count."""
    start = steps[0]["t0"]
    edges = [(s["t0"] - start) / 60 for s in steps] + [(steps[-1]["t1"] - start) / 60]
    deps = sorted({d for s in steps for d in (s.get("replicas") or {})})
    series = {d: [(s.get("replicas") or {}).get(d, {}) for s in steps] for d in deps}
    changed = [d for d in deps if len({(r.get("min"), r.get("max")) for r in series[d]}) > 1] or deps
    for i, d in enumerate(changed):
        color = f"C{i % 10}"
        ax.stairs([r.get("mean", 0) for r in series[d]], edges, color=color, lw=2, baseline=None, label=f"{d} (mean)")
        ax.stairs([r.get("max", 0) for r in series[d]], edges, color=color, ls=":", baseline=None, label=f"{d} (max)")
    fixed = sorted({f"{d} {series[d][0].get('max', 0):g}" for d in deps if d not in changed})
    if fixed:
        ax.set_title("fixed: " + ", ".join(fixed), fontsize=7)
    ax.set_ylabel("replicas")
    ax.set_ylim(0, max([r.get("max", 0) for d in changed for r in series[d]] + [1]) + 0.5)
    ax.set_xlabel("minutes since the first step")
    load = ax.twinx()
    load.stairs([s["offered_jpm"] for s in steps], edges, color="grey", ls="--", baseline=None, label="offered jobs/min")
    load.set_ylabel("offered load (jobs/min)", color="grey")
    if sat.get("index") is not None:
        ax.axvline(edges[sat["index"]], color="red", lw=1, alpha=0.7)
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = load.get_legend_handles_labels()
    ax.legend(lines + more, labels + more_labels, fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)


def statement(result: dict) -> str:
    sat, stage, wl = result["saturation"], result.get("stage"), result["workload"]
    if sat["index"] is None:
        head = (f"Did not saturate up to {result['steps'][-1]['offered_jpm']:.1f} offered jobs/min for {wl} "
                f"(max throughput {sat['max_completed_jpm']:.1f} jobs/min)")
    else:
        steps = result["steps"]
        ok = steps[sat["last_ok_index"]] if sat["last_ok_index"] is not None else None
        bad = steps[sat["index"]]
        head = ((f"Saturates between {ok['offered_jpm']:.1f} and {bad['offered_jpm']:.1f} offered jobs/min for {wl}: "
                 f"it kept up with {ok['offered_jpm']:.1f} (p95 {_v(ok.get('p95_s'))} s)" if ok else
                 f"Saturates at or below {bad['offered_jpm']:.1f} offered jobs/min for {wl}: no step kept up")
                + f", not with {bad['offered_jpm']:.1f} ({'; '.join(bad['reasons'])}"
                + ("" if sat["confirmed"] else "; not confirmed by a further step")
                + f"); peak throughput {sat['max_completed_jpm']:.1f} jobs/min")
    if stage:
        tail = (f"first stage to saturate: {stage['stage']} (mean {stage['mean']:.2f} requests queued or in "
                f"service, max {stage['max']:g}, at step {stage['at_step']}, from {stage['first_step_mean']} at step 1"
                + (f"; first at a mean >= 1 at step {stage['first_busy_step']}" if stage["first_busy_step"] else "")
                + ")")
        if stage.get("first_to_queue") and stage["first_to_queue"] != stage["stage"]:
            tail += f"; {stage['first_to_queue']} reached a mean >= 1 earlier"
        if stage.get("job_queue"):
            tail += (f"; CineVivid's job queue (DB, before the Generator): mean {stage['job_queue']['mean']:.1f}, "
                     f"max {stage['job_queue']['max']:g}")
    else:
        tail = "first stage to saturate: unknown (" + result.get("queue_source", "no queue metrics") + ")"
    return f"{head}; {tail}."


def _v(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown(result: dict, png_name: str = "capacity.png") -> str:
    steps, sat = result["steps"], result["saturation"]
    lines = [f"# Capacity report: {result['workload']}", "",
             f"**{statement(result)}**", "",
             f"![capacity]({png_name})", "",
             f"Date (UTC): {result['date_utc']}. Machine: {result['machine']['summary']}. "
             f"Target: {result['target']}. Arrivals: {result['arrivals']}, steps of {result['step_s']:g} s. "
             f"Queue metrics: {result['queue_source']}.", "",
             f"Command: `{result['command']}`", "",
             "| step | target jpm | offered jpm | completed jpm | p50 s | p95 s | p99 s | jobs | unfinished | failed | "
             "refused | longest stage queue (mean) | job queue (mean) | saturated because |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
    for i, s in enumerate(steps):
        q = s.get("queues") or {}
        cands = {d: v for d, v in q.items() if d not in NOT_STAGES and d != JOB_QUEUE}
        longest = max(cands, key=lambda d: cands[d]["mean"]) if cands else None
        mark = " **(saturation)**" if sat["index"] == i else ""
        longest_txt = f"{longest} {cands[longest]['mean']:.2f}" if longest else "-"
        lines.append(
            f"| {s['step']}{mark} | {s['target_jpm']:.1f} | {s['offered_jpm']:.1f} | {s['completed_jpm']:.1f} | "
            f"{_v(s.get('p50_s'))} | {_v(s.get('p95_s'))} | {_v(s.get('p99_s'))} | {s['submitted']} | "
            f"{s['unfinished']} | {s['failed']} | {s['refused']} | "
            f"{longest_txt} | "
            f"{_v(q.get(JOB_QUEUE, {}).get('mean'), '{:.1f}')} | {'; '.join(s['reasons']) or '-'} |")
    if any(s.get("stage_seconds") for s in steps):
        stages = sorted({k for s in steps for k in (s.get("stage_seconds") or {})})
        lines += ["", "Mean seconds per job in each stage (the app's `cinevivid_stage_duration_seconds`, jobs "
                  "completed in the step):", "",
                  "| step | offered jpm | " + " | ".join(stages) + " |",
                  "| ---: | ---: | " + " | ".join("---:" for _ in stages) + " |"]
        for s in steps:
            ss = s.get("stage_seconds") or {}
            lines.append(f"| {s['step']} | {s['offered_jpm']:.1f} | "
                         + " | ".join(_v(ss.get(k), "{:.3f}") for k in stages) + " |")
    routes = result.get("routes") or {}
    if routes.get("routes"):
        lines += ["", "Per-route table (Locust, the whole run; `job: submit -> completed` is each job's latency "
                  "as the client saw it, `GET .../events` the time to the SSE stream's headers):", "",
                  "| route | requests | failures | req/s | p50 ms | p95 ms | p99 ms |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in routes["routes"] + [dict(routes["total"], name="**total**", method="")]:
            lines.append(f"| {r['name']} | {r['requests']} | {r['failures']} | {r['rps']:.2f} | "
                         f"{_v(r.get('p50_ms'), '{:.0f}')} | {_v(r.get('p95_ms'), '{:.0f}')} | "
                         f"{_v(r.get('p99_ms'), '{:.0f}')} |")
    if result.get("deviations"):
        lines += ["", "Stack deviations from `cinevivid up`: " + "; ".join(result["deviations"]) + "."]
    lines += ["", "Offered = jobs submitted in the step per minute; completed = jobs that completed in the step's "
              "window per minute; latency percentiles over the jobs submitted in the step (an unfinished job "
              "counts with its age at the end as a lower bound). Queue = a deployment's requests waiting in "
              "its handles plus those inside its replicas (Serve's metrics), averaged over the step."]
    return "\n".join(lines) + "\n"


def write_report(result: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(result["steps"], result["saturation"], out_dir / "capacity.png",
               title=f"CineVivid capacity: {result['workload']}", max_p95_s=result.get("max_p95_s"))
    js = out_dir / "capacity.json"
    js.write_text(json.dumps(result, indent=1, default=str))
    md = out_dir / "capacity.md"
    md.write_text(markdown(result, png.name))
    return {"png": png, "json": js, "md": md}


def machine_info(loadavg_before: tuple | None = None) -> dict:
    import torch

    cpus = os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info = {"cpus": cpus, "gpu": gpu, "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "loadavg_before": loadavg_before, "loadavg_end": os.getloadavg()}
    with contextlib.suppress(Exception):
        import ray

        info["ray"] = ray.__version__
    info["summary"] = (f"{cpus}-core CPU box, {gpu or 'no GPU'}; load average before the run "
                       f"{_fmt_load(loadavg_before)}, at the end {_fmt_load(info['loadavg_end'])}")
    return info


def _fmt_load(la) -> str:
    return "-" if not la else "/".join(f"{x:.1f}" for x in la)


def workload_of(config_path: Path, body: dict) -> str:
    """'cinevivid-tiny T2V 64x64, 9 frames, 4 steps' from the config's first model and the body's overrides."""
    try:
        from serve.ops.deploy import load_serve_config

        from loadtests.stack import _app

        m = (_app(load_serve_config(config_path))["args"].get("models") or [{}])[0]
    except Exception:  # noqa: BLE001
        m = {}
    w, h = body.get("width", m.get("width")), body.get("height", m.get("height"))
    frames = body.get("num_frames", m.get("num_frames"))
    steps = body.get("num_inference_steps", m.get("num_inference_steps"))
    return f"{body.get('model', m.get('name', 'default model'))} T2V {w}x{h}, {frames} frames, {steps} steps"


# ---- the run ----------------------------------------------------------------------------------------------------
def warm_up(url: str, api_key: str, n: int, body: dict) -> None:
    import httpx

    from loadtests.stack import wait_video_sse

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=300) as c:
        for i in range(n):
            t = time.monotonic()
            r = c.post("/v1/videos", json={"prompt": f"warm-up {i}", **body})
            r.raise_for_status()
            v = wait_video_sse(c, r.json()["id"])
            print(f"[capacity] warm-up job {i + 1}/{n}: {v.get('status')} in {time.monotonic() - t:.1f} s", flush=True)


def run_steps(a, url: str, api_key: str, sampler: QueueSampler | None, out_dir: Path) -> tuple[list[dict], dict]:
    control, jobs_path = out_dir / "control.json", out_dir / "jobs.jsonl"
    jobs_path.unlink(missing_ok=True)
    control.write_text(json.dumps({"jpm": 0}))
    prefix = str(out_dir / "locust")
    cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locust_capacity.py"), "--headless", "--host", url,
           "-u", "1", "-r", "1", "--run-time", f"{int(a.max_time + a.drain_s + 60)}s", "--stop-timeout", "5",
           "--csv", prefix, "--json-file", prefix, "--only-summary", "--loglevel", "WARNING"]
    env = {**os.environ, "CINEVIVID_API_KEY": api_key, "CINEVIVID_CAPACITY_CONTROL": str(control),
           "CINEVIVID_CAPACITY_JOBS": str(jobs_path), "CINEVIVID_CAPACITY_ARRIVALS": a.arrivals,
           "CINEVIVID_CAPACITY_DRAIN_S": str(a.drain_s), "CINEVIVID_CAPACITY_BODY": json.dumps(a.body),
           "CINEVIVID_CAPACITY_SEED": str(a.seed)}
    print("[capacity] running:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, env=env)
    steps: list[dict] = []
    t_start = time.time()
    jpm, i = a.start_jpm, 0
    try:
        time.sleep(3)  # Locust's start-up
        if sampler:
            sampler.take()
        while True:
            i += 1
            app_before = sampler.last_app if sampler else None
            t0 = time.time()
            control.write_text(json.dumps({"step": i, "jpm": jpm}))
            time.sleep(a.step_s)
            t1 = time.time()
            s = step_stats(read_jobs(jobs_path), {"step": i, "jpm": jpm, "t0": t0, "t1": t1}, now=t1)
            samples = sampler.take() if sampler else []
            s["queues"] = queue_summary(samples)
            s["replicas"] = replica_summary(samples)
            s["stage_seconds"] = stage_seconds(app_before, sampler.last_app if sampler else None)
            s["reasons"] = saturation_reasons(s, min_ratio=a.min_ratio, max_p95_s=a.max_p95_s,
                                              max_fail_ratio=a.max_fail_ratio)
            steps.append(s)
            qtxt = ", ".join(f"{d}: {q['mean']}" for d, q in s["queues"].items())
            print(f"[capacity] step {i}: offered {s['offered_jpm']:.1f} (target {jpm:.1f}) completed "
                  f"{s['completed_jpm']:.1f} jobs/min, p50/p95/p99 {_v(s['p50_s'])}/{_v(s['p95_s'])}/"
                  f"{_v(s['p99_s'])} s, unfinished {s['unfinished']}, failed {s['failed']}, refused {s['refused']}; "
                  f"queues {qtxt}"
                  f"{' -> SATURATED: ' + '; '.join(s['reasons']) if s['reasons'] else ''}", flush=True)
            if should_stop(steps):
                print("[capacity] saturation confirmed by the next step: stopping", flush=True)
                break
            if proc.poll() is not None:
                print(f"[capacity] locust exited early (rc {proc.returncode})", flush=True)
                break
            if i >= a.max_steps or time.time() - t_start + a.step_s > a.max_time:
                print("[capacity] --max-time / --max-steps reached: stopping", flush=True)
                break
            jpm = next_rate(jpm, a.factor, a.increment)
    finally:
        control.write_text(json.dumps({"stop": True}))
        print(f"[capacity] arrivals stopped; draining the jobs in flight (at most {a.drain_s:g} s)", flush=True)
        try:
            proc.wait(timeout=a.drain_s + 60)
        except subprocess.TimeoutExpired:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
            if proc.poll() is None:
                proc.kill()
    # final figures with every job's end known (still-running jobs as lower bounds)
    jobs = read_jobs(jobs_path)
    now = time.time()
    for s in steps:
        s.update({k: v for k, v in step_stats(jobs, {"step": s["step"], "jpm": s["target_jpm"], "t0": s["t0"],
                                                      "t1": s["t1"]}, now).items()})
        s["reasons"] = saturation_reasons(s, min_ratio=a.min_ratio, max_p95_s=a.max_p95_s,
                                          max_fail_ratio=a.max_fail_ratio)
    return steps, {"locust_rc": proc.returncode, "jobs": len(jobs),
                   "jobs_by_status": _count(j.get("status") or "unfinished" for j in jobs)}


def _count(items) -> dict:
    out: dict = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--host", default=None, help="base URL of a running CineVivid; omit to start a local stack")
    ap.add_argument("--api-key", default=os.environ.get("CINEVIVID_API_KEY"))
    ap.add_argument("--ray-address", default=None,
                    help="with --host: the cluster's Ray address, to read Serve's queue metrics (else none)")
    ap.add_argument("--config", default=None, help="Serve config of the local stack (default serve_config.yaml)")
    ap.add_argument("--start-jpm", type=float, default=10.0, help="offered load of the first step, jobs/min")
    ap.add_argument("--factor", type=float, default=1.5, help="each step's rate = the last one's x this")
    ap.add_argument("--increment", type=float, default=None, help="add this many jobs/min per step instead")
    ap.add_argument("--step-s", type=float, default=45.0, help="seconds each step is held")
    ap.add_argument("--max-time", type=float, default=600.0, help="bound on the stepping, seconds")
    ap.add_argument("--max-steps", type=int, default=12)
    ap.add_argument("--max-p95-s", type=float, default=60.0, help="a step whose p95 job latency exceeds this is saturated")
    ap.add_argument("--min-ratio", type=float, default=0.9,
                    help="a step whose throughput is under this fraction of the offered load is saturated")
    ap.add_argument("--max-fail-ratio", type=float, default=0.02)
    ap.add_argument("--arrivals", choices=("even", "poisson"), default="even")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--body", type=json.loads, default={},
                    help='JSON merged into each job\'s request body (default {}: the model\'s defaults), '
                         'e.g. \'{"num_inference_steps": 8}\'')
    ap.add_argument("--warmup", type=int, default=2, help="jobs run one by one before the first step, not counted")
    ap.add_argument("--drain-s", type=float, default=90.0, help="at most this long for the jobs in flight at the end")
    ap.add_argument("--sample-s", type=float, default=2.0, help="queue metrics sampling interval")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of every model stage (local stack)")
    ap.add_argument("--out-dir", default=str(OUT_DIR))
    ap.add_argument("--report-from", default=None, metavar="JSON",
                    help="only re-render the plot and the page from a capacity.json (no load, no stack)")
    a = ap.parse_args(argv)
    if a.report_from:
        result = json.loads(Path(a.report_from).read_text())
        result["saturation"] = find_saturation(result["steps"])
        if result.get("stage"):
            result["stage"] = saturating_stage(result["steps"], result["saturation"]["index"])
        paths = write_report(result, Path(a.out_dir))
        print(paths["md"].read_text(), flush=True)
        return 0
    if a.start_jpm <= 0 or a.step_s <= 0 or (a.increment is None and a.factor <= 1) or (a.increment is not None and a.increment <= 0):
        ap.error("need a positive --start-jpm and --step-s, and --factor > 1 or --increment > 0")
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    loadavg_before = os.getloadavg()
    t0 = time.monotonic()
    config_path = Path(a.config) if a.config else HERE.parent / "serve_config.yaml"
    deviations: list[str] = []
    with contextlib.ExitStack() as es:
        if a.host:
            url, key = a.host.rstrip("/"), a.api_key
            if not key:
                ap.error("--api-key or $CINEVIVID_API_KEY is needed with --host")
            app_name = None
            if a.ray_address:
                import ray

                ray.init(address=a.ray_address, log_to_driver=False)
                es.callback(ray.shutdown)
                urls = ray_metrics_urls()
                source = f"Serve's Prometheus metrics of the cluster at {a.ray_address} ({len(urls)} node(s)) + the app's /metrics"
            else:
                urls = []
                source = "the app's /metrics job queue only (no --ray-address: Serve's per-deployment queues not read)"
            target = url
        else:
            from loadtests.stack import local_stack

            # Ray exports a gauge's value every metrics_report_interval_ms (10 s by default): at the
            # sampling interval instead, so each step's queue means rest on ~step_s / sample_s values
            report_ms = max(1000, int(a.sample_s * 1000))
            os.environ.setdefault("RAY_metrics_report_interval_ms", str(report_ms))
            print("[capacity] starting a local CineVivid stack ...", flush=True)
            st = es.enter_context(local_stack(threads=a.threads, config_path=config_path))
            url, key, app_name = st.url, st.api_key, st.app
            deviations = [*st.deviations, "Ray's metrics_report_interval_ms: "
                          f"{os.environ['RAY_metrics_report_interval_ms']} (default 10000)"]
            urls = ray_metrics_urls()
            source = (f"Serve's Prometheus metrics ({QUEUED} + {ONGOING}) from Ray's metrics export port "
                      f"({len(urls)} node), and CineVivid's job queue (cinevivid_queue_depth) from /metrics")
            target = f"local stack ({config_path.name} as `cinevivid up` deploys it)"
        if a.warmup:
            warm_up(url, key, a.warmup, a.body)
        sampler = QueueSampler(urls, url, app_name, a.sample_s).start()
        es.callback(sampler.stop)
        steps, run = run_steps(a, url, key, sampler, out_dir)
        sampler_errors = sampler.errors
    sat = find_saturation(steps)
    routes = {}
    if Path(f"{out_dir}/locust_stats.csv").exists():
        from loadtests.run_locust import summarize

        routes = summarize(f"{out_dir}/locust")
    result = {
        "date_utc": started, "command": "python -m loadtests.capacity " + " ".join(argv if argv is not None else sys.argv[1:]),
        "target": target, "workload": workload_of(config_path, a.body) if not a.host or a.body else "the target's default model",
        "arrivals": a.arrivals, "step_s": a.step_s, "start_jpm": a.start_jpm, "factor": a.factor,
        "increment": a.increment, "min_ratio": a.min_ratio, "max_p95_s": a.max_p95_s,
        "max_fail_ratio": a.max_fail_ratio, "body": a.body, "queue_source": source,
        "queue_sampler_errors": sampler_errors, "machine": machine_info(loadavg_before), "deviations": deviations,
        "steps": steps, "saturation": sat, "stage": saturating_stage(steps, sat["index"]) if urls else None,
        "routes": routes, "run": run, "wall_s": round(time.monotonic() - t0, 1)}
    paths = write_report(result, out_dir)
    print(paths["md"].read_text(), flush=True)
    print(f"[capacity] written {', '.join(str(p) for p in paths.values())}", flush=True)
    return 0 if steps else 1


if __name__ == "__main__":
    sys.exit(main())
