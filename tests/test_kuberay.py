"""`cinevivid kuberay`: the RayService manifests committed in configs/kuberay/ are what the command
writes for each preset (no drift), they validate against KubeRay's RayService CRD schema (v1, with
unknown fields refused, as the API server's strict field validation does), their serveConfigV2 is
a valid CineVivid Serve config, and the worker group is sized from the deployments' GPUs."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import jsonschema
import pytest
import yaml

from serve.ops.cli import main
from serve.ops.deploy import load_serve_config, validate_serve_config
from serve.ops.kuberay import rayservice_manifest, render, worker_group_size
from serve.ops.serve_env import SERVE_ENV

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
CRD = Path(__file__).parent / "data" / "ray.io_rayservices.yaml"
DOCKERFILE = ROOT / "configs" / "kuberay" / "Dockerfile"
PVC = ROOT / "configs" / "kuberay" / "pvc-cinevivid-data.yaml"
REGENERATE = ("for f in configs/*.yaml; do cinevivid kuberay --config $f "
              "-o configs/kuberay/$(basename $f); done")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 1 MB of YAML


def _strict(schema):
    """The schema with unknown fields refused wherever it lists the known ones (Kubernetes prunes
    them silently; `kubectl apply --validate=strict` refuses them). A misspelt field fails here."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def rayservice_schema() -> jsonschema.protocols.Validator:
    """A validator of RayService v1 objects, built once (checking the 500 kB schema is the slow part)."""
    crd = yaml.load(CRD.read_text(), Loader=_Loader)
    assert crd["spec"]["names"]["kind"] == "RayService"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(v1["schema"]["openAPIV3Schema"])
    jsonschema.Draft4Validator.check_schema(schema)  # OpenAPI v3 schemas are JSON Schema draft 4 + extensions
    return jsonschema.Draft4Validator(schema)


def _manifest(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_every_preset_has_a_manifest():
    assert PRESETS, "no presets in configs/"
    committed = {p.name for p in (ROOT / "configs" / "kuberay").glob("*.yaml")} - {PVC.name}
    assert committed == {p.name for p in PRESETS}, f"configs/kuberay/ out of step with configs/; run: {REGENERATE}"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_committed_manifest_is_what_the_command_writes(preset, tmp_path, monkeypatch):
    committed = ROOT / "configs" / "kuberay" / preset.name
    out = tmp_path / preset.name
    rel = preset.relative_to(ROOT)
    monkeypatch.chdir(ROOT)
    assert main(["kuberay", "--config", str(rel), "-o", str(out)]) == 0
    assert committed.exists(), f"no {committed.relative_to(ROOT)}; run: {REGENERATE}"
    assert out.read_text() == committed.read_text(), \
        f"{committed.relative_to(ROOT)} is stale (the config or the generator changed); run: {REGENERATE}"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_manifest_validates_against_the_rayservice_crd(preset, rayservice_schema):
    manifest = _manifest(ROOT / "configs" / "kuberay" / preset.name)
    rayservice_schema.validate(manifest)
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")


def test_the_schema_check_can_fail(rayservice_schema):
    manifest = _manifest(ROOT / "configs" / "kuberay" / PRESETS[0].name)
    typo = copy.deepcopy(manifest)
    typo["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3  # misspelt
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        rayservice_schema.validate(typo)
    wrong_type = copy.deepcopy(manifest)
    wrong_type["spec"]["serveConfigV2"] = {"applications": []}  # must be a YAML string
    with pytest.raises(jsonschema.ValidationError):
        rayservice_schema.validate(wrong_type)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_serve_config_v2_is_the_preset_and_validates(preset):
    manifest = _manifest(ROOT / "configs" / "kuberay" / preset.name)
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    apps = validate_serve_config(serve_config)
    original = load_serve_config(preset)
    assert apps["cinevivid"].model_dump() == validate_serve_config(original)["cinevivid"].model_dump()
    assert serve_config["applications"] == original["applications"]
    # what Kubernetes needs: every pod's proxy on 0.0.0.0 (KubeRay's Serve Service spans the pods)
    assert serve_config["proxy_location"] == "EveryNode" and serve_config["http_options"]["host"] == "0.0.0.0"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_worker_pods_hold_the_gpus_the_deployments_ask_for(preset):
    manifest = _manifest(ROOT / "configs" / "kuberay" / preset.name)
    app = load_serve_config(preset)["applications"][0]["args"]
    args = app["deployments"]

    def gpus_of(opts: dict) -> float:
        replicas = (opts.get("autoscaling_config") or {}).get("max_replicas") or opts.get("num_replicas") or 1
        return opts.get("ray_actor_options", {}).get("num_gpus", 0) * replicas

    need = sum(gpus_of(opts) for opts in args.values())
    for model in app["models"][1:]:  # each other model's own Transformer: its options over the transformer's
        need += gpus_of({**args["transformer"], **model.get("transformer_deployment", {})})
    need = round(need, 6)  # 0.4 + 6 + 0.6 is 7
    (group,) = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    gpus = worker["resources"]["limits"]["nvidia.com/gpu"]
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == gpus <= 8
    assert group["maxReplicas"] * gpus >= need > (group["maxReplicas"] - 1) * gpus  # enough, no spare pod
    assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_probes_env_and_auth(preset):
    manifest = _manifest(ROOT / "configs" / "kuberay" / preset.name)
    cluster = manifest["spec"]["rayClusterConfig"]
    port = yaml.safe_load(manifest["spec"]["serveConfigV2"])["http_options"]["port"]
    assert cluster["authOptions"] == {"mode": "token"}
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    (worker,) = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert worker[probe]["httpGet"] == {"path": "/health", "port": port}, probe
        # KubeRay deploys Serve only once the head is Ready: a head probe on /health would deadlock
        assert probe not in head
    assert {"name": "serve", "containerPort": port} in worker["ports"]
    for container in (head, worker):
        env = {e["name"]: e for e in container["env"]}
        for key, value in SERVE_ENV.items():
            assert env[key]["value"] == value
        assert env["CINEVIVID_MODE"]["value"] == "production"
        assert env["CINEVIVID_JWT_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "cinevivid", "key": "jwt-secret"}
        assert "value" not in env["CINEVIVID_DATABASE_URL"]  # secrets only by reference
        assert env["CINEVIVID_DATA_DIR"]["value"] in {m["mountPath"] for m in container["volumeMounts"]}


def _config(**transformer) -> dict:
    deployments = {"transformer": transformer,
                   "text_encoder": {"ray_actor_options": {"num_gpus": 0.2}},
                   "vae": {"ray_actor_options": {"num_gpus": 0.2},
                           "autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}}
    return {"applications": [{"name": "cinevivid", "import_path": "serve.app:build_app", "route_prefix": "/",
                              "args": {"deployments": deployments, "tts": {"providers": ["none"]}}}]}


@pytest.mark.parametrize("transformer, gpus, pods, per_pod, min_pods", [
    # 0.2 + 0.6 + 6 x 1 = 6.8 -> 7 GPUs: one 7-GPU pod
    ({"ray_actor_options": {"num_gpus": 1}, "autoscaling_config": {"min_replicas": 1, "max_replicas": 6}}, 7, 1, 7, 1),
    # 0.2 + 0.6 + 12 x 1 = 12.8 -> 13 GPUs: two 8-GPU pods, one needed at the minimum (1 + 0.4 GPUs)
    ({"ray_actor_options": {"num_gpus": 1}, "autoscaling_config": {"min_replicas": 1, "max_replicas": 12}},
     13, 2, 8, 1),
    # 0.2 + 0.6 + 4 x 0.5 = 2.8 -> 3 GPUs, float noise not rounded up to 4
    ({"ray_actor_options": {"num_gpus": 0.5}, "num_replicas": 4}, 3, 1, 3, 1),
    # 0.2 + 0.6 + 0.2 = 1.0 exactly: one GPU, not two
    ({"ray_actor_options": {"num_gpus": 0.2}}, 1, 1, 1, 1),
])
def test_worker_group_sizing(transformer, gpus, pods, per_pod, min_pods):
    size = worker_group_size(_config(**transformer))
    assert (size["gpus"], size["max_pods"], size["gpus_per_pod"], size["min_pods"]) == (gpus, pods, per_pod, min_pods)
    assert math.ceil(gpus / per_pod) == pods


def test_cpu_only_config_gets_a_cpu_worker_group(rayservice_schema):
    manifest = rayservice_manifest(load_serve_config(ROOT / "serve_config.yaml"), name="cinevivid-tiny",
                                   image="cinevivid:test", ray_version="2.60.0")
    rayservice_schema.validate(manifest)
    (group,) = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["groupName"] == "cpu-workers"
    assert "nvidia.com/gpu" not in group["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_bad_config_is_refused_with_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    config = _config(ray_actor_options={"num_gpus": -1})
    bad.write_text(yaml.safe_dump(config))
    out = tmp_path / "out.yaml"
    assert main(["kuberay", "--config", str(bad), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "num_gpus" in err and "Traceback" not in err and not out.exists()
    with pytest.raises(ValueError, match="RayService name"):
        render(ROOT / "serve_config.yaml", name="Not_A_Name")


# ---- the image and the volume the manifests need ------------------------------------------------
def _manifests() -> list[dict]:
    return [_manifest(ROOT / "configs" / "kuberay" / p.name) for p in PRESETS]


def _claims(manifest: dict) -> set[str]:
    cluster = manifest["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster.get("workerGroupSpecs") or [])]
    return {v["persistentVolumeClaim"]["claimName"] for pod in pods for v in pod["spec"].get("volumes") or []
            if "persistentVolumeClaim" in v}


def _dockerfile(text: str):
    import io

    from dockerfile_parse import DockerfileParser

    return DockerfileParser(fileobj=io.BytesIO(text.encode()))


def _base_image(text: str) -> str:
    """The FROM image with the ARG defaults declared before it substituted (as docker build does)."""
    parser = _dockerfile(text)
    args = {}
    for ins in parser.structure:
        if ins["instruction"] == "FROM":
            break
        if ins["instruction"] == "ARG" and "=" in ins["value"]:
            key, _, value = ins["value"].partition("=")
            args[key.strip()] = value.strip().strip('"')
    parser_with_args = _dockerfile(text)
    parser_with_args.build_args = args
    return parser_with_args.baseimage


def test_dockerfile_parses_and_builds_on_the_manifests_ray():
    """configs/kuberay/Dockerfile parses, is based on Ray's image of the manifests' rayVersion,
    installs CineVivid from the build context, and keeps Ray at that version."""
    text = DOCKERFILE.read_text()
    parser = _dockerfile(text)
    instructions = [ins["instruction"] for ins in parser.structure]
    assert instructions.count("FROM") == 1 and "RUN" in instructions
    versions = {m["spec"]["rayClusterConfig"]["rayVersion"] for m in _manifests()}
    assert len(versions) == 1, versions
    (version,) = versions
    base = _base_image(text)
    assert base.startswith(f"rayproject/ray:{version}-py311-"), base
    run = " ".join(ins["value"] for ins in parser.structure if ins["instruction"] == "RUN")
    assert "pip install" in run and '"ray[serve]==${RAY_VERSION}"' in run
    copied = " ".join(ins["value"] for ins in parser.structure if ins["instruction"] == "COPY")
    for package in ("serve", "deployments", "client", "pyproject.toml"):
        assert package in copied, f"the image does not get {package}"


def test_dockerfile_check_can_fail():
    """The base-image check reads the FROM line: another Ray version is seen."""
    version = _manifests()[0]["spec"]["rayClusterConfig"]["rayVersion"]
    text = DOCKERFILE.read_text()
    assert f"ARG RAY_VERSION={version}\n" in text
    other = _base_image(text.replace(f"ARG RAY_VERSION={version}\n", "ARG RAY_VERSION=1.0.0\n", 1))
    assert other.startswith("rayproject/ray:1.0.0-") and not other.startswith(f"rayproject/ray:{version}-")


def test_pvc_is_the_claim_the_manifests_mount():
    pvc = yaml.safe_load(PVC.read_text())
    assert (pvc["apiVersion"], pvc["kind"]) == ("v1", "PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]  # the head and every worker mount it
    assert pvc["spec"]["resources"]["requests"]["storage"]
    for manifest in _manifests():
        assert _claims(manifest) == {pvc["metadata"]["name"]}
