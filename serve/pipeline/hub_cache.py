"""What models are on disk: the embedded tiny model and the Hugging Face cache (for /models/cache/stats)."""

from __future__ import annotations

from serve.config import TINY_MODEL_SOURCE, ModelConfig
from serve.pipeline.loading import tiny_model_path


def _folder_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def model_cache_stats(model: ModelConfig) -> dict:
    cached: list[dict] = []
    tiny = tiny_model_path()
    if (tiny / "model_index.json").exists():
        cached.append({"source": TINY_MODEL_SOURCE, "path": str(tiny), "size_bytes": _folder_bytes(tiny)})
    try:
        from huggingface_hub import scan_cache_dir

        for repo in scan_cache_dir().repos:
            if repo.repo_type == "model":
                cached.append({"source": repo.repo_id, "path": str(repo.repo_path), "size_bytes": repo.size_on_disk})
    except Exception:  # noqa: BLE001 - no cache dir yet
        pass
    return {"loaded": [{"name": model.name, "source": model.source, "dtype": model.dtype}],
            "cached": cached, "total_cached_bytes": sum(c["size_bytes"] for c in cached)}
