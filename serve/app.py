"""The app builder: one typed args model in, one bound Serve application out.

    serve run serve_config.yaml                      # import_path: serve.app:build_app
    serve run serve.app:build_app with_ingress=false # args from the command line

Every deployment gets its options from `AppArgs.deployments.<stage>`; the graph is bound here and
nowhere else.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from ray.serve import Application

from serve.config import LIVE_LEVERS, AppArgs, Settings, validate_live_levers
from serve.runtime.autoscale import POLICY_FUNCTION


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
    for m in args.models:  # a Transformer that autoscales follows its model's backlog (serve.runtime.autoscale)
        opts = plan[transformer_deployment_name(args, m.name)]
        auto = opts.get("autoscaling_config")
        if isinstance(auto, dict) and not auto.get("policy"):
            opts["autoscaling_config"] = {**auto, "policy": {"policy_function": POLICY_FUNCTION}}
    return plan


def replica_range(opts: dict[str, Any]) -> tuple[int, int]:
    """A deployment's (min, max) replicas from its Serve options."""
    auto = opts.get("autoscaling_config")
    if isinstance(auto, dict):
        return int(auto.get("min_replicas", 1)), int(auto.get("max_replicas", 1))
    n = int(opts.get("num_replicas") or 1)
    return n, n


def scaling_facts(args: AppArgs, plan: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What the ingress's dispatcher needs from the plan: per model, its Transformer deployment, its
    replica range and whether it follows the backlog policy (only those are held back at zero
    replicas: their policy reads the backlog, Serve's default one would never see the held jobs); and
    `dispatch_limit`, the jobs one ingress replica hands over at once: what the Transformers can hold
    (max_replicas x max_ongoing_requests, summed) within what the Generator can (same), shared by
    the ingress replicas."""
    models = {}
    holds = 0
    for m in args.models:
        name = transformer_deployment_name(args, m.name)
        opts = plan[name]
        low, high = replica_range(opts)
        policy = (opts.get("autoscaling_config") or {}).get("policy") or {}
        models[m.name] = {"deployment": name, "min_replicas": low, "max_replicas": high,
                          "backlog_policy": policy.get("policy_function") == POLICY_FUNCTION}
        holds += high * int(opts.get("max_ongoing_requests", 1))
    gen_low, gen_high = replica_range(plan["Generator"])
    holds = min(holds, gen_high * int(plan["Generator"].get("max_ongoing_requests", 1)))
    ingress = replica_range(plan["Ingress"])[0] if "Ingress" in plan else 1
    return {"models": models, "dispatch_limit": max(1, -(-holds // max(1, ingress)))}


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of CineVivid's server code (serve/ and deployments/): part of every deployment's version,
    so that new code restarts the replicas."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for package in ("serve", "deployments"):
        for path in sorted((root / package).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _stage(deployment, stage: str, args: AppArgs, name: str, plan: dict[str, dict[str, Any]], *init_args,
           **init_kwargs):
    """Bind one stage as deployment `name`, with its Serve options from `plan` (`deployment_plan`).
    Its live levers (`LIVE_LEVERS[stage]`) go in Serve's `user_config` (a `user_config` in the config
    file's `deployments:` entry is laid over them and validated here, so a bad value fails the deploy before any replica sees it); its version is a hash of the code and of
    what needs a restart (the constructor args, live levers left out), so a redeploy that changes only
    the live levers reconfigures the running replicas instead of replacing them."""
    opts = dict(plan[name], name=name)
    if stage in LIVE_LEVERS:
        base = args.levers.live_for(stage)
        opts["user_config"] = validate_live_levers(stage, base, opts.get("user_config")).live_for(stage)
    stable = json.dumps([stage, code_fingerprint(), _without_live(init_args), _without_live(init_kwargs)],
                        sort_keys=True, default=str)
    version = hashlib.sha256(stable.encode()).hexdigest()[:16]
    return deployment.options(**opts).options(version=version, _internal=True).bind(*init_args, **init_kwargs)


def _without_live(value):
    """Init args with every live lever removed (they reach the replica through `user_config`)."""
    live = {k for keys in LIVE_LEVERS.values() for k in keys}
    if isinstance(value, dict):
        return {k: _without_live(v) for k, v in value.items() if k not in live}
    if isinstance(value, (list, tuple)):
        return [_without_live(v) for v in value]
    if isinstance(value, Application):  # a bound stage: its own version covers it
        return "<bound deployment>"
    return value


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
    d = args.deployments
    text_encoder = _stage(TextEncoder, "text_encoder", args, "TextEncoder", plan,
                          model, args.text_encoder_batching.model_dump(mode="json"),
                          torch_threads=d.text_encoder.torch_threads)
    transformers = {}
    for m in args.models:
        name = transformer_deployment_name(args, m.name)
        transformers[m.name] = _stage(Transformer, "transformer", args, name, plan,
                                      m.model_dump(mode="json"), levers, args.fault_injection.get("transformer"),
                                      liveness, args.chaos_delay_s.get("transformer", 0.0),
                                      torch_threads=d.transformer.torch_threads)
    vae = _stage(VAEDecoder, "vae", args, "VAEDecoder", plan,
                 model, levers, args.fault_injection.get("vae"), liveness, args.chaos_delay_s.get("vae", 0.0),
                 torch_threads=d.vae.torch_threads)
    image_encoder = None
    if "ImageEncoder" in plan:
        from deployments.image_encoder import ImageEncoder

        i2v = next(m for m in args.models if m.pipeline == "i2v")
        image_encoder = _stage(ImageEncoder, "image_encoder", args, "ImageEncoder", plan, i2v.model_dump(mode="json"),
                               torch_threads=d.image_encoder.torch_threads)
    tts = None
    if "TTS" in plan:
        from deployments.tts import TTS

        tts = _stage(TTS, "tts", args, "TTS", plan, args.tts.model_dump(mode="json"),
                     args.chaos_delay_s.get("tts", 0.0))
    return _stage(Generator, "generator", args, "Generator", plan,
                  text_encoder, transformers, vae, tts, [m.model_dump(mode="json") for m in args.models],
                  args.tts.model_dump(mode="json"), args.name, liveness, image_encoder)


def build_app(args: AppArgs | dict[str, Any] | None = None,
              serve_overrides: dict[str, dict] | None = None) -> Application:
    args = parse_args(args)
    generator = build_generator(args, serve_overrides)
    if not args.with_ingress:
        return generator
    from deployments.ingress import Ingress

    plan = deployment_plan(args, serve_overrides)
    return _stage(Ingress, "ingress", args, "Ingress", plan, generator, args.model_dump(mode="json"),
                  scaling_facts(args, plan))


def default_app_args() -> AppArgs:
    """Args from CINEVIVID_APP_ARGS (a YAML/JSON file), else the embedded defaults."""
    path = Settings().app_args
    if not path:
        return AppArgs()
    import yaml

    with open(path) as f:
        return AppArgs.model_validate(yaml.safe_load(f) or {})
