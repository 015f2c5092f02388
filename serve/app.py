"""The app builder: one typed args model in, one bound Serve application out.

    serve run serve_config.yaml                      # import_path: serve.app:build_app
    serve run serve.app:build_app with_ingress=false # args from the command line

Every deployment gets its options from `AppArgs.deployments.<stage>`; the graph is bound here and
nowhere else.
"""

from __future__ import annotations

import os
from typing import Any

from ray.serve import Application

from serve.config import AppArgs


def parse_args(args: AppArgs | dict[str, Any] | None) -> AppArgs:
    if isinstance(args, AppArgs):
        return args
    args = dict(args or {})
    # `serve run serve.app:build_app with_ingress=false` passes strings
    if isinstance(args.get("with_ingress"), str):
        args["with_ingress"] = args["with_ingress"].lower() in ("1", "true", "yes")
    return AppArgs.model_validate(args)


def uses_tts(args: AppArgs) -> bool:
    return any(p != "none" for p in args.tts.providers)


def _over(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Serve options `over` laid over `base`, key by key; a `num_replicas` drops autoscaling, as in Serve."""
    if "num_replicas" in over:
        base = {k: v for k, v in base.items() if k != "autoscaling_config"}
    elif "autoscaling_config" in over:
        base = {k: v for k, v in base.items() if k != "num_replicas"}
    return {**base, **over}


def transformer_deployment_name(args: AppArgs, model_name: str) -> str:
    """The Serve deployment of a model's Transformer: "Transformer" for the default (first) model,
    "Transformer-<name>" for each other model of the set."""
    return "Transformer" if model_name == args.models[0].name else f"Transformer-{model_name}"


def deployment_plan(args: AppArgs, serve_overrides: dict[str, dict] | None = None) -> dict[str, dict[str, Any]]:
    """Every deployment the app deploys, by Serve name, with the Serve options it gets: its stage's
    `AppArgs.deployments` entry, a model's `transformer_deployment` over that for its Transformer,
    and Serve's own per-deployment overrides on top (an override's `num_replicas` drops autoscaling,
    as in Serve)."""
    d = args.deployments
    plan: dict[str, dict[str, Any]] = {"TextEncoder": d.text_encoder.serve_options()}
    for m in args.models:
        plan[transformer_deployment_name(args, m.name)] = _over(d.transformer.serve_options(), m.transformer_deployment)
    plan["VAEDecoder"] = d.vae.serve_options()
    if any(m.pipeline == "i2v" for m in args.models):
        plan["ImageEncoder"] = d.image_encoder.serve_options()
    if uses_tts(args):
        plan["TTS"] = d.tts.serve_options()
    plan["Generator"] = d.generator.serve_options()
    if args.with_ingress:
        plan["Ingress"] = d.ingress.serve_options()
    for name, over in (serve_overrides or {}).items():
        if name in plan:
            plan[name] = _over(plan[name], over)
    return plan


def build_generator(args: AppArgs, serve_overrides: dict[str, dict] | None = None) -> Application:
    """The generation graph without HTTP: what a Ray job reaches through `serve.get_app_handle`.
    One text encoder and one VAE for every model of the set (all SkyReels-V2 models share UMT5 and
    the Wan VAE: they load from the first model's source), one Transformer per model, one CLIP
    image encoder when a model is an I2V one."""
    from deployments.generator import Generator
    from deployments.text_encoder import TextEncoder
    from deployments.transformer import Transformer
    from deployments.vae import VAEDecoder

    plan = deployment_plan(args, serve_overrides)
    model = args.model.model_dump(mode="json")
    levers = args.levers.model_dump(mode="json")
    liveness = args.liveness.model_dump(mode="json")
    text_encoder = TextEncoder.options(**plan["TextEncoder"]).bind(
        model, args.text_encoder_batching.model_dump(mode="json"), args.levers.embedding_cache_size)
    transformers = {}
    for m in args.models:
        name = transformer_deployment_name(args, m.name)
        transformers[m.name] = Transformer.options(name=name, **plan[name]).bind(
            m.model_dump(mode="json"), levers, args.fault_injection.get("transformer"), liveness,
            args.chaos_delay_s.get("transformer", 0.0))
    vae = VAEDecoder.options(**plan["VAEDecoder"]).bind(
        model, levers, args.fault_injection.get("vae"), liveness, args.chaos_delay_s.get("vae", 0.0))
    image_encoder = None
    if "ImageEncoder" in plan:
        from deployments.image_encoder import ImageEncoder

        i2v = next(m for m in args.models if m.pipeline == "i2v")
        image_encoder = ImageEncoder.options(**plan["ImageEncoder"]).bind(i2v.model_dump(mode="json"))
    tts = None
    if "TTS" in plan:
        from deployments.tts import TTS

        tts = TTS.options(**plan["TTS"]).bind(args.tts.model_dump(mode="json"), args.chaos_delay_s.get("tts", 0.0))
    return Generator.options(**plan["Generator"]).bind(
        text_encoder, transformers, vae, tts, [m.model_dump(mode="json") for m in args.models],
        args.tts.model_dump(mode="json"), args.name, liveness, image_encoder)


def build_app(args: AppArgs | dict[str, Any] | None = None,
              serve_overrides: dict[str, dict] | None = None) -> Application:
    args = parse_args(args)
    generator = build_generator(args, serve_overrides)
    if not args.with_ingress:
        return generator
    from deployments.ingress import Ingress

    return Ingress.options(**deployment_plan(args, serve_overrides)["Ingress"]).bind(
        generator, args.model_dump(mode="json"))


def default_app_args() -> AppArgs:
    """Args from CINEVIVID_APP_ARGS (a YAML/JSON file), else the embedded defaults."""
    path = os.environ.get("CINEVIVID_APP_ARGS")
    if not path:
        return AppArgs()
    import yaml

    with open(path) as f:
        return AppArgs.model_validate(yaml.safe_load(f) or {})
