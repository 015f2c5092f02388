"""serve_config.yaml and configs/: they validate, and their overrides take effect when deployed."""

from __future__ import annotations

import copy
import glob
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError
from ray import serve

from serve.config import AppArgs
from serve.ops.deploy import deploy_serve_config, load_serve_config, validate_serve_config
from serve.stages import GENERATOR, TEXT_ENCODER, TRANSFORMER, VAE

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ["serve_config.yaml", *sorted(glob.glob("configs/*.yaml", root_dir=ROOT))]


@pytest.mark.fast
@pytest.mark.parametrize("path", CONFIGS)
def test_every_config_validates_against_the_app_args(path):
    apps = validate_serve_config(load_serve_config(ROOT / path))
    assert apps, f"{path} deploys no CineVivid app"
    for args in apps.values():
        assert args.model.width % 16 == 0 and args.model.height % 16 == 0
        assert (args.model.num_frames - 1) % 4 == 0
        assert args.model.num_frames <= args.model.max_frames


@pytest.mark.fast
def test_gpu_presets_use_fractional_gpus_and_bounded_queues():
    for path in CONFIGS[1:]:
        (args,) = validate_serve_config(load_serve_config(ROOT / path)).values()
        d = args.deployments
        assert 0 < d.text_encoder.ray_actor_options.num_gpus < 1
        assert 0 < d.vae.ray_actor_options.num_gpus < 1
        assert d.transformer.ray_actor_options.num_gpus > 0
        assert d.transformer.autoscaling_config.max_replicas >= 1
        for stage in ("text_encoder", "transformer", "vae", "generator"):
            assert getattr(d, stage).max_queued_requests < 10_000


@pytest.mark.fast
def test_a_bad_arg_is_rejected_naming_it():
    config = load_serve_config(ROOT / "serve_config.yaml")
    config["applications"][0]["args"]["deployments"]["transformer"]["num_replicas"] = 2  # + autoscaling
    with pytest.raises(ValidationError, match="num_replicas"):
        validate_serve_config(config)
    with pytest.raises(ValidationError, match="max_widht"):
        AppArgs.model_validate({"model": {"max_widht": 10}})


@pytest.mark.fast
def test_a_bad_ingress_setting_fails_at_deploy_time_naming_it():
    config = load_serve_config(ROOT / "serve_config.yaml")
    config["applications"][0]["args"]["ingress"] = {"limits": {"max_upload_bytes": 0}}
    with pytest.raises(ValidationError, match=r"ingress\.limits\.max_upload_bytes"):
        validate_serve_config(config)
    config["applications"][0]["args"]["ingress"] = {"dispatcher": {"lease_secs": 5}}
    with pytest.raises(ValidationError, match="lease_secs"):
        validate_serve_config(config)


def _deployment_details(app: str) -> dict:
    details = serve.context._get_global_client().get_serve_details()
    return details["applications"][app]["deployments"]


def test_serve_config_overrides_take_effect(ray_cluster):
    """Deploy serve_config.yaml with overrides both in our args and in Serve's own
    `deployments:` section, as an operator would, and read back what Serve runs."""
    config = copy.deepcopy(load_serve_config(ROOT / "serve_config.yaml"))
    app = config["applications"][0]
    app["name"] = "overrides"
    app["route_prefix"] = None
    app["args"].update(name="overrides", with_ingress=False, tts={"providers": ["none"]})
    # the default model alone, with a Transformer option of its own (`transformer_deployment`)
    app["args"]["models"] = [{**app["args"]["models"][0], "transformer_deployment": {"health_check_period_s": 7}}]
    app["args"]["deployments"]["vae"] = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.15}}
    app["deployments"] = [{"name": TEXT_ENCODER.deployment, "ray_actor_options": {"num_cpus": 0.3}}]
    config.pop("http_options")  # keep the session's Serve instance as it is
    config.pop("proxy_location")
    try:
        deploy_serve_config(config, wait_timeout_s=240)
        details = _deployment_details("overrides")
        vae = details[VAE.deployment]
        assert vae["deployment_config"]["num_replicas"] == 2
        assert sum(1 for r in vae["replicas"] if r["state"] == "RUNNING") == 2
        assert vae["deployment_config"]["ray_actor_options"]["num_cpus"] == 0.15
        assert details[TEXT_ENCODER.deployment]["deployment_config"]["ray_actor_options"]["num_cpus"] == 0.3
        transformer = details[TRANSFORMER.deployment]["deployment_config"]
        assert transformer["max_queued_requests"] == 32
        assert transformer["autoscaling_config"]["max_replicas"] == 2
        # an autoscaling Transformer follows its model's backlog (serve.runtime.autoscale)
        assert transformer["autoscaling_config"]["policy"]["policy_function"] == "serve.runtime.autoscale:backlog_policy"
        assert transformer["graceful_shutdown_timeout_s"] == 300
        assert transformer["health_check_period_s"] == 7  # the model's own, over deployments.transformer
        assert set(details) == {TEXT_ENCODER.deployment, TRANSFORMER.deployment, VAE.deployment, GENERATOR.deployment}
        from client.handle import GeneratorClient

        result = GeneratorClient("overrides").generate({"prompt": "override check", "num_inference_steps": 1})
        assert result.mp4[4:8] == b"ftyp"
    finally:
        serve.delete("overrides")


@pytest.mark.fast
def test_a_partial_stage_override_keeps_that_stages_defaults():
    args = AppArgs.model_validate({"deployments": {"ingress": {"ray_actor_options": {"num_cpus": 0.1}}}})
    assert args.deployments.ingress.ray_actor_options.num_cpus == 0.1
    assert args.deployments.ingress.max_ongoing_requests == 256
    assert args.deployments.ingress.max_queued_requests == 512


@pytest.mark.fast
def test_serve_env_defaults_do_not_override_the_environment(tmp_path):
    from serve.ops.serve_env import SERVE_ENV, apply_serve_env

    env = {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    applied = apply_serve_env(env, haproxy_dir=tmp_path / "x")
    assert applied["RAY_SERVE_ENABLE_HA_PROXY"] == "0"  # the user's choice wins
    assert applied["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == SERVE_ENV[
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]
    assert "RAY_SERVE_HAPROXY_STATS_PORT" not in env  # no HAProxy, nothing of its own
    on = apply_serve_env({})
    assert on["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    shutil.rmtree(Path(on["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent, ignore_errors=True)


@pytest.mark.fast
def test_each_cluster_gets_its_own_haproxy_files_and_ports(tmp_path):
    """Ray's HAProxy defaults (/tmp/haproxy-serve, ports 8404/9101) allow one cluster per machine."""
    from serve.ops.serve_env import apply_serve_env

    a, b = apply_serve_env({}), apply_serve_env({})
    folder = Path(a["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent
    try:
        assert folder.is_dir() and folder != Path(b["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent
        # HAProxy's 97-character socket limit, with Ray's 56-character node-id folder inside
        assert len(str(folder / ("n" * 56) / "metrics.sock")) <= 97
    finally:
        for d in (a, b):
            shutil.rmtree(Path(d["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent, ignore_errors=True)
    ports = {a["RAY_SERVE_HAPROXY_STATS_PORT"], a["RAY_SERVE_HAPROXY_METRICS_PORT"]}
    assert len(ports) == 2 and all(int(p) > 0 for p in ports)
    mine = apply_serve_env({"RAY_SERVE_HAPROXY_STATS_PORT": "18404"}, haproxy_dir="/tmp/cvhap-test")
    assert mine["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    shutil.rmtree("/tmp/cvhap-test", ignore_errors=True)
    with pytest.raises(ValueError, match="too long"):
        apply_serve_env({}, haproxy_dir=tmp_path / ("x" * 60))


@pytest.mark.fast
def test_configuration_page_matches_the_models():
    """docs/configuration.md is generated from the pydantic models; it fails here when they drift
    apart (regenerate it with the command the page names)."""
    from serve.ops.config_doc import DOC_PATH, REGENERATE, render_markdown

    page = (ROOT / DOC_PATH).read_text(encoding="utf-8")
    assert page == render_markdown(), f"{DOC_PATH} is out of date with serve/config.py; run: {REGENERATE}"
    assert REGENERATE in page
    # every field of every section is on the page, the ingress webhooks' included
    for field in AppArgs.model_fields:
        assert f"| `{field}` |" in page, field
    for field in type(AppArgs().ingress.webhooks).model_fields:
        assert f"| `{field}` |" in page, field


@pytest.mark.fast
def test_config_schema_command_prints_the_app_args_schema(capsys):
    import json

    from serve.ops.cli import main

    assert main(["config", "--schema"]) == 0
    assert json.loads(capsys.readouterr().out) == AppArgs.model_json_schema()
    assert main(["config", "--markdown"]) == 0
    assert capsys.readouterr().out == (ROOT / "docs/configuration.md").read_text(encoding="utf-8")
