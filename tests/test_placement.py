"""GPUs placed as planned, or a clear refusal (issue 21): Ray accepts logical GPUs on a CPU node, so a
cluster of our own with 1 and with 2 of them (a subprocess, separate from the session cluster,
loopback only) runs a GPU-shaped config with the real fractions (the tiny model, torch on the CPU).
Ray grants each replica the share the plan says (its runtime context), the GPU ids Ray handed the
replicas group them as `cinevivid plan` predicts, and a config that needs more GPUs than the cluster
has is refused naming the deployment and the arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from serve.ops.plan import PlanDoesNotFit, check_fits, format_plan, pack, plan_rows
from serve.ops.deploy import load_serve_config
from serve.stages import GENERATOR, IMAGE_ENCODER, TEXT_ENCODER, TRANSFORMER, VAE

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.fast
def test_the_14b_preset_packs_whole_gpus_first_and_is_refused_on_two():
    rows = plan_rows(load_serve_config(ROOT / "configs/skyreels-v2-t2v-14b-540p.yaml"))
    packing = pack(rows, 3)
    assert [sorted(d for d, _ in g) for g in packing] == [
        [TRANSFORMER.deployment], [TRANSFORMER.deployment_for("skyreels-v2-i2v-14b-540p")],
        sorted([IMAGE_ENCODER.deployment, TEXT_ENCODER.deployment, VAE.deployment])]
    with pytest.raises(PlanDoesNotFit) as e:
        check_fits(rows, {"GPU": 2})
    assert "2.5 GPUs" in str(e.value) and "Transformer 1 x 1" in str(e.value) and "the cluster has 2" in str(e.value)
    text = format_plan(rows, {"GPU": 8})
    assert "cinevivid/Transformer " in text and "1..4" in text and "total: GPUs 2.5..7.1" in text


@pytest.mark.fast
def test_a_fraction_that_fits_the_sum_but_not_one_gpu_is_refused_by_name():
    cfg = {"applications": [{"name": "a", "import_path": "serve.app:build_app", "args": {
        "deployments": {"transformer": {"ray_actor_options": {"num_gpus": 0.6}, "num_replicas": 3},
                        "text_encoder": {"ray_actor_options": {"num_gpus": 0.0}}}}}]}
    rows = plan_rows(cfg)  # 1.8 GPUs in all, but two 0.6 shares never share one GPU
    with pytest.raises(PlanDoesNotFit) as e:
        check_fits(rows, {"GPU": 2})
    assert "a/Transformer: replica 3 of its minimum 3 needs 0.6 of one GPU" in str(e.value)


@pytest.mark.parametrize("gpus", [1, pytest.param(2, marks=pytest.mark.fast)])  # 2 GPUs in the fast tier
def test_replicas_get_the_planned_gpu_share_and_pack_as_planned(gpus, tmp_path, tiny_model_dir):
    # not the session cluster's address, nor its HAProxy's files and ports (placement_cluster.py
    # gives its own cluster fresh ones, as the launcher does for every cluster it starts)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_SERVE_HAPROXY_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    temp_dir = Path("/tmp") / f"cvplace-{os.getpid()}-{gpus}"
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "tests/placement_cluster.py"), str(gpus), str(temp_dir)],
                              env=env, capture_output=True, text=True, timeout=600)
    finally:
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PLACEMENT ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(line[len("PLACEMENT "):])
    assert out["resources"]["GPU"] == gpus

    # the config that needs one GPU more than the cluster has: refused, naming the deployments and the sum
    assert out["refusal"] and f"the cluster has {gpus}" in out["refusal"] and TRANSFORMER.deployment in out["refusal"], out

    # each replica asked for (and got) the share the plan gives its deployment
    replicas = out["replicas"]
    assert set(replicas) == {s.deployment for s in (TEXT_ENCODER, TRANSFORMER, VAE, GENERATOR)}, replicas
    for name, r in replicas.items():
        assert r["num_gpus"] == out["plan"][name], (name, r)
        want = 0 if out["plan"][name] == 0 else max(1, int(out["plan"][name]))
        assert len(r["gpu_ids"]) == want, (name, r)

    # and the replicas share GPUs as the plan predicted
    by_gpu = defaultdict(list)
    for name, r in replicas.items():
        for gpu_id in r["gpu_ids"]:
            by_gpu[gpu_id].append(name)
    assert sorted(sorted(v) for v in by_gpu.values()) == out["predicted"], (dict(by_gpu), out["predicted"])


@pytest.mark.fast
@pytest.mark.parametrize("gpus,rc", [(2, 1), (3, 0)])
def test_the_plan_command_against_a_cluster_size(gpus, rc):
    proc = subprocess.run([sys.executable, "-m", "serve.ops.cli", "plan", "configs/skyreels-v2-t2v-14b-540p.yaml",
                           "--gpus", str(gpus)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == rc, proc.stdout + proc.stderr
    assert "total: GPUs 2.5..7.1" in proc.stdout
    if rc:
        assert "does not fit: the minimum replicas ask 2.5 GPUs" in proc.stdout and "the cluster has 2" in proc.stdout
    else:
        assert "GPU 2: 0.5 used: TextEncoder 0.2, VAEDecoder 0.2, ImageEncoder 0.1" in proc.stdout
