"""Model resolution: each stage loads only its own subfolder of a diffusers-format model, from a
local folder, a Hub repo id (through huggingface_hub: its cache, revision and HF_HUB_OFFLINE),
or the embedded tiny model (built locally on first use)."""

from __future__ import annotations

import logging
from pathlib import Path

from serve.config import TINY_SOURCES, ModelConfig, Settings
from serve.errors import StageError

logger = logging.getLogger(__name__)

TINY_SEED = 0


def tiny_model_path(settings: Settings | None = None, variant: str = "t2v") -> Path:
    """Where the embedded tiny model of `variant` ("t2v", "i2v", "df") is built, in the cache dir."""
    settings = settings or Settings()
    kind = "" if variant == "t2v" else f"{variant}-"
    return Path(settings.cache_dir) / f"tiny-skyreels-v2-{kind}seed{TINY_SEED}"


def resolve_subfolder(model: ModelConfig, subfolder: str, settings: Settings | None = None) -> Path:
    """Return the local folder that holds `subfolder` of the model, downloading only that part."""
    source = model.source
    if source in TINY_SOURCES:
        from serve.pipeline.tiny_model import make_tiny_model

        variant = TINY_SOURCES[source]
        root = make_tiny_model(tiny_model_path(settings, variant), seed=TINY_SEED, variant=variant)
    elif Path(source).expanduser().exists():
        root = Path(source).expanduser().resolve()
    else:
        from huggingface_hub import snapshot_download

        try:
            root = Path(snapshot_download(
                repo_id=source,
                revision=model.revision,
                allow_patterns=[f"{subfolder}/*", "model_index.json"],
            ))
        except Exception as exc:  # offline with an empty cache, unknown repo, auth ...
            raise StageError(f"cannot resolve model {source!r} ({subfolder}): {exc}", stage=subfolder) from exc
    folder = root / subfolder
    if not folder.is_dir():
        raise StageError(f"model {source!r} has no {subfolder!r} folder at {root}", stage=subfolder)
    return folder


def torch_device(model: ModelConfig):
    import torch

    if model.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(model.device)


def torch_dtype(name: str):
    """The torch dtype of a config's dtype name ("float32", "bfloat16", "float16")."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
