"""The stage registry (serve/stages.py) is the one home of each stage's names, class, live levers
and default options: config, the builder and the deployments agree with it, and no Serve
deployment name is written out anywhere else in the code (like tests/test_layers.py for imports)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from serve.app import deployment_plan, transformer_deployment_name
from serve.config import LIVE_LEVERS, STAGE_DEFAULTS, AppArgs, DeploymentsConfig, LeversConfig
from serve.stages import (
    BY_NAME, GENERATOR, IMAGE_ENCODER, INGRESS, STAGES, TEXT_ENCODER, TRANSFORMER, TTS, VAE, model_of_deployment,
    stage_of_deployment,
)

pytestmark = pytest.mark.fast  # the fast tier (make test)

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "serve" / "stages.py"
THIS = Path(__file__).resolve()
CODE = ("serve", "client", "deployments", "tests", "loadtests")


def stray_names(path: Path) -> list[str]:
    """Where a file writes a Serve deployment name as a string literal: the whole string, or the
    start of one ("Transformer-" in f"Transformer-{model}")."""
    names = {s.deployment for s in STAGES}
    prefixes = tuple(f"{s.deployment}-" for s in STAGES if s.per_model)
    tree = ast.parse(path.read_text(), filename=str(path))
    # a module's `__all__` lists its own names (deployments/tts.py exports its class TTS)
    exported = {id(c) for n in tree.body if isinstance(n, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets) for c in ast.walk(n.value)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in exported:
            if node.value in names or node.value.startswith(prefixes):
                out.append(f"{path}:{node.lineno}: {node.value!r}")
    return out


def test_no_deployment_name_is_written_outside_the_registry():
    # this file spells the names on purpose: the compatibility of an old config is checked below
    files = [p for pkg in CODE for p in sorted((ROOT / pkg).rglob("*.py")) if p not in (REGISTRY, THIS)]
    assert len(files) > 50
    bad = [hit for path in files for hit in stray_names(path)]
    assert not bad, "use serve.stages (e.g. VAE.deployment) instead of:\n" + "\n".join(bad)


def test_the_literal_checker_sees_a_stray_name(tmp_path):
    fake = tmp_path / "m.py"
    fake.write_text('h = get("VAEDecoder")\nname = f"Transformer-{m}"\nok = "VAEDecoder is the Serve name"\n')
    assert [h.split(": ", 1)[1] for h in stray_names(fake)] == ["'VAEDecoder'", "'Transformer-'"]


def test_each_stage_class_is_the_serve_deployment_the_registry_names():
    for stage in STAGES:
        deployment = stage.load()
        assert deployment.name == stage.deployment, stage


def test_the_vae_stage_is_named_for_what_it_does_and_keeps_its_serve_name():
    # it encodes (extension, I2V) as well as decodes; users' configs and dashboards say "VAEDecoder"
    cls = VAE.load().func_or_class
    assert cls.__name__ == "VAECodec" and hasattr(cls, "encode") and hasattr(cls, "decode")
    assert VAE.deployment == "VAEDecoder" and BY_NAME["vae"] is VAE


def test_an_old_config_naming_the_vae_deployment_still_applies():
    # a Serve config file's `deployments:` entry written before the class was renamed
    plan = deployment_plan(AppArgs(), {"VAEDecoder": {"num_replicas": 3, "user_config": {"vae_tiling": True}}})
    assert plan[VAE.deployment]["num_replicas"] == 3
    assert plan[VAE.deployment]["user_config"] == {"vae_tiling": True}


def test_config_reads_its_stage_facts_from_the_registry():
    assert set(DeploymentsConfig.model_fields) == set(BY_NAME)
    assert LIVE_LEVERS == {s.name: s.live_levers for s in STAGES if s.live_levers}
    assert set(LIVE_LEVERS) == {TEXT_ENCODER.name, TRANSFORMER.name, VAE.name}
    assert all(lever in LeversConfig.model_fields for levers in LIVE_LEVERS.values() for lever in levers)
    assert STAGE_DEFAULTS[INGRESS.name]["max_queued_requests"] == 512
    args = AppArgs()
    for stage in STAGES:
        options = getattr(args.deployments, stage.name)
        for key, value in stage.default_options.items():
            assert getattr(options, key) == value, (stage, key)
    with pytest.raises(ValueError, match="only the model stages"):
        AppArgs.model_validate({"deployments": {TTS.name: {"torch_threads": 2}}})
    AppArgs.model_validate({"deployments": {IMAGE_ENCODER.name: {"torch_threads": 2}}})


def test_the_plan_names_each_deployment_from_the_registry():
    args = AppArgs.model_validate({"models": [{"name": "a"}, {"name": "b"}], "tts": {"providers": ["none"]}})
    plan = deployment_plan(args)
    assert list(plan) == [TEXT_ENCODER.deployment, TRANSFORMER.deployment, TRANSFORMER.deployment_for("b"),
                          VAE.deployment, GENERATOR.deployment, INGRESS.deployment]
    assert transformer_deployment_name(args, "a") == "Transformer"
    assert transformer_deployment_name(args, "b") == "Transformer-b"


def test_a_deployment_name_maps_back_to_its_stage_and_model():
    assert stage_of_deployment(TRANSFORMER.deployment_for("cinevivid-tiny-df")) is TRANSFORMER
    assert model_of_deployment(TRANSFORMER.deployment_for("cinevivid-tiny-df")) == "cinevivid-tiny-df"
    assert model_of_deployment(TRANSFORMER.deployment) is None
    assert stage_of_deployment(VAE.deployment) is VAE and model_of_deployment(VAE.deployment) is None
    assert VAE.deployment_for("x") == VAE.deployment  # a shared stage: one deployment for every model
    assert stage_of_deployment(f"{VAE.deployment}-x") is None
    assert stage_of_deployment("SomethingElse") is None
