"""Helpers for the Prometheus tests: the metric names a PromQL expression reads, the names CineVivid's
/metrics can export (from the registry the app really builds, plus the GPU family that only appears
where NVML works), and the names Ray's metrics agent exports (from Ray's installed sources)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan"}
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",), "untyped": ("",),
             "unknown": ("",)}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords, labels or numbers)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery windows
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    s = re.sub(r"\$\{[^}]*\}|\$\w+", " ", s)  # Grafana variables
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        if m.start() > 0 and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue  # the exponent or unit of a number (1e9, 5m)
        if s[m.end():].lstrip().startswith("(") or m.group(0).lower() in _KEYWORDS:
            continue  # a function or aggregation, or a keyword
        names.add(m.group(0))
    return names


def sample_names(families) -> set[str]:
    """Every series name the parsed metric families can have (counter `_total`, histogram `_bucket`...)."""
    return {f.name + suffix for f in families for suffix in _SUFFIXES.get(f.type, ("",))}


def cinevivid_exportable(tmp_path: Path) -> set[str]:
    """The series names CineVivid's /metrics renders: the text of the registry that `create_app`
    builds (what GET /metrics returns), plus `gpu_memory_usage_percent`, which appears only where
    NVML works (its collector's own description)."""
    from prometheus_client.parser import text_string_to_metric_families

    from conftest import tiny_app_args
    from tests.http_fixtures import http_ingress_args
    from serve.api.routes import create_app
    from serve.config import AppArgs
    from serve.jobs.node_metrics import NvmlGpuCollector
    from serve.jobs.service import JobService

    args = AppArgs.model_validate(tiny_app_args(with_ingress=True, ingress=http_ingress_args(tmp_path)))
    app = create_app(JobService(args, generator=None))  # not started: no database, no generator needed
    text = app.state.api.http_metrics.render().decode()
    return sample_names(text_string_to_metric_families(text)) | sample_names(NvmlGpuCollector().describe())


@functools.lru_cache(maxsize=1)
def _ray_metric_strings() -> str:
    import ray

    root = Path(ray.__file__).parent
    return "\n".join(p.read_text(errors="replace") for sub in ("serve", "dashboard", "_private", "util")
                     for p in (root / sub).rglob("*.py"))


def ray_exports(name: str) -> bool:
    """Whether Ray defines a metric that its agent exports as `name` (`ray_` + the metric's name,
    + the type's suffix): the metric name appears as a string literal in Ray's installed sources."""
    if not name.startswith("ray_"):
        return False
    base = name[len("ray_"):]
    candidates = {base} | {base[: -len(s)] for s in ("_total", "_bucket", "_sum", "_count") if base.endswith(s)}
    src = _ray_metric_strings()
    return any(f'"{c}"' in src or f"'{c}'" in src for c in candidates)
