"""The stage registry: every Serve deployment of the application, once.

Each `Stage` says what the rest of the code must agree on about a stage:

- `name`: its key in `AppArgs.deployments`, in the levers (`LIVE_LEVERS`), `fault_injection`,
  `chaos_delay_s`, and the `stage` of its progress events and `/health` entries;
- `deployment`: its Serve deployment name (the dashboard, `serve.get_deployment_handle`, the
  `deployments:` entries of a Serve config file, Prometheus' `deployment` label);
- `class_path`: the class that implements it, `"module:Class"`, imported only when the app is built
  (this module imports nothing, so config, clients and tests read it without torch);
- `live_levers`: the levers its replicas apply in `reconfigure()` (Serve's `user_config`);
- `default_options`: the `DeploymentOptions` fields it starts from (a config's entry is laid over them);
- `runs_torch`: whether its replicas run torch (only those take `torch_threads`);
- `per_model`: one deployment per model of the set (`deployment_for(model)`).

Config (`serve.config`), the app builder (`serve.app`), the deployments, the Generator's `/health`,
the clients, the load tests and the tests read the names from here; `tests/test_stages.py` fails on
a deployment name written out anywhere else.

The VAE stage encodes (I2V, extension) as well as decodes: its class is `VAECodec`. Its Serve name
stays "VAEDecoder", the name users' configs, dashboards and scripts already use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping


@dataclass(frozen=True)
class Stage:
    name: str
    deployment: str
    class_path: str
    live_levers: tuple[str, ...] = ()
    default_options: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    runs_torch: bool = False
    per_model: bool = False

    def __post_init__(self):
        object.__setattr__(self, "default_options", MappingProxyType(dict(self.default_options)))

    def load(self) -> Any:
        """The stage's Serve deployment (the decorated class), imported now."""
        module, _, attr = self.class_path.partition(":")
        return getattr(importlib.import_module(module), attr)

    def deployment_for(self, model: str | None = None) -> str:
        """The Serve name of the stage's deployment for `model` (None: the default model's, which
        carries the bare name; each other model of a per-model stage gets "<deployment>-<model>")."""
        if model is None or not self.per_model:
            return self.deployment
        return f"{self.deployment}-{model}"


TEXT_ENCODER = Stage("text_encoder", "TextEncoder", "deployments.text_encoder:TextEncoder",
                     live_levers=("embedding_cache_size",), runs_torch=True)
TRANSFORMER = Stage("transformer", "Transformer", "deployments.transformer:Transformer",
                    live_levers=("cfg_batch", "step_cache_threshold", "batch_max_size", "batch_wait_timeout_s",
                                 "batch_token_budget", "df_yield_every", "continuous_batching",
                                 "step_cache_backend", "cache_dit_fn", "cache_dit_bn", "cache_dit_taylorseer"),
                    runs_torch=True, per_model=True)
VAE = Stage("vae", "VAEDecoder", "deployments.vae:VAECodec",
            live_levers=("vae_tiling", "vae_tile_px", "vae_tile_stride_px"), runs_torch=True)
IMAGE_ENCODER = Stage("image_encoder", "ImageEncoder", "deployments.image_encoder:ImageEncoder", runs_torch=True)
TTS = Stage("tts", "TTS", "deployments.tts:TTS")
GENERATOR = Stage("generator", "Generator", "deployments.generator:Generator",
                  default_options={"max_ongoing_requests": 16})
INGRESS = Stage("ingress", "Ingress", "deployments.ingress:Ingress",
                default_options={"max_ongoing_requests": 256, "max_queued_requests": 512})

# in graph order: the model stages, then the Generator that drives them, then the HTTP entry point
STAGES: tuple[Stage, ...] = (TEXT_ENCODER, TRANSFORMER, VAE, IMAGE_ENCODER, TTS, GENERATOR, INGRESS)
BY_NAME: Mapping[str, Stage] = {s.name: s for s in STAGES}
BY_DEPLOYMENT: Mapping[str, Stage] = {s.deployment: s for s in STAGES}
# the stages whose replicas run models (a job's work queues there; the Generator and the Ingress hold
# a job from dispatch to its end)
MODEL_STAGES: tuple[Stage, ...] = tuple(s for s in STAGES if s.runs_torch or s is TTS)


def stage_of_deployment(deployment: str) -> Stage | None:
    """The stage a Serve deployment name belongs to ("Transformer-<model>" is the transformer's),
    or None for a deployment that is not CineVivid's."""
    if deployment in BY_DEPLOYMENT:
        return BY_DEPLOYMENT[deployment]
    head, sep, _ = deployment.partition("-")
    stage = BY_DEPLOYMENT.get(head) if sep else None
    return stage if stage is not None and stage.per_model else None


def model_of_deployment(deployment: str) -> str | None:
    """The model a per-model deployment serves ("Transformer-<model>" -> "<model>"); None for the
    default model's deployment and for every shared stage."""
    stage = stage_of_deployment(deployment)
    if stage is None or not stage.per_model or deployment == stage.deployment:
        return None
    return deployment[len(stage.deployment) + 1:]
