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

from serve.config import LIVE_LEVERS, AppArgs, ModelConfig, Settings, ingress_serve_slots, validate_live_levers
from serve.errors import ConfigError
from serve.runtime.loopback_grpc import with_hook
from serve.stages import GENERATOR, IMAGE_ENCODER, INGRESS, TEXT_ENCODER, TRANSFORMER, TTS, VAE, Stage
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
    return TRANSFORMER.deployment_for(None if model_name == args.models[0].name else model_name)


def deployment_plan(args: AppArgs, serve_overrides: dict[str, dict] | None = None) -> dict[str, dict[str, Any]]:
    """Every deployment the app deploys, by Serve name, with the Serve options it gets: its stage's
    `AppArgs.deployments` entry, a model's `transformer_deployment` over that for its Transformer,
    and Serve's own per-deployment overrides on top (an override's `num_replicas` drops autoscaling,
    as in Serve)."""
    d = args.deployments
    plan: dict[str, dict[str, Any]] = {TEXT_ENCODER.deployment: d.text_encoder.serve_options()}
    for m in args.models:
        plan[transformer_deployment_name(args, m.name)] = _over(d.transformer.serve_options(), m.transformer_deployment)
    plan[VAE.deployment] = d.vae.serve_options()
    if any(m.pipeline == "i2v" for m in args.models):
        plan[IMAGE_ENCODER.deployment] = d.image_encoder.serve_options()
    if uses_tts(args):
        plan[TTS.deployment] = d.tts.serve_options()
    plan[GENERATOR.deployment] = d.generator.serve_options()
    if args.with_ingress:
        plan[INGRESS.deployment] = d.ingress.serve_options()
        # the configured slots are for ordinary requests; streams and /health get their own on top
        plan[INGRESS.deployment]["max_ongoing_requests"] = ingress_serve_slots(
            d.ingress.max_ongoing_requests, args.ingress.limits.max_streams_total)
    for name, over in (serve_overrides or {}).items():
        if name in plan:
            plan[name] = _over(plan[name], over)
    for m in args.models:  # a Transformer that autoscales follows its model's backlog (serve.runtime.autoscale)
        opts = plan[transformer_deployment_name(args, m.name)]
        if m.parallel.devices > 1:
            opts.update(parallel_bundles(m, opts))
        auto = opts.get("autoscaling_config")
        if isinstance(auto, dict) and not auto.get("policy"):
            opts["autoscaling_config"] = {**auto, "policy": {"policy_function": POLICY_FUNCTION}}
    return plan


def parallel_bundles(model: ModelConfig, opts: dict[str, Any]) -> dict[str, Any]:
    """The Serve options that give each replica of `model`'s Transformer the devices of its
    `parallel` split: one placement-group bundle per device, each the deployment's
    `ray_actor_options` (the replica takes bundle 0, a worker each other one), packed."""
    actor = opts.get("ray_actor_options") or {}
    n, gpus = model.parallel.devices, float(actor.get("num_gpus") or 0)
    if gpus not in (0.0, 1.0):
        raise ConfigError(f"model {model.name}: parallel spans {n} devices, one GPU each: its Transformer's "
                          f"ray_actor_options.num_gpus must be 1 (or 0 on CPUs), not {gpus:g}", param="num_gpus")
    bundle = {**(actor.get("resources") or {}), **({"CPU": float(actor["num_cpus"])} if actor.get("num_cpus") else {}),
              **({"GPU": gpus} if gpus else {}), **({"memory": actor["memory"]} if actor.get("memory") else {})}
    if not bundle:
        raise ConfigError(f"model {model.name}: parallel needs its Transformer's ray_actor_options to ask for "
                          "num_cpus or num_gpus (each device is a placement-group bundle of them)", param="num_cpus")
    return {"placement_group_bundles": [dict(bundle) for _ in range(n)], "placement_group_strategy": "PACK"}


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
    gen_low, gen_high = replica_range(plan[GENERATOR.deployment])
    holds = min(holds, gen_high * int(plan[GENERATOR.deployment].get("max_ongoing_requests", 1)))
    ingress = replica_range(plan[INGRESS.deployment])[0] if INGRESS.deployment in plan else 1
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


def _stage(stage: Stage, args: AppArgs, plan: dict[str, dict[str, Any]], *init_args, serve_name: str | None = None,
           **init_kwargs):
    """Bind `stage` (its class, imported from the registry's path) as deployment `serve_name` (by
    default the stage's Serve name), with its Serve options from `plan` (`deployment_plan`).
    Its live levers (`stage.live_levers`) go in Serve's `user_config` (a `user_config` in the config
    file's `deployments:` entry is laid over them and validated here, so a bad value fails the deploy
    before any replica sees it); its version is a hash of the code and of what needs a restart (the
    constructor args, live levers left out), so a redeploy that changes only the live levers
    reconfigures the running replicas instead of replacing them."""
    name = serve_name or stage.deployment
    opts = dict(plan[name], name=name)
    # every replica's inter-deployment gRPC server on loopback on a loopback node (serve.runtime.loopback_grpc)
    actor_options = dict(opts.get("ray_actor_options") or {})
    actor_options["runtime_env"] = with_hook(actor_options.get("runtime_env"))
    opts["ray_actor_options"] = actor_options
    if stage.live_levers:
        base = args.levers.live_for(stage.name)
        opts["user_config"] = validate_live_levers(stage.name, base, opts.get("user_config")).live_for(stage.name)
    stable = json.dumps([stage.name, code_fingerprint(), _without_live(init_args), _without_live(init_kwargs)],
                        sort_keys=True, default=str)
    version = hashlib.sha256(stable.encode()).hexdigest()[:16]
    return stage.load().options(**opts).options(version=version, _internal=True).bind(*init_args, **init_kwargs)


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


def bind_transformer(args: AppArgs, plan: dict[str, dict[str, Any]], model: ModelConfig) -> Application:
    """`model`'s Transformer deployment, bound with its options from `plan` (`deployment_plan`)."""
    return _stage(TRANSFORMER, args, plan, model.model_dump(mode="json"), args.levers.model_dump(mode="json"),
                  args.fault_injection.get(TRANSFORMER.name), args.liveness.model_dump(mode="json"),
                  args.chaos_delay_s.get(TRANSFORMER.name, 0.0), serve_name=transformer_deployment_name(args, model.name),
                  torch_threads=args.deployments.transformer.torch_threads)


def build_generator(args: AppArgs, serve_overrides: dict[str, dict] | None = None) -> Application:
    """The generation graph without HTTP: what a Ray job reaches through `serve.get_app_handle`.
    One text encoder and one VAE for every model of the set (all SkyReels-V2 models share UMT5 and
    the Wan VAE: they load from the first model's source), one Transformer per model, one CLIP
    image encoder when a model is an I2V one."""
    plan = deployment_plan(args, serve_overrides)
    model = args.model.model_dump(mode="json")
    levers = args.levers.model_dump(mode="json")
    liveness = args.liveness.model_dump(mode="json")
    d = args.deployments
    text_encoder = _stage(TEXT_ENCODER, args, plan,
                          model, args.text_encoder_batching.model_dump(mode="json"),
                          torch_threads=d.text_encoder.torch_threads)
    transformers = {m.name: bind_transformer(args, plan, m) for m in args.models}
    vae = _stage(VAE, args, plan,
                 model, levers, args.fault_injection.get(VAE.name), liveness, args.chaos_delay_s.get(VAE.name, 0.0),
                 torch_threads=d.vae.torch_threads)
    image_encoder = None
    if IMAGE_ENCODER.deployment in plan:
        i2v = next(m for m in args.models if m.pipeline == "i2v")
        image_encoder = _stage(IMAGE_ENCODER, args, plan, i2v.model_dump(mode="json"),
                               torch_threads=d.image_encoder.torch_threads)
    tts = None
    if TTS.deployment in plan:
        tts = _stage(TTS, args, plan, args.tts.model_dump(mode="json"), args.chaos_delay_s.get(TTS.name, 0.0))
    return _stage(GENERATOR, args, plan,
                  text_encoder, transformers, vae, tts, [m.model_dump(mode="json") for m in args.models],
                  args.tts.model_dump(mode="json"), args.name, liveness, image_encoder)


def build_app(args: AppArgs | dict[str, Any] | None = None,
              serve_overrides: dict[str, dict] | None = None) -> Application:
    args = parse_args(args)
    generator = build_generator(args, serve_overrides)
    if not args.with_ingress:
        return generator
    plan = deployment_plan(args, serve_overrides)
    return _stage(INGRESS, args, plan, generator, args.model_dump(mode="json"), scaling_facts(args, plan))


def default_app_args() -> AppArgs:
    """Args from CINEVIVID_APP_ARGS (a YAML/JSON file), else the embedded defaults."""
    path = Settings().app_args
    if not path:
        return AppArgs()
    import yaml

    with open(path) as f:
        return AppArgs.model_validate(yaml.safe_load(f) or {})
