"""The benchmark and load-test tooling itself: bench_gpu's code path runs on the CPU (tiny config)
and its CineVivid run equals diffusers'; the Locust shape is bounded; the runner's summary reads
Locust's CSV; a few seconds of headless Locust against the session's HTTP app send requests of every
user mix and none fails. No timings are asserted."""

from __future__ import annotations

import json

import pytest

from conftest import missing_tool
from serve.stages import GENERATOR, TEXT_ENCODER, TRANSFORMER, VAE


def test_bench_gpu_tiny_config_runs_and_matches_diffusers(tmp_path):
    from loadtests.bench_gpu import main

    out = tmp_path / "bench_gpu.json"
    assert main(["--config", "tiny", "--steps", "4", "--variants", "diffusers,cinevivid,cfg_batch,step_cache,vae_tiling",
                 "--step-cache-threshold", "0.2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    v = result["models"]["tiny"]["variants"]
    assert v["diffusers"]["reference"] is True
    assert v["cinevivid"]["max_abs_diff"] <= 1e-5  # the fidelity rule, through the benchmark's own path
    assert v["cfg_batch"]["max_abs_diff"] <= 1e-5
    assert len(v["cfg_batch"]["probe_changes"]) == 3  # the probe saw steps 2..4
    assert v["step_cache"]["threshold"] == 0.2 and "psnr_db" in v["step_cache"]
    assert v["vae_tiling"]["max_abs_diff"] <= 1e-5  # 64 px frames: smaller than one tile


def test_bench_gpu_refuses_real_sizes_on_cpu_and_runs_the_lever_variants_tiny(tmp_path, capsys):
    """The 30-step lever suite needs a GPU: on a CPU it stops at once with a clear message (no model
    built); its variants run on the tiny model: exact ones equal diffusers, fp8 is refused."""
    import torch

    from loadtests.bench_gpu import main

    assert main(["--suite", "levers30", "--device", "cpu", "--out", str(tmp_path / "no.json")]) == 2
    assert "1.3B, 14B need a CUDA GPU" in capsys.readouterr().err and not (tmp_path / "no.json").exists()

    out = tmp_path / "bench_gpu_levers.json"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny tensors: threads only wait on each other on a busy machine
    try:
        assert main(["--config", "tiny", "--steps", "3", "--budget-s", "9999", "--out", str(out), "--variants",
                     "fp8,diffusers,fp32,attn=_native_math,step_cache=0.1,cache_dit=0.1"]) == 0
    finally:
        torch.set_num_threads(before)
    v = json.loads(out.read_text())["models"]["tiny"]["variants"]
    assert list(v) == ["diffusers", "fp32", "attn=_native_math", "step_cache=0.1", "cache_dit=0.1", "fp8"]  # fp8 last
    assert v["diffusers"]["reference"] is True
    assert v["fp32"]["max_abs_diff"] <= 1e-5  # the tiny run is fp32 already
    assert v["attn=_native_math"]["attention_backend"] == "_native_math" and v["attn=_native_math"]["max_abs_diff"] <= 1e-5
    for key, backend in (("step_cache=0.1", "first_block"), ("cache_dit=0.1", "cache_dit")):
        assert (v[key]["threshold"], v[key]["step_cache_backend"]) == (0.1, backend) and "psnr_db" in v[key]
        assert v[key]["forwards_computed"] + v[key]["forwards_skipped"] == 2 * 3  # cond + uncond, 3 steps
    assert "needs a CUDA GPU" in v["fp8"]["refused"]


def test_bench_batching_sizes_tiny_step_level_is_exact(tmp_path):
    from loadtests.bench_batching import main, parse_sizes

    assert parse_sizes("960x544x97,320x192x33:3", None) == [
        dict(width=960, height=544, num_frames=97, jobs=2), dict(width=320, height=192, num_frames=33, jobs=3)]
    out = tmp_path / "bench_batching.json"
    assert main(["--config", "tiny", "--sizes", "64x64x9:3", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (entry,) = result["sizes"]
    m = entry["modes"]
    assert set(m) == {"sequential", "request", "seq-arrival", "step"}
    assert m["step"]["steps"] == [4, 6, 8] and m["step"]["join_after_steps"] == [0, 2, 4]
    assert m["step"]["engine_steps"] == 12 and m["step"]["mean_batch"] > 1
    assert m["step"]["max_abs_diff"] <= 1e-5 and m["request"]["max_abs_diff"] <= 1e-5
    assert result["exact_fp32"] is True


def _need_locust() -> None:
    import importlib.util

    if importlib.util.find_spec("locust") is None:  # find_spec: no import, no gevent patching here
        missing_tool("locust is not installed (pip install -e '.[load]')")


def _in_subprocess(code: str) -> str:
    """Locust monkey-patches the process with gevent on import: never import it into pytest's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "CINEVIVID_LOCUST_USERS": "40", "CINEVIVID_LOCUST_RUN_TIME_S": "100"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_locust_shape_is_bounded_in_users_and_time():
    _need_locust()
    out = _in_subprocess(
        "import json\n"
        "from loadtests.locust_shape import RampHoldSpikeShape\n"
        "s = RampHoldSpikeShape()\n"
        "ticks = []\n"
        "for t in range(0, 101, 5):\n"
        "    s.get_run_time = lambda t=t: t\n"
        "    ticks.append(s.tick())\n"
        "print(json.dumps(ticks))\n")
    users = json.loads(out.strip().splitlines()[-1])
    assert users[-1] is None  # stops at the run time
    counts = [u[0] for u in users[:-1]]
    assert max(counts) == 40 and min(counts) >= 1
    assert counts[0] < max(counts) and counts[-1] < max(counts)  # ramps up, spikes, ramps down


def test_locustfile_defines_the_user_mixes():
    _need_locust()
    out = _in_subprocess(
        "from loadtests import locustfile as f\n"
        "for c in (f.CreatorUser, f.PollerUser, f.BrowserUser):\n"
        "    assert c.weight >= 1 and c.wait_time is not None\n"
        "    print(c.__name__)\n")
    assert out.split() == ["CreatorUser", "PollerUser", "BrowserUser"]


def test_a_short_headless_locust_run_against_the_app_sends_requests_and_none_fail(http_env, tmp_path):
    """`python -m loadtests.run_locust --host ... --api-key ...` (Locust in its own process, as an
    operator runs it) for a few seconds against the session's HTTP app, every user mix at once:
    Locust's own stats (its JSON and CSV files) count requests on each mix's routes, and no failure."""
    import csv
    import os
    import subprocess
    import sys
    from pathlib import Path

    _need_locust()
    root = Path(__file__).resolve().parents[1]
    prefix = tmp_path / "locust"
    # 5 users, weights 1:3:1: one CreatorUser, three PollerUsers, one BrowserUser; tiny one-step jobs
    cmd = [sys.executable, "-m", "loadtests.run_locust", "--host", http_env.url, "--api-key", http_env.user().api_key,
           "-u", "5", "-r", "5", "-t", "6s", "--steps", "1", "--stop-timeout", "5", "--prefix", str(prefix)]
    proc = subprocess.run(cmd, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stats = json.loads(Path(f"{prefix}.json").read_text())  # Locust's own, one entry per route
    requests = {f"{s['method']} {s['name']}" if not s["name"].startswith(s["method"]) else s["name"]:
                s["num_requests"] for s in stats}
    assert sum(requests.values()) > 0
    assert {s["name"]: s["num_failures"] for s in stats if s["num_failures"]} == {}, proc.stdout[-3000:]
    for route in ("POST /v1/videos", "GET /v1/videos/{id}", "GET /v1/videos"):  # the creator, pollers, browser
        assert requests.get(route, 0) > 0, (route, requests)
    total = {r["Name"]: r for r in csv.DictReader(open(f"{prefix}_stats.csv"))}["Aggregated"]
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0  # (written a moment apart)
    assert list(csv.DictReader(open(f"{prefix}_failures.csv"))) == []


def test_runner_summary_reads_locust_csv(tmp_path):
    from loadtests.run_locust import parse_seconds, summarize

    header = ("Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,"
              "Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,"
              "50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%\n")
    rows = ("GET,GET /v1/videos/{id},100,1,12,14.5,3,80,500,20.0,0.2,12,13,14,15,20,30,40,60,80,80,80\n"
            "POST,POST /v1/videos,10,0,40,41,30,90,600,2.0,0,40,41,42,43,50,60,70,90,90,90,90\n"
            ",Aggregated,110,1,13,17,3,90,510,22.0,0.2,13,14,15,16,25,40,50,70,90,90,90\n")
    (tmp_path / "x_stats.csv").write_text(header + rows)
    s = summarize(str(tmp_path / "x"))
    assert [r["name"] for r in s["routes"]] == ["GET /v1/videos/{id}", "POST /v1/videos"]
    assert s["total"]["requests"] == 110 and s["failure_ratio"] == pytest.approx(1 / 110, abs=1e-5)
    assert s["routes"][0]["p99_ms"] == 60.0
    assert parse_seconds("1m30s") == 90 and parse_seconds("45") == 45


def _synthetic_steps():
    """Four steps of a service that keeps up to ~30 jobs/min and then plateaus, with queue samples
    in which the Transformer's queue grows first and longest."""
    from loadtests.capacity import queue_summary, replica_summary, saturation_reasons, step_stats

    jobs, seq, t = [], 0, 0.0
    steps = []
    for i, (jpm, done_jpm, lat) in enumerate([(10, 10, 2.0), (20, 20, 2.5), (40, 30, 20.0), (60, 30, 45.0)], 1):
        t0, t1 = t, t + 60.0
        for k in range(jpm):
            seq += 1
            sub = t0 + k * 60.0 / jpm
            jobs.append({"seq": seq, "step": i, "submit_t": sub, "status": "completed", "latency_s": lat,
                         "end_t": t0 + k * 60.0 / done_jpm if k < done_jpm else 1e5})
        t = t1
        steps.append({"step": i, "jpm": jpm, "t0": t0, "t1": t1})
    out = []
    for i, st in enumerate(steps):
        s = step_stats(jobs, st, now=1e6)
        tq = [0.3, 0.9, 3.5, 4.0][i]
        samples = [{"t": 0, "job_queue": [0, 0, 5, 12][i],
                    "serve": {TRANSFORMER.deployment: {"queued": 0.0, "ongoing": tq},
                              TEXT_ENCODER.deployment: {"queued": 0.0, "ongoing": 0.1},
                              VAE.deployment: {"queued": 0.0, "ongoing": [0.1, 0.2, 0.6, 0.7][i]},
                              GENERATOR.deployment: {"queued": 0.0, "ongoing": 4.0}},
                    "replicas": {TRANSFORMER.deployment: [0, 1, 2, 2][i], VAE.deployment: 1}}] * 3
        s["queues"] = queue_summary(samples)
        s["replicas"] = replica_summary(samples)
        s["reasons"] = saturation_reasons(s, max_p95_s=30.0)
        out.append(s)
    return out


def test_capacity_reads_replicas_per_stage_from_serve_metrics():
    from loadtests.capacity import parse_serve_replicas, replica_summary

    text = "\n".join([
        '# TYPE ray_serve_deployment_replica_healthy gauge',
        'ray_serve_deployment_replica_healthy{application="cinevivid",deployment="Transformer",replica="a"} 1.0',
        'ray_serve_deployment_replica_healthy{application="cinevivid",deployment="Transformer",replica="b"} 1.0',
        'ray_serve_deployment_replica_healthy{application="cinevivid",deployment="VAEDecoder",replica="c"} 1.0',
        'ray_serve_deployment_replica_healthy{application="other",deployment="Transformer",replica="d"} 1.0'])
    assert parse_serve_replicas(text, "cinevivid") == {TRANSFORMER.deployment: 2.0, VAE.deployment: 1.0}
    summary = replica_summary([{"replicas": {TRANSFORMER.deployment: 0.0}}, {"replicas": {TRANSFORMER.deployment: 2.0}}, {}])
    assert summary == {TRANSFORMER.deployment: {"mean": 1.0, "min": 0.0, "max": 2.0}}


def test_capacity_finds_the_saturation_step_and_stage(tmp_path):
    from loadtests.capacity import find_saturation, next_rate, parse_serve_queues, percentile, saturating_stage, should_stop

    steps = _synthetic_steps()
    assert [s["offered_jpm"] for s in steps] == [10, 20, 40, 60]
    assert [s["completed_jpm"] for s in steps] == [10, 20, 30, 30]
    assert [bool(s["reasons"]) for s in steps] == [False, False, True, True]
    assert "throughput 30.0 < 90% of offered 40.0" in steps[2]["reasons"][0]
    assert should_stop(steps[:4]) and not should_stop(steps[:3])
    sat = find_saturation(steps)
    assert sat["index"] == 2 and sat["confirmed"] and sat["last_ok_index"] == 1 and sat["max_completed_jpm"] == 30
    # a lone saturated step followed by one that keeps up is a fluke, not the saturation point
    fluke = [dict(s) for s in steps]
    fluke[0]["reasons"] = ["p95 99 s > 30 s"]
    assert find_saturation(fluke)["index"] == 2
    stage = saturating_stage(steps, sat["index"])
    assert stage["stage"] == TRANSFORMER.deployment and stage["mean"] == 3.5 and stage["first_busy_step"] == 3
    assert stage["job_queue"]["mean"] == 5
    assert next_rate(10, 1.5) == 15 and next_rate(10, 1.5, increment=5) == 15 and next_rate(20, 2) == 40
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([], 95) is None
    text = ('# HELP x\nray_serve_deployment_queued_queries{application="cinevivid",deployment="Transformer",'
            'handle="h1"} 2.0\nray_serve_deployment_queued_queries{application="cinevivid",deployment="Transformer",'
            'handle="h2"} 1.0\nray_serve_replica_processing_queries{application="cinevivid",deployment="Transformer",'
            'replica="r"} 4.0\nray_serve_replica_processing_queries{application="other",deployment="VAEDecoder"} 9\n')
    assert parse_serve_queues(text, "cinevivid") == {TRANSFORMER.deployment: {"queued": 3.0, "ongoing": 4.0}}


def test_capacity_report_writes_png_json_and_markdown(tmp_path):
    from loadtests.capacity import find_saturation, saturating_stage, write_report

    steps = _synthetic_steps()
    sat = find_saturation(steps)
    result = {"date_utc": "2026-11-30T00:00:00+00:00", "command": "python -m loadtests.capacity", "target": "test",
              "workload": "cinevivid-tiny T2V 64x64, 9 frames, 4 steps", "arrivals": "even", "step_s": 60.0,
              "max_p95_s": 30.0, "queue_source": "synthetic", "machine": {"summary": "test box"},
              "steps": steps, "saturation": sat, "stage": saturating_stage(steps, sat["index"]),
              "routes": {"routes": [{"name": "POST /v1/videos", "requests": 130, "failures": 0, "rps": 0.5,
                                     "p50_ms": 40.0, "p95_ms": 90.0, "p99_ms": 120.0}],
                         "total": {"requests": 130, "failures": 0, "rps": 0.5, "p50_ms": 40.0, "p95_ms": 90.0,
                                   "p99_ms": 120.0}}}
    paths = write_report(result, tmp_path)
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = paths["md"].read_text()
    assert ("Saturates between 20.0 and 40.0 offered jobs/min for cinevivid-tiny T2V 64x64, 9 frames, 4 steps: "
            "it kept up with 20.0 (p95 2.5 s), not with 40.0") in md and "peak throughput 30.0 jobs/min" in md
    assert "first stage to saturate: Transformer" in md
    assert "| 3 **(saturation)** | 40.0 | 40.0 | 30.0 |" in md  # the step table
    assert "| POST /v1/videos | 130 | 0 | 0.50 | 40 | 90 | 120 |" in md  # the per-route table
    assert json.loads(paths["json"].read_text())["saturation"]["index"] == 2


def test_capacity_help_runs():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "loadtests.capacity", "--help"], cwd=root, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "--start-jpm" in proc.stdout and "--max-p95-s" in proc.stdout


def test_capacity_report_from_json_rerenders(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from loadtests.capacity import find_saturation, write_report

    steps = _synthetic_steps()
    result = {"date_utc": "d", "command": "c", "target": "t", "workload": "w", "arrivals": "even", "step_s": 60.0,
              "queue_source": "synthetic", "machine": {"summary": "m"}, "steps": steps,
              "saturation": find_saturation(steps), "stage": None, "routes": {}}
    write_report(result, tmp_path / "a")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "loadtests.capacity", "--report-from", str(tmp_path / "a" / "capacity.json"),
                           "--out-dir", str(tmp_path / "b")], cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Saturates between 20.0 and 40.0" in proc.stdout and (tmp_path / "b" / "capacity.png").stat().st_size > 0
