"""The benchmark and load-test tooling itself: bench_gpu's code path runs on the CPU (tiny config)
and its CineVivid run equals diffusers'; the Locust shape is bounded; the runner's summary reads
Locust's CSV. No timings are asserted."""

from __future__ import annotations

import json

import pytest


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


def _need_locust() -> None:
    import importlib.util

    if importlib.util.find_spec("locust") is None:  # find_spec: no import, no gevent patching here
        pytest.skip("locust is not installed (pip install -e '.[load]')")


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
