"""`cinevivid kuberay`: a KubeRay RayService manifest (ray.io/v1) for a Serve config.

    cinevivid kuberay --config configs/skyreels-v2-t2v-14b-540p.yaml -o configs/kuberay/skyreels-v2-t2v-14b-540p.yaml

The manifest holds:

- `serveConfigV2`: the config file as Serve reads it (validated first), with two changes a
  Kubernetes cluster needs: HTTP on 0.0.0.0, and a proxy (HAProxy) on every node
  (`proxy_location: EveryNode`), because KubeRay's Serve Service sends traffic to every Ready
  worker pod.
- A head group that runs no replicas (`num-cpus: "0"`: GCS, dashboard, controller) and one worker
  group sized from the deployments: the GPUs they can ask for at most (`num_gpus` x the largest
  replica count, autoscaling `max_replicas` or `num_replicas`, summed, rounded up to whole GPUs)
  packed into worker pods of `--gpus-per-worker` GPUs (`nvidia.com/gpu` requests = limits); the
  Ray autoscaler keeps between the pods the minimum replica counts need and that. A config without
  GPUs gets a CPU worker group.
- Worker probes on `/health` of the Serve HTTP port (startup, readiness, liveness). The head keeps
  KubeRay's own probes: KubeRay deploys the Serve config only once the head pod is Ready, so a head
  probe on `/health` would wait forever.
- Ray token auth (`authOptions.mode: token`: KubeRay makes the token Secret and sets `RAY_AUTH_MODE`
  / `RAY_AUTH_TOKEN` in every pod), the Serve environment of `serve.ops.serve_env` (HAProxy), and
  the `CINEVIVID_*` settings: production mode, the JWT secret and database URL from a Secret, the
  data dir (artifacts, shared by the ingress replicas) on a ReadWriteMany volume.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from serve.config import DEFAULT_DASHBOARD_PORT, DEFAULT_HTTP_PORT
from serve.ops.deploy import load_serve_config, validate_serve_config
from serve.ops.plan import plan_rows
from serve.ops.serve_env import SERVE_ENV

GPUS_PER_WORKER = 8
MAX_NAME_LENGTH = 47  # KubeRay's limit for a RayService name (its RayCluster names add a suffix)
DATA_DIR = "/data/cinevivid"
CACHE_DIR = "/cache"
HEALTH_PATH = "/health"

def resource_demand(config: dict[str, Any]) -> dict[str, float]:
    """What the config's CineVivid apps ask of the cluster, from the plan (`serve.ops.plan`, the same
    rows `cinevivid plan` prints): GPUs and CPUs at their largest replica counts (`max_gpus`,
    `max_cpus`) and at their smallest (`min_gpus`). Serve's own `deployments:` overrides in an app
    entry count over the app's `args`."""
    rows = plan_rows(config)
    return {"max_gpus": sum(r.max_gpus for r in rows), "min_gpus": sum(r.min_gpus for r in rows),
            "max_cpus": sum(r.cpus * r.max_replicas for r in rows)}


class _ManifestDumper(yaml.SafeDumper):
    """Plain YAML for people: no anchors/aliases, multi-line strings (serveConfigV2) as `|` blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_ManifestDumper.add_representer(str, _str)


def to_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_ManifestDumper, sort_keys=False, width=120)


def _whole(x: float) -> int:
    """Round up to a whole number, ignoring float noise (0.4 + 6 + 0.6 is 7, not 8)."""
    return math.ceil(round(x, 6))


def worker_group_size(config: dict[str, Any], gpus_per_worker: int = GPUS_PER_WORKER) -> dict[str, int]:
    """The worker pods for a config: GPUs per pod, and how many pods at least and at most."""
    if gpus_per_worker < 1:
        raise ValueError("gpus_per_worker must be at least 1")
    demand = resource_demand(config)
    gpus = _whole(demand["max_gpus"])
    if gpus == 0:
        return {"gpus_per_pod": 0, "min_pods": 1, "max_pods": 1, "gpus": 0, "cpus": _whole(demand["max_cpus"])}
    per_pod = min(gpus_per_worker, gpus)
    max_pods = math.ceil(gpus / per_pod)
    min_pods = max(1, min(max_pods, math.ceil(_whole(demand["min_gpus"]) / per_pod)))
    cpus_per_pod = math.ceil(demand["max_cpus"] / max_pods) if demand["max_cpus"] else 0
    return {"gpus_per_pod": per_pod, "min_pods": min_pods, "max_pods": max_pods, "gpus": gpus,
            "cpus": cpus_per_pod}


def _env(secret: str) -> list[dict[str, Any]]:
    """Every Ray container's environment: the Serve settings (HAProxy) and CineVivid's."""
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in SERVE_ENV.items()]
    env += [
        {"name": "CINEVIVID_MODE", "value": "production"},
        {"name": "CINEVIVID_DATA_DIR", "value": DATA_DIR},
        {"name": "CINEVIVID_CACHE_DIR", "value": f"{CACHE_DIR}/cinevivid"},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "CINEVIVID_JWT_SECRET", "valueFrom": {"secretKeyRef": {"name": secret, "key": "jwt-secret"}}},
        # PostgreSQL for several ingress replicas; without it, SQLite in the data dir
        {"name": "CINEVIVID_DATABASE_URL",
         "valueFrom": {"secretKeyRef": {"name": secret, "key": "database-url", "optional": True}}},
        {"name": "ELEVENLABS_API_KEY",
         "valueFrom": {"secretKeyRef": {"name": secret, "key": "elevenlabs-api-key", "optional": True}}},
    ]
    return env


def _probe(port: int, *, period: int, timeout: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": HEALTH_PATH, "port": port}, "periodSeconds": period,
            "timeoutSeconds": timeout, "failureThreshold": failures}


def _pod_template(container: dict[str, Any], data_pvc: str) -> dict[str, Any]:
    mounts = [{"name": "data", "mountPath": DATA_DIR}, {"name": "model-cache", "mountPath": CACHE_DIR},
              {"name": "dshm", "mountPath": "/dev/shm"}]  # the object store lives in /dev/shm
    volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": data_pvc}},
               {"name": "model-cache", "emptyDir": {}},
               {"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    return {"spec": {"containers": [{**container, "volumeMounts": mounts}], "volumes": volumes}}


def _serve_config_for_kubernetes(config: dict[str, Any]) -> dict[str, Any]:
    http = {**(config.get("http_options") or {}), "host": "0.0.0.0"}
    http.setdefault("port", DEFAULT_HTTP_PORT)
    out = {k: v for k, v in config.items() if k not in ("proxy_location", "http_options")}
    return {"proxy_location": "EveryNode", "http_options": http, **out}


def default_name(config_path: str | Path) -> str:
    stem = re.sub(r"[^a-z0-9-]+", "-", Path(config_path).stem.lower()).strip("-")
    return f"cinevivid-{stem}" if not stem.startswith("cinevivid") else stem


def rayservice_manifest(config: dict[str, Any], *, name: str, image: str, ray_version: str,
                        gpus_per_worker: int = GPUS_PER_WORKER, secret: str = "cinevivid",
                        data_pvc: str = "cinevivid-data", memory_per_gpu_gi: int = 96) -> dict[str, Any]:
    """The RayService for a Serve config (raises pydantic.ValidationError on a bad config)."""
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"RayService name {name!r}: lowercase letters, digits and '-', "
                         f"at most {MAX_NAME_LENGTH} characters")
    serve_config = _serve_config_for_kubernetes(config)
    validate_serve_config(serve_config)
    size = worker_group_size(serve_config, gpus_per_worker)
    port = int(serve_config["http_options"]["port"])
    env = _env(secret)
    head = {
        "name": "ray-head", "image": image, "env": env,
        "ports": [{"name": "gcs-server", "containerPort": 6379},
                  {"name": "dashboard", "containerPort": DEFAULT_DASHBOARD_PORT},
                  {"name": "client", "containerPort": 10001}, {"name": "serve", "containerPort": port},
                  {"name": "metrics", "containerPort": 8080}],
        "resources": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}},
    }
    gpus = size["gpus_per_pod"]
    cpus = size["cpus"] + 2  # the replicas' CPUs plus the raylet, proxy and object store
    memory = f"{max(gpus, 1) * memory_per_gpu_gi}Gi"
    resources: dict[str, dict[str, Any]] = {"requests": {"cpu": str(cpus), "memory": memory},
                                            "limits": {"cpu": str(cpus), "memory": memory}}
    if gpus:
        resources["requests"]["nvidia.com/gpu"] = gpus
        resources["limits"]["nvidia.com/gpu"] = gpus
    worker = {
        "name": "ray-worker", "image": image, "env": env,
        "ports": [{"name": "serve", "containerPort": port}, {"name": "metrics", "containerPort": 8080}],
        "resources": resources,
        # the first start downloads and loads the weights: up to an hour before the first healthy answer
        "startupProbe": _probe(port, period=10, timeout=5, failures=360),
        "readinessProbe": _probe(port, period=10, timeout=5, failures=3),
        # restart a worker only after 5 minutes of unhealthy answers (or none)
        "livenessProbe": _probe(port, period=30, timeout=10, failures=10),
    }
    worker_group = {
        "groupName": "gpu-workers" if gpus else "cpu-workers",
        "replicas": size["min_pods"], "minReplicas": size["min_pods"], "maxReplicas": size["max_pods"],
        "rayStartParams": {},
        "template": _pod_template(worker, data_pvc),
    }
    if gpus:
        worker_group["template"]["spec"]["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "cinevivid"}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False, width=1_000_000),
            "rayClusterConfig": {
                "rayVersion": ray_version,
                "enableInTreeAutoscaling": size["min_pods"] < size["max_pods"],
                "authOptions": {"mode": "token"},
                "headGroupSpec": {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                                  "template": _pod_template(head, data_pvc)},
                "workerGroupSpecs": [worker_group],
            },
        },
    }


def render(config_path: str | Path, **kw: Any) -> str:
    """The manifest for a config file as YAML text, with a header naming the command that wrote it."""
    import ray

    config = load_serve_config(config_path)
    kw.setdefault("name", default_name(config_path))
    kw.setdefault("image", f"cinevivid:{_package_version()}")
    kw.setdefault("ray_version", ray.__version__)
    manifest = rayservice_manifest(config, **kw)
    size = worker_group_size(_serve_config_for_kubernetes(config), kw.get("gpus_per_worker", GPUS_PER_WORKER))
    header = (f"# Generated by `cinevivid kuberay --config {Path(config_path).as_posix()}`; do not edit by hand.\n"
              "# For the KubeRay operator >= 1.6 (Ray token auth through `authOptions`).\n"
              f"# A RayService (KubeRay) for that Serve config: {size['gpus']} GPUs at most, in "
              f"{size['max_pods']} worker pod(s) of {size['gpus_per_pod']} GPU(s).\n"
              f"# Needs: the image (CineVivid installed on rayproject/ray:{kw['ray_version']}), a Secret "
              f"`{kw.get('secret', 'cinevivid')}` (jwt-secret; optional database-url, elevenlabs-api-key),\n"
              f"# a ReadWriteMany PersistentVolumeClaim `{kw.get('data_pvc', 'cinevivid-data')}`. "
              "See docs/operations.md, \"Kubernetes (KubeRay)\".\n")
    return header + to_yaml(manifest)


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cinevivid")
    except PackageNotFoundError:
        return "dev"


# ---- command handler (its parser is in serve.ops.cli) ----
def cmd_kuberay(args) -> int:
    kw = {"gpus_per_worker": args.gpus_per_worker, "secret": args.secret, "data_pvc": args.data_pvc}
    for key in ("name", "image"):
        if getattr(args, key):
            kw[key] = getattr(args, key)
    try:
        text = render(args.config, **kw)
    except Exception as exc:  # noqa: BLE001 - a bad config or option: say what, no traceback
        print(f"error: {args.config}: {exc}", file=sys.stderr)
        return 1
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0
