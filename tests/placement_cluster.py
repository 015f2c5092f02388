"""Run as a subprocess by tests/test_placement.py: start a Ray cluster of our own with N logical GPUs
on this CPU machine (loopback only, its own temp dir), ask `serve.ops.plan` what the GPU-shaped
config (its real fractions; the tiny model, torch on the CPU) should look like, deploy it with
Serve, and print as JSON what Ray did: each replica (from the GCS actor table), the GPU share and
the GPU ids Ray granted it (asked of the replica actor), the plan's prediction, and the refusal of a config that needs more
GPUs than the cluster has.

    python tests/placement_cluster.py GPUS TEMP_DIR
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path


def config(app: dict) -> dict:
    return {"applications": [{"name": "placed", "route_prefix": "/placed", "import_path": "serve.app:build_app",
                              "args": app}]}


def app_args(transformer_gpus: float) -> dict:
    """A preset-shaped generator (no ingress): the DF-1.3B preset's fractions on one GPU, or the 14B's
    whole-GPU Transformer beside the encoders' fractions."""
    def stage(gpus: float) -> dict:
        return {"ray_actor_options": {"num_cpus": 0.1, "num_gpus": gpus}}

    return {"name": "placed", "with_ingress": False, "tts": {"providers": ["none"]},
            "deployments": {"text_encoder": stage(0.2), "vae": stage(0.2), "transformer": stage(transformer_gpus),
                            "generator": stage(0.0)}}


def main() -> None:
    gpus, temp_dir = int(sys.argv[1]), sys.argv[2]
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.ops.plan import PlanDoesNotFit, check_fits, plan_rows

    from serve.ops.serve_env import apply_serve_env

    apply_serve_env(haproxy_dir=Path(temp_dir) / "hap")  # this cluster's own HAProxy files and ports
    for attempt in range(3):  # Ray gives a raylet 30 s (hard-coded) to register: a busy box can miss it
        try:
            ray.init(address="local", num_cpus=4, num_gpus=gpus, include_dashboard=False, _temp_dir=temp_dir,
                     _node_ip_address="127.0.0.1", logging_level="ERROR", log_to_driver=False)
            break
        except Exception:  # noqa: BLE001
            ray.shutdown()
            if attempt == 2:
                raise
    resources = {k: float(v) for k, v in ray.cluster_resources().items()}
    fits_cfg = config(app_args(0.5 if gpus == 1 else 1.0))
    too_big = config(app_args(1.0 if gpus == 1 else 2.0))
    out: dict = {"resources": {k: resources.get(k) for k in ("GPU", "CPU")}}
    try:
        check_fits(plan_rows(too_big), resources)
        out["refusal"] = None
    except PlanDoesNotFit as exc:
        out["refusal"] = str(exc)
    rows = plan_rows(fits_cfg)
    packing = check_fits(rows, resources)
    out["plan"] = {r.deployment: r.gpus for r in rows}
    out["predicted"] = sorted(sorted(d for d, _ in gpu) for gpu in packing if gpu)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(fits_cfg["applications"][0]["args"]), name="placed", route_prefix="/placed")
    deadline = time.monotonic() + 300
    replicas = []
    while time.monotonic() < deadline:
        # the GCS actor table (the dashboard-backed `ray.util.state` API needs a dashboard, which this
        # cluster does without to start on a busy box)
        replicas = [a for a in ray._private.state.actors().values()
                    if a["State"] == "ALIVE" and a["ActorClassName"].startswith("ServeReplica:placed:")]
        if len(replicas) >= 4:
            break
        time.sleep(0.5)
    got = {}
    for a in replicas:
        deployment = a["ActorClassName"].split(":", 2)[2]
        handle = ray.get_actor(a["Name"], namespace="serve")
        # what Ray granted the replica's worker, and which GPU ids, asked of the replica actor itself
        granted, ids = ray.get(handle.__ray_call__.remote(lambda self: (
            ray.get_runtime_context().get_assigned_resources(),
            [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])])))
        got[deployment] = {"num_gpus": float(granted.get("GPU", 0.0)), "gpu_ids": ids}
    out["replicas"] = got
    serve.shutdown()
    ray.shutdown()
    print("PLACEMENT " + json.dumps(out))


if __name__ == "__main__":
    main()
