"""The Prometheus setup in configs/: promtool checks the rules and the config and runs the rules'
unit tests (each alert fires on its series and stays quiet on the others); the seed's three alerts
keep their names and expressions; and every metric the rules and the Grafana dashboard read is
one that CineVivid's /metrics (or Ray) exports. No Ray cluster needed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import missing_tool
import yaml

from promql import cinevivid_exportable, metric_names, ray_exports

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "configs" / "prometheus"
RULES = PROM / "alerting_rules.yml"
RULES_TEST = PROM / "alerting_rules_test.yml"
CONFIG = PROM / "prometheus.yml"
DASHBOARD = ROOT / "configs" / "grafana" / "cinevivid.json"

SEED_ALERTS = {  # the seed's alerts: names and the series they read are contracts
    "HighErrorRate": 'http_requests_total{status=~"5.."}',
    "GPUMemoryHigh": "gpu_memory_usage_percent > 90",
    "DiskSpaceLow": "disk_free_gb < 5",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        msg = "promtool not found: install the Debian package `prometheus` (apt-get install prometheus)"
        missing_tool(msg)
    return path


def _run(promtool: str, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([promtool, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"promtool {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


def _alerts() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for g in groups for rule in g["rules"] if "alert" in rule}


def test_promtool_check_rules(promtool):
    out = _run(promtool, "check", "rules", str(RULES.relative_to(ROOT))).stdout
    assert f"SUCCESS: {len(_alerts())} rules found" in out


def test_promtool_test_rules(promtool):
    out = _run(promtool, "test", "rules", str(RULES_TEST.relative_to(ROOT))).stdout
    assert "SUCCESS" in out


def test_promtool_check_config(promtool):
    out = _run(promtool, "check", "config", str(CONFIG.relative_to(ROOT))).stdout
    assert "SUCCESS: 1 rule files found" in out


def test_promtool_test_rules_catches_a_broken_rule(promtool, tmp_path):
    """The unit tests can fail: with GPUMemoryHigh's threshold moved, they do."""
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    (tmp_path / RULES.name).write_text(RULES.read_text().replace("gpu_memory_usage_percent > 90",
                                                                 "gpu_memory_usage_percent > 99"))
    r = subprocess.run([promtool, "test", "rules", RULES_TEST.name], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "GPUMemoryHigh" in r.stdout + r.stderr


def test_seed_alerts_and_the_operational_ones():
    alerts = _alerts()
    for name, expr in SEED_ALERTS.items():
        assert name in alerts, f"seed alert {name} missing"
        assert expr in " ".join(alerts[name]["expr"].split()), (name, alerts[name]["expr"])
    # a growing queue, the job failure ratio, an unhealthy stage, p95 job latency
    read = {name: metric_names(rule["expr"]) for name, rule in alerts.items()}
    assert any("cinevivid_queue_depth" in r for r in read.values())
    assert any("cinevivid_jobs_finished_total" in r for r in read.values())
    assert any("cinevivid_service_healthy" in r for r in read.values())
    assert any("histogram_quantile(0.95" in rule["expr"] and "cinevivid_job_duration_seconds_bucket" in read[n]
               for n, rule in alerts.items())
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_every_alert_has_a_firing_and_a_quiet_case():
    cases: dict[str, set[str]] = {}
    for group in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for t in group.get("alert_rule_test", []):
            cases.setdefault(t["alertname"], set()).add("fires" if t.get("exp_alerts") else "quiet")
    for name in _alerts():
        assert cases.get(name) == {"fires", "quiet"}, f"{name}: unit-test cases {cases.get(name)}"


def test_metric_names_of_a_promql_expression():
    expr = ('histogram_quantile(0.95, sum by (le, route) (rate(http_request_duration_seconds_bucket'
            '{job=~"$job", route!="unmatched"}[$__rate_interval]))) > 1e3 and on (job) up offset 5m')
    assert metric_names(expr) == {"http_request_duration_seconds_bucket", "up"}


@pytest.fixture(scope="module")
def exportable(tmp_path_factory) -> set[str]:
    names = cinevivid_exportable(tmp_path_factory.mktemp("metrics"))
    # the families the rules and dashboards are built on
    assert {"http_requests_total", "disk_free_gb", "gpu_memory_usage_percent", "cinevivid_queue_depth",
            "cinevivid_job_duration_seconds_bucket", "cinevivid_denoising_step_seconds_sum"} <= names
    assert "cinevivid_http_requests_total" not in names  # one name per quantity (see serve/api/metrics.py)
    return names


def _unknown(names: set[str], exportable: set[str]) -> set[str]:
    return {n for n in names if n not in exportable and not ray_exports(n) and n != "up"}


def test_the_checker_flags_a_metric_nobody_exports(exportable):
    assert _unknown({"cinevivid_no_such_metric_total", "ray_no_such_metric"}, exportable) == \
        {"cinevivid_no_such_metric_total", "ray_no_such_metric"}
    assert _unknown({"ray_serve_deployment_request_counter_total", "http_requests_total"}, exportable) == set()


def test_alert_rules_read_only_exported_metrics(exportable):
    for name, rule in _alerts().items():
        names = metric_names(rule["expr"])
        assert names, name
        assert not _unknown(names, exportable), f"{name} reads {_unknown(names, exportable)}"


def test_grafana_dashboard_reads_only_exported_metrics(exportable):
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"]
    exprs: list[tuple[str, str]] = []
    for panel in dash["panels"]:
        for panel_ in [panel, *panel.get("panels", [])]:
            for target in panel_.get("targets", []):
                exprs.append((panel_["title"], target["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", q.strip())  # label_values(<series>, <label>)
            exprs.append((f"${var['name']}", m.group(1) if m else q))
    assert len(exprs) >= 20
    seen: set[str] = set()
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"panel {title!r}: no metric in {expr!r}"
        assert not _unknown(names, exportable), f"panel {title!r} reads {_unknown(names, exportable)}"
        seen |= names
    # the dashboard shows the seed's metrics, the jobs and stages, and Ray's Serve metrics
    assert {"http_requests_total", "gpu_memory_usage_percent", "disk_free_gb", "cinevivid_queue_depth",
            "cinevivid_stage_duration_seconds_bucket", "cinevivid_denoising_step_seconds_sum",
            "cinevivid_tts_failures_total", "cinevivid_service_healthy"} <= seen
    assert any(n.startswith("ray_serve_") for n in seen) and any(n.startswith("ray_node_") for n in seen)


class _FakeNvml:
    """Stands in for `pynvml` (NVIDIA's NVML bindings), which needs an NVIDIA driver this CPU
    machine lacks: two GPUs, one 95% full. The real library is used wherever a driver exists."""

    class Mem:
        def __init__(self, used, total):
            self.used, self.total = used, total

    def __init__(self, fail_init: bool = False):
        self.fail_init = fail_init
        self.mems = [self.Mem(95 * 2**30, 100 * 2**30), self.Mem(10 * 2**30, 80 * 2**30)]

    def nvmlInit(self):
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self):
        return len(self.mems)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetMemoryInfo(self, handle):
        return self.mems[handle]


def test_gpu_memory_family_from_nvml(monkeypatch):
    import sys

    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from serve.jobs.node_metrics import NvmlGpuCollector

    def scrape(nvml) -> str:
        monkeypatch.setitem(sys.modules, "pynvml", nvml)
        registry = CollectorRegistry()
        registry.register(NvmlGpuCollector())
        return generate_latest(registry).decode()

    text = scrape(_FakeNvml())
    samples = {s.labels["gpu"]: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples == {"0": 95.0, "1": 12.5}
    assert "gpu_memory_usage_percent" not in scrape(_FakeNvml(fail_init=True))  # no driver: no family
