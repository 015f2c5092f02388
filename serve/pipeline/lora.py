"""Per-request LoRA adapters for the SkyReels-V2 transformer.

`resolve_adapters(cfg)` turns a model's `LoraAdaptersConfig` (the listed adapters, plus those found
in `adapters_dir`) into `AdapterSpec`s, each pointing at one local weights file. A Hub repo id is
only looked up in the local huggingface_hub cache (`local_files_only`): nothing is downloaded.

`AdapterCache` keeps up to `max_loaded` adapters injected in one transformer (PEFT LoRA layers, the
way `SkyReelsV2Pipeline.load_lora_weights` injects them) and switches between them per request:
`activate(name, scale)` before a denoising loop, `deactivate()` for a request without an adapter.
With the adapters disabled every PEFT layer returns its base layer's output, so the base model's
output is bit-identical to a transformer that never had a LoRA. The least recently used adapter
is deleted from the transformer when another must be loaded past `max_loaded`.

Not thread-safe, and the active adapter is a property of the transformer: activate, run the loop
and deactivate on the one thread that runs the loops, and batch together only jobs of the same
adapter and scale. No Serve in here.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from serve.config import LORA_NAME_PATTERN, LoraAdapterConfig, LoraAdaptersConfig

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
# the prefix of the transformer's keys in a pipeline-format LoRA file (`SkyReelsV2Pipeline.save_lora_weights`)
TRANSFORMER_PREFIX = "transformer"


class UnknownAdapter(ValueError):
    """A request named an adapter this model does not have."""

    def __init__(self, name: str, known):
        self.name = name
        self.known = sorted(known)
        have = ", ".join(repr(k) for k in self.known) if self.known else "none"
        super().__init__(f"unknown LoRA adapter {name!r}; this model has: {have}")


class AdapterResolveError(ValueError):
    """An adapter's weights cannot be found locally (missing file, empty folder, not in the Hub cache)."""


class AdapterLoadError(ValueError):
    """An adapter's weights could not be loaded into the transformer (wrong format, wrong model)."""


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter, resolved: `file` is the local weights file `AdapterCache` loads."""

    name: str
    file: Path
    source: str  # what the config gave: a path, a repo id, or the adapters_dir entry
    scale: float = 1.0
    defaults: dict = field(default_factory=dict)  # num_inference_steps / guidance_scale / flow_shift


def _weights_in_folder(folder: Path, weight_name: str | None, label: str) -> Path:
    if weight_name:
        file = folder / weight_name
        if not file.is_file():
            raise AdapterResolveError(f"lora adapter {label}: no {weight_name!r} in {folder}")
        return file
    if (folder / LORA_WEIGHT_NAME).is_file():
        return folder / LORA_WEIGHT_NAME
    found = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        raise AdapterResolveError(f"lora adapter {label}: no .safetensors file in {folder}")
    raise AdapterResolveError(f"lora adapter {label}: {folder} holds several .safetensors files "
                              f"({', '.join(p.name for p in found)}); set weight_name")


def _resolve_one(a: LoraAdapterConfig) -> AdapterSpec:
    label = repr(a.name)
    local = Path(a.path).expanduser()
    if local.is_file():
        file = local.resolve()
    elif local.is_dir():
        file = _weights_in_folder(local.resolve(), a.weight_name, label)
    elif a.path.startswith((".", "/", "~")) or a.path.count("/") != 1:
        raise AdapterResolveError(f"lora adapter {label}: {a.path!r} does not exist (and is not a Hub repo id)")
    else:  # a Hub repo id: the local cache only
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(repo_id=a.path, revision=a.revision, local_files_only=True))
        except Exception as exc:  # noqa: BLE001 - LocalEntryNotFoundError, HFValidationError, ...
            raise AdapterResolveError(
                f"lora adapter {label}: Hub repo {a.path!r} is not in the local Hugging Face cache and is "
                f"never downloaded here; fetch it beforehand (`hf download {a.path}`) or give a local "
                f"path ({type(exc).__name__}: {exc})") from exc
        file = _weights_in_folder(folder, a.weight_name, label)
    return AdapterSpec(name=a.name, file=file, source=a.path, scale=a.scale, defaults=a.request_defaults())


def scan_adapters_dir(folder: str | Path) -> dict[str, Path]:
    """Adapters in a folder, by name: each `<name>.safetensors` file and each `<name>/` subfolder
    holding one adapter (diffusers' `pytorch_lora_weights.safetensors` or a single `.safetensors`).
    Entries whose stem is not a valid adapter name, and subfolders without weights, are skipped
    (logged)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise AdapterResolveError(f"lora adapters_dir {str(root)!r} is not a folder")
    found: dict[str, Path] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix == ".safetensors":
            name = entry.stem
        elif entry.is_dir():
            name = entry.name
        else:
            continue
        if not re.match(LORA_NAME_PATTERN, name):
            logger.warning("lora adapters_dir: skipping %s (%r is not a valid adapter name)", entry, name)
            continue
        if entry.is_dir():
            try:
                file = _weights_in_folder(entry.resolve(), None, repr(name))
            except AdapterResolveError as exc:
                logger.warning("lora adapters_dir: skipping %s (%s)", entry, exc)
                continue
        else:
            file = entry.resolve()
        if name in found:
            raise AdapterResolveError(f"lora adapters_dir {str(root)!r}: two adapters named {name!r} "
                                      f"({found[name]} and {file})")
        found[name] = file
    return found


EMBEDDED_ADAPTERS_DIR = "embedded"  # adapters_dir of an embedded tiny model: its two tiny LoRAs


def _embedded_adapters_dir(model) -> Path:
    """The tiny LoRAs of an embedded tiny model (`adapters_dir: embedded`), built on first use."""
    from serve.config import TINY_SOURCES
    from serve.pipeline.loading import TINY_SEED, tiny_model_path
    from serve.pipeline.tiny_model import make_tiny_loras, make_tiny_model

    source = getattr(model, "source", None)
    if source not in TINY_SOURCES:
        raise AdapterResolveError(f"lora adapters_dir {EMBEDDED_ADAPTERS_DIR!r} is for the embedded tiny models; "
                                  f"model source {source!r} is not one")
    variant = TINY_SOURCES[source]
    model_dir = make_tiny_model(tiny_model_path(variant=variant), seed=TINY_SEED, variant=variant)
    return Path(next(iter(make_tiny_loras(model_dir).values()))).parent


def adapter_catalog(model) -> dict[str, LoraAdapterConfig]:
    """The adapters a request may name for `model` (a `ModelConfig`), by name, with their scale and
    request defaults, without loading or checking any weights (the request layer's view; the
    Transformer resolves the files): the listed ones, and the entries of `adapters_dir` (the two
    tiny LoRAs for `embedded`; nothing for a folder that is not on this node)."""
    from serve.pipeline.tiny_model import TINY_LORA_SEEDS

    cfg = model.lora
    out: dict[str, LoraAdapterConfig] = {}
    if cfg.adapters_dir == EMBEDDED_ADAPTERS_DIR:
        names = list(TINY_LORA_SEEDS)
    elif cfg.adapters_dir is not None and Path(cfg.adapters_dir).expanduser().is_dir():
        names = list(scan_adapters_dir(cfg.adapters_dir))
    else:
        names = []
    for name in names:
        out[name] = LoraAdapterConfig(name=name, path=f"{cfg.adapters_dir}/{name}")
    for a in cfg.adapters:
        out[a.name] = a
    return out


def resolve_adapters(cfg) -> dict[str, AdapterSpec]:
    """The adapters of a `LoraAdaptersConfig` (or of a `ModelConfig`'s `lora`), by name: the listed
    ones, and those in `adapters_dir` (a listed adapter of the same name wins; `embedded`: the tiny
    LoRAs of the embedded tiny model, which needs the ModelConfig). Raises `AdapterResolveError`
    naming the adapter when one cannot be found locally."""
    model = cfg if hasattr(cfg, "lora") else None
    cfg = getattr(cfg, "lora", cfg)
    if not isinstance(cfg, LoraAdaptersConfig):
        cfg = LoraAdaptersConfig.model_validate(cfg)
    out: dict[str, AdapterSpec] = {}
    if cfg.adapters_dir is not None:
        folder = _embedded_adapters_dir(model) if cfg.adapters_dir == EMBEDDED_ADAPTERS_DIR else cfg.adapters_dir
        for name, file in scan_adapters_dir(folder).items():
            out[name] = AdapterSpec(name=name, file=file, source=str(Path(folder) / file.name))
    for a in cfg.adapters:
        out[a.name] = _resolve_one(a)
    return out


def read_lora_state_dict(transformer, file: Path | str) -> tuple[dict, dict | None, str | None]:
    """The adapter's state dict, its metadata and the key prefix to load it with, as
    `SkyReelsV2Pipeline.load_lora_weights` reads it: diffusers' `lora_state_dict` (which also converts
    the original Wan / ComfyUI "diffusion_model." and musubi "lora_unet_" formats), then, for an
    image-to-video transformer, a T2V LoRA gets zero LoRAs on the image K/V projections. A file
    saved by `transformer.save_lora_adapter` has no "transformer." prefix: it loads with prefix None
    (diffusers would otherwise filter every key out and load nothing, with only a warning)."""
    from diffusers.loaders.lora_pipeline import SkyReelsV2LoraLoaderMixin

    state_dict, metadata = SkyReelsV2LoraLoaderMixin.lora_state_dict(
        str(file), local_files_only=True, return_lora_metadata=True)
    expand = getattr(SkyReelsV2LoraLoaderMixin, "_maybe_expand_t2v_lora_for_i2v", None)
    if expand is not None:
        state_dict = expand(transformer=transformer, state_dict=state_dict)
    if not state_dict or not all("lora" in k for k in state_dict):
        raise AdapterLoadError(f"{file}: not a LoRA checkpoint (every key must contain 'lora')")
    prefixed = any(k.startswith(TRANSFORMER_PREFIX + ".") for k in state_dict)
    return state_dict, metadata, TRANSFORMER_PREFIX if prefixed else None


class AdapterCache:
    """LoRA adapters of one transformer, loaded on first use, at most `max_loaded` at a time (LRU).

    `activate(name, scale)` makes `name` the only active adapter at `scale` (its configured scale
    when None); `deactivate()` switches LoRA off (base model, exact). `loaded` lists the adapters in
    the transformer, least recently used first; `loads`, `evictions` and `hits` count activations."""

    def __init__(self, transformer, adapters: Mapping[str, AdapterSpec], max_loaded: int = 4):
        if max_loaded < 1:
            raise ValueError("max_loaded must be >= 1")
        self.transformer = transformer
        self.adapters = dict(adapters)
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, None] = OrderedDict()
        self._enabled = False  # whether the LoRA layers are switched on
        self.active: tuple[str, float] | None = None
        self.loads = self.evictions = self.hits = 0
        self.config = None  # what `find` resolves again (set by `from_config`)

    @classmethod
    def from_config(cls, transformer, cfg) -> "AdapterCache":
        """From a `ModelConfig` or a `LoraAdaptersConfig`: its adapters, resolved, and its `max_loaded`."""
        lora = getattr(cfg, "lora", cfg)
        cache = cls(transformer, resolve_adapters(cfg), max_loaded=lora.max_loaded)
        cache.config = cfg
        return cache

    def find(self, name: str) -> AdapterSpec:
        """The adapter called `name`, resolving the config again when it is not known yet (the request
        layer lists adapters_dir on each request, `adapter_catalog`: one added there since this cache
        was made is found). `UnknownAdapter` when there is none; `AdapterResolveError` when the config
        no longer resolves. The loader of Serve's multiplexing (`Transformer._register_adapter`)."""
        if name not in self.adapters and self.config is not None:
            self.adapters = resolve_adapters(self.config)  # one reference swap: the denoising thread reads it
        return self.spec(name)

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    def spec(self, name: str) -> AdapterSpec:
        """The adapter called `name`; `UnknownAdapter` when there is none."""
        try:
            return self.adapters[name]
        except KeyError:
            raise UnknownAdapter(name, self.adapters) from None

    def activate(self, name: str, scale: float | None = None) -> AdapterSpec:
        """Make `name` the one active adapter, at `scale` (default: its configured scale), loading
        it first (and evicting the least recently used adapter) when it is not in the transformer."""
        spec = self.spec(name)
        scale = spec.scale if scale is None else float(scale)
        if name in self._loaded:
            self._loaded.move_to_end(name)
            self.hits += 1
            if self.active == (name, scale) and self._enabled:
                return spec  # already the active adapter at this scale
        else:
            while len(self._loaded) >= self.max_loaded:
                self._evict(next(iter(self._loaded)))
            self._load(spec)
        if not self._enabled:
            self.transformer.enable_lora()
            self._enabled = True
        self.transformer.set_adapters([name], [scale])
        self.active = (name, scale)
        return spec

    def deactivate(self) -> None:
        """No adapter: every LoRA layer passes its base layer's output through unchanged."""
        if self._loaded and self._enabled:  # (a transformer without adapters has no LoRA layers to switch off)
            self.transformer.disable_lora()
            self._enabled = False
        self.active = None

    def unload_all(self) -> None:
        """Delete every adapter from the transformer (its modules stay PEFT-wrapped, as base layers)."""
        self.deactivate()
        for name in list(self._loaded):
            self._evict(name)

    def stats(self) -> dict:
        return {"loaded": self.loaded, "max_loaded": self.max_loaded, "known": sorted(self.adapters),
                "active": self.active[0] if self.active else None,
                "active_scale": self.active[1] if self.active else None,
                "loads": self.loads, "evictions": self.evictions, "hits": self.hits}

    def _evict(self, name: str) -> None:
        self.transformer.delete_adapters([name])
        del self._loaded[name]
        self.evictions += 1
        if self.active and self.active[0] == name:
            self.active = None
        logger.info("lora adapter %s evicted", name)

    def _load(self, spec: AdapterSpec) -> None:
        state_dict, metadata, prefix = read_lora_state_dict(self.transformer, spec.file)
        try:
            with warnings.catch_warnings():  # several adapters in one model is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                self.transformer.load_lora_adapter(state_dict, adapter_name=spec.name, metadata=metadata,
                                                   prefix=prefix)
        except Exception as exc:
            raise AdapterLoadError(f"lora adapter {spec.name!r} ({spec.file}) does not fit this transformer: "
                                   f"{exc}") from exc
        if spec.name not in getattr(self.transformer, "peft_config", {}):
            raise AdapterLoadError(f"lora adapter {spec.name!r} ({spec.file}) has no weights for this transformer")
        self._loaded[spec.name] = None
        self.loads += 1
        logger.info("lora adapter %s loaded from %s", spec.name, spec.file)
